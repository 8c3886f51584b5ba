"""Metadata XML of a Sentinel-2 product: ``MTD_MSIL2A.xml``/``MTD_MSIL1C.xml``, ``MTD_TL.xml``, the manifest."""

from __future__ import annotations

import datetime as dt
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

from rasterio.crs import CRS

from pipeline.core.channels import S2_BANDS
from pipeline.demo.safe_naming import SafeNaming
from pipeline.demo.sentinel2 import (
    AOT_QUANTIFICATION,
    BAND_IDS,
    QUANTIFICATION,
    RADIO_OFFSET,
    SUN_AZIMUTH,
    SUN_ZENITH,
    WVP_QUANTIFICATION,
    has_radiometric_offset,
)

#: Approximate spectral band definitions (nm): min, max, central.
_WAVELENGTHS: dict[str, tuple[float, float, float]] = {
    "B01": (411, 456, 442.2), "B02": (456, 533, 492.1), "B03": (538, 583, 559.0),
    "B04": (646, 684, 664.9), "B05": (695, 714, 703.8), "B06": (731, 749, 739.1),
    "B07": (769, 797, 779.7), "B08": (784, 900, 832.9), "B8A": (848, 881, 864.0),
    "B09": (931, 958, 943.2), "B10": (1338, 1414, 1376.9), "B11": (1539, 1681, 1610.4),
    "B12": (2072, 2312, 2185.7),
}
_SOLAR_IRRADIANCE: dict[str, float] = {
    "B01": 1874.3, "B02": 1959.75, "B03": 1824.93, "B04": 1512.79, "B05": 1425.78,
    "B06": 1291.13, "B07": 1175.57, "B08": 1041.28, "B8A": 953.93, "B09": 817.58,
    "B10": 365.41, "B11": 247.08, "B12": 87.75,
}
SCL_CLASSES: dict[int, str] = {
    0: "SC_NODATA", 1: "SC_SATURATED_DEFECTIVE", 2: "SC_DARK_FEATURE_SHADOW",
    3: "SC_CLOUD_SHADOW", 4: "SC_VEGETATION", 5: "SC_NOT_VEGETATED", 6: "SC_WATER",
    7: "SC_UNCLASSIFIED", 8: "SC_CLOUD_MEDIUM_PROBA", 9: "SC_CLOUD_HIGH_PROBA",
    10: "SC_THIN_CIRRUS", 11: "SC_SNOW_ICE",
}
#: Image_Content_QI element of each SCL class's percentage.
_SCL_PERCENTAGE_NAMES: dict[int, str] = {
    0: "NODATA_PIXEL_PERCENTAGE", 1: "SATURATED_DEFECTIVE_PIXEL_PERCENTAGE",
    2: "DARK_FEATURES_PERCENTAGE", 3: "CLOUD_SHADOW_PERCENTAGE", 4: "VEGETATION_PERCENTAGE",
    5: "NOT_VEGETATED_PERCENTAGE", 6: "WATER_PERCENTAGE", 7: "UNCLASSIFIED_PERCENTAGE",
    8: "MEDIUM_PROBA_CLOUDS_PERCENTAGE", 9: "HIGH_PROBA_CLOUDS_PERCENTAGE",
    10: "THIN_CIRRUS_PERCENTAGE", 11: "SNOW_ICE_PERCENTAGE",
}

_NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_NS_USER_PRODUCT = {
    "L2A": "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd",
    "L1C": "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd",
}
_NS_TILE = {
    "L2A": "https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-2A_Tile_Metadata.xsd",
    "L1C": "https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-1C_Tile_Metadata.xsd",
}


def _iso_ms(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _el(parent: ET.Element, tag: str, text: object = None, **attrib: str) -> ET.Element:
    e = ET.SubElement(parent, tag, attrib)
    if text is not None:
        e.text = str(text)
    return e


def _xml_bytes(root: ET.Element) -> bytes:
    ET.indent(root, space="    ")
    body = ET.tostring(root, encoding="unicode")
    return ('<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n' + body + "\n").encode("utf-8")


def _root(tag: str, namespace: str) -> ET.Element:
    # Literal prefixed names keep the "n1:" prefix of the real files without
    # touching ElementTree's global namespace registry.
    return ET.Element(tag, {
        "xmlns:n1": namespace,
        "xmlns:xsi": _NS_XSI,
        "xsi:schemaLocation": namespace,
    })


def product_metadata_xml(
    naming: SafeNaming,
    image_files: Sequence[str],
    *,
    footprint_lonlat: Sequence[tuple[float, float]],
    cloud_cover: float = 0.0,
    scl_percentages: Mapping[int, float] | None = None,
) -> bytes:
    """``MTD_MSIL2A.xml`` / ``MTD_MSIL1C.xml`` in the structure of the ESA user product.

    Offsets (``BOA_ADD_OFFSET`` / ``RADIO_ADD_OFFSET``, band_id 0..12, value
    -1000) are written for baselines 04.00 and later only.
    """
    level = naming.product
    ns = _NS_USER_PRODUCT[level]
    root = _root("n1:Level-2A_User_Product" if level == "L2A" else "n1:Level-1C_User_Product", ns)
    general = _el(root, "n1:General_Info")
    _product_info(general, naming, image_files)
    _image_characteristics(general, naming)
    _product_footprint(root, footprint_lonlat)
    aux = _el(root, "n1:Auxiliary_Data_Info")
    _el(aux, "PRODUCTION_DEM_TYPE", "CopernicusDEM30")
    quality = _el(root, "n1:Quality_Indicators_Info")
    _el(quality, "Cloud_Coverage_Assessment", f"{cloud_cover:.6f}")
    if level == "L2A" and scl_percentages is not None:
        qi = _el(quality, "Image_Content_QI")
        for index, name in _SCL_PERCENTAGE_NAMES.items():
            _el(qi, name, f"{scl_percentages.get(index, 0.0):.6f}")
    return _xml_bytes(root)


def _product_info(general: ET.Element, naming: SafeNaming, image_files: Sequence[str]) -> None:
    """``Product_Info``: times, level, baseline, datatake and the granule's IMAGE_FILE list."""
    level = naming.product
    info = _el(general, "Product_Info")
    start = _iso_ms(naming.sensing_time)
    _el(info, "PRODUCT_START_TIME", start)
    _el(info, "PRODUCT_STOP_TIME", start)
    _el(info, "PRODUCT_URI", naming.product_name)
    _el(info, "PROCESSING_LEVEL", "Level-2A" if level == "L2A" else "Level-1C")
    _el(info, "PRODUCT_TYPE", "S2MSI2A" if level == "L2A" else "S2MSI1C")
    _el(info, "PROCESSING_BASELINE", naming.baseline)
    _el(info, "PRODUCT_DOI", "https://doi.org/10.5270/S2_-znk9xsj" if level == "L2A" else "https://doi.org/10.5270/S2_-742ikth")
    _el(info, "GENERATION_TIME", naming.generation_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    _el(info, "PREVIEW_IMAGE_URL", "Not applicable")
    _el(info, "PREVIEW_GEO_INFO", "Not applicable")
    datatake = _el(info, "Datatake", datatakeIdentifier=naming.datatake_identifier)
    _el(datatake, "SPACECRAFT_NAME", f"Sentinel-{naming.mission[1:]}")
    _el(datatake, "DATATAKE_TYPE", "INS-NOBS")
    _el(datatake, "DATATAKE_SENSING_START", start)
    _el(datatake, "SENSING_ORBIT_NUMBER", naming.relative_orbit)
    _el(datatake, "SENSING_ORBIT_DIRECTION", "DESCENDING")
    query = _el(info, "Query_Options", completeSingleTile="true")
    _el(query, "PRODUCT_FORMAT", "SAFE_COMPACT")
    organisation = _el(info, "Product_Organisation")
    granule_list = _el(organisation, "Granule_List")
    granule = _el(
        granule_list, "Granule",
        datastripIdentifier=naming.datastrip_identifier,
        granuleIdentifier=naming.granule_identifier,
        imageFormat="JPEG2000",
    )
    for f in image_files:
        _el(granule, "IMAGE_FILE", f)


def _image_characteristics(general: ET.Element, naming: SafeNaming) -> None:
    """``Product_Image_Characteristics``: special values, encoding, bands and (L2A) SCL classes."""
    chars = _el(general, "Product_Image_Characteristics")
    for text, index in (("NODATA", 0), ("SATURATED", 65535)):
        special = _el(chars, "Special_Values")
        _el(special, "SPECIAL_VALUE_TEXT", text)
        _el(special, "SPECIAL_VALUE_INDEX", index)
    order = _el(chars, "Image_Display_Order")
    _el(order, "RED_CHANNEL", 3)
    _el(order, "GREEN_CHANNEL", 2)
    _el(order, "BLUE_CHANNEL", 1)
    _quantification(chars, naming)
    _reflectance_conversion(chars, naming.sensing_time)
    _spectral_information(chars)
    if naming.product == "L2A":
        scl_list = _el(chars, "Scene_Classification_List")
        for index, text in SCL_CLASSES.items():
            sc = _el(scl_list, "Scene_Classification_ID")
            _el(sc, "SCENE_CLASSIFICATION_TEXT", text)
            _el(sc, "SCENE_CLASSIFICATION_INDEX", index)


def _quantification(chars: ET.Element, naming: SafeNaming) -> None:
    """Quantification values and, from baseline 04.00 on, the per-band additive offsets."""
    offsets = has_radiometric_offset(naming.baseline)
    if naming.product == "L2A":
        qlist = _el(chars, "QUANTIFICATION_VALUES_LIST")
        _el(qlist, "BOA_QUANTIFICATION_VALUE", f"{QUANTIFICATION:.0f}", unit="none")
        _el(qlist, "AOT_QUANTIFICATION_VALUE", f"{AOT_QUANTIFICATION:.1f}", unit="none")
        _el(qlist, "WVP_QUANTIFICATION_VALUE", f"{WVP_QUANTIFICATION:.1f}", unit="cm")
        list_tag, offset_tag = "BOA_ADD_OFFSET_VALUES_LIST", "BOA_ADD_OFFSET"
    else:
        _el(chars, "QUANTIFICATION_VALUE", f"{QUANTIFICATION:.0f}", unit="none")
        list_tag, offset_tag = "Radiometric_Offset_List", "RADIO_ADD_OFFSET"
    if offsets:
        olist = _el(chars, list_tag)
        for band_id in BAND_IDS.values():
            _el(olist, offset_tag, f"{RADIO_OFFSET:.0f}", band_id=str(band_id))


def _reflectance_conversion(chars: ET.Element, sensing_time: dt.datetime) -> None:
    """Earth-sun distance factor ``U`` for the day of year and the solar irradiance per band."""
    conversion = _el(chars, "Reflectance_Conversion")
    doy = sensing_time.timetuple().tm_yday
    _el(conversion, "U", repr(1.0 / (1.0 - 0.01673 * math.cos(0.0172 * (doy - 4))) ** 2))
    irradiance = _el(conversion, "Solar_Irradiance_List")
    for band, band_id in BAND_IDS.items():
        _el(irradiance, "SOLAR_IRRADIANCE", _SOLAR_IRRADIANCE[band], bandId=str(band_id), unit="W/m²/µm")


def _spectral_information(chars: ET.Element) -> None:
    """Resolution and wavelengths of every band."""
    spectral = _el(chars, "Spectral_Information_List")
    for band, band_id in BAND_IDS.items():
        physical = "B8A" if band == "B8A" else f"B{int(band[1:])}"
        si = _el(spectral, "Spectral_Information", bandId=str(band_id), physicalBand=physical)
        _el(si, "RESOLUTION", S2_BANDS[band])
        wl = _el(si, "Wavelength")
        lo, hi, centre = _WAVELENGTHS[band]
        _el(wl, "MIN", f"{lo:g}", unit="nm")
        _el(wl, "MAX", f"{hi:g}", unit="nm")
        _el(wl, "CENTRAL", f"{centre:g}", unit="nm")


def _product_footprint(root: ET.Element, footprint_lonlat: Sequence[tuple[float, float]]) -> None:
    """``Geometric_Info``: the closed footprint ring (lat lon pairs) and the geographic CRS."""
    geometric = _el(root, "n1:Geometric_Info")
    outer = _el(geometric, "Product_Footprint")
    inner = _el(outer, "Product_Footprint")
    glob = _el(inner, "Global_Footprint")
    ring = list(footprint_lonlat)
    if ring and ring[0] != ring[-1]:
        ring.append(ring[0])
    _el(glob, "EXT_POS_LIST", " ".join(f"{lat!r} {lon!r}" for lon, lat in ring) + " ")
    _el(outer, "RASTER_CS_TYPE", "POINT")
    _el(outer, "PIXEL_ORIGIN", 1)
    crs_info = _el(geometric, "Coordinate_Reference_System")
    _el(crs_info, "GEO_TABLES", "EPSG", version="1")
    _el(crs_info, "HORIZONTAL_CS_TYPE", "GEOGRAPHIC")


def tile_metadata_xml(
    naming: SafeNaming,
    crs: CRS,
    geocoding: Mapping[int, tuple[float, float, int, int]],
    *,
    sun_zenith: float = SUN_ZENITH,
    sun_azimuth: float = SUN_AZIMUTH,
) -> bytes:
    """``GRANULE/<id>/MTD_TL.xml``: tile geocoding per resolution and mean sun angles.

    ``geocoding`` maps resolution (m) -> (ULX, ULY, rows, cols).
    """
    level = naming.product
    root = _root("n1:Level-2A_Tile_ID" if level == "L2A" else "n1:Level-1C_Tile_ID", _NS_TILE[level])
    general = _el(root, "n1:General_Info")
    _el(general, "TILE_ID", naming.granule_identifier, metadataLevel="Brief")
    _el(general, "DATASTRIP_ID", naming.datastrip_identifier, metadataLevel="Standard")
    _el(general, "DOWNLINK_PRIORITY", "NOMINAL", metadataLevel="Standard")
    _el(general, "SENSING_TIME", naming.granule_sensing_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), metadataLevel="Standard")
    geometric = _el(root, "n1:Geometric_Info")
    _tile_geocoding(geometric, crs, geocoding)
    angles = _el(geometric, "Tile_Angles", metadataLevel="Standard")
    mean = _el(angles, "Mean_Sun_Angle")
    _el(mean, "ZENITH_ANGLE", repr(float(sun_zenith)), unit="deg")
    _el(mean, "AZIMUTH_ANGLE", repr(float(sun_azimuth)), unit="deg")
    qi = _el(root, "n1:Quality_Indicators_Info", metadataLevel="Standard")
    _el(qi, "Image_Content_QI")
    return _xml_bytes(root)


def _tile_geocoding(geometric: ET.Element, crs: CRS, geocoding: Mapping[int, tuple[float, float, int, int]]) -> None:
    """``Tile_Geocoding``: the CRS, then the size and upper-left corner of each resolution."""
    geo = _el(geometric, "Tile_Geocoding", metadataLevel="Brief")
    epsg = crs.to_epsg()
    if epsg is not None and (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760):
        cs_name = f"WGS84 / UTM zone {epsg % 100:02d}{'N' if epsg < 32700 else 'S'}"
    else:
        cs_name = crs.name if hasattr(crs, "name") else crs.to_string()
    _el(geo, "HORIZONTAL_CS_NAME", cs_name)
    _el(geo, "HORIZONTAL_CS_CODE", f"EPSG:{epsg}" if epsg is not None else crs.to_string())
    for res in sorted(geocoding):
        _, _, rows, cols = geocoding[res]
        size = _el(geo, "Size", resolution=str(res))
        _el(size, "NROWS", rows)
        _el(size, "NCOLS", cols)
    for res in sorted(geocoding):
        ulx, uly, _, _ = geocoding[res]
        pos = _el(geo, "Geoposition", resolution=str(res))
        _el(pos, "ULX", f"{ulx:.0f}" if float(ulx).is_integer() else repr(ulx))
        _el(pos, "ULY", f"{uly:.0f}" if float(uly).is_integer() else repr(uly))
        _el(pos, "XDIM", res)
        _el(pos, "YDIM", -res)


def manifest_xml(files: Sequence[str]) -> bytes:
    """``manifest.safe``: one data object per file of the product."""
    root = ET.Element("xfdu:XFDU", {
        "xmlns:xfdu": "urn:ccsds:schema:xfdu:1",
        "xmlns:safe": "http://www.esa.int/safe/sentinel/1.1",
        "version": "esa/safe/sentinel/1.1/sentinel-2/msi/archive_l2a_user_product",
    })
    _el(root, "informationPackageMap")
    _el(root, "metadataSection")
    section = _el(root, "dataObjectSection")
    for i, f in enumerate(files):
        obj = _el(section, "dataObject", ID=f"IMG_DATA_{i}")
        byte_stream = _el(obj, "byteStream", mimeType="application/octet-stream")
        _el(byte_stream, "fileLocation", locatorType="URL", href=f"./{f}")
    return _xml_bytes(root)


def inspire_xml() -> bytes:
    """``INSPIRE.xml``: an empty ISO 19115 record."""
    return _xml_bytes(ET.Element("gmd:MD_Metadata", {"xmlns:gmd": "http://www.isotc211.org/2005/gmd"}))
