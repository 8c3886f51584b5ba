"""Built-in demo input: a small synthetic Sentinel-2 product, a DEM and the true scars.

``python -m pipeline demo-data DIR`` writes, generated in code and deterministic
for a seed:

- a Sentinel-2 L2A (or L1C) ``.SAFE`` directory in the real ESA layout and
  naming: JP2 bands (uint16, lossless) at their native 10/20/60 m resolutions,
  the resampled copies and TCI/AOT/WVP layers an L2A product carries, the
  scene classification (SCL), ``MTD_MSIL2A.xml``/``MTD_MSIL1C.xml`` with the
  processing baseline, quantification value and (baseline 04.00 and later)
  the -1000 radiometric offset, ``MTD_TL.xml`` with the tile geocoding;
- ``dem.tif``: an int16 DEM in EPSG:4326 at 1 arc-second (~30 m), nodata
  -32768 with a few voids, covering the scene plus a margin;
- ``truth_mask.tif`` (10 m, 1 = scar) and ``truth_scars.gpkg`` (polygons in
  the scene's UTM CRS): the landslide scars that were painted into the scene;
- ``scene.yaml``: a ready-to-run scene configuration with relative paths.

The scene sits in UTM zone 54N near the 2018 Iburi earthquake (Hokkaido,
42.7 N 141.9 E, Sentinel-2 tile 54TWN). Its origin is on a 60 m multiple of
the tile grid, so the 10, 20 and 60 m rasters nest as in real tiles, and its
side must be a multiple of 6 pixels so they cover the same extent (a real
tile is 10980 = 6 x 1830 pixels).

Content: steep terrain (random-phase ridges and valleys, broad massifs and a
river valley; 200-1200 m, slopes above 40 degrees) given as a function of UTM
coordinates (:class:`DemoTerrain`), so the DEM is the same surface sampled at
its own lon/lat pixel centres; forest, meadows and bare fields, a river, a
few clouds with their shadows, and 6-12 landslide scars: elongated
downslope tongues of bare soil on steep slopes. Besides them, bare ground that
is *not* a landslide and not in the truth (look-alikes, a handful of each on
the default scene, never within 3 pixels of a scar): rock outcrops on slopes
steeper than 35 degrees, gravel bars on the river banks, one or two roads
(thin lines, one along the valley floor) and rectangular clear-cuts in the
forest. Reflectance spectra per class (:data:`SPECTRA`) are not hand-set but
measured: the median top-of-atmosphere spectra of the labelled
Landslide4Sense patches per pixel class (landslide, forest, meadow, bare
gentle ground, bare steep rock, water; :func:`patch_classes`), turned into
surface reflectance by inverting this module's atmosphere
(:func:`spectra_from_patches`); only clouds keep a hand-set spectrum, and
there is no snow (the patches hold none).
Digital numbers follow the product's own encoding: reflectance =
(DN + offset) / 10000 with offset -1000 from baseline 04.00 on, DN 0 outside
the swath (a no-data corner as in real tiles).

The layout and metadata writer, :func:`write_safe`, is reusable: tests build
SAFE products from arrays they choose with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from scipy import ndimage

from pipeline.core.channels import S2_BANDS, SLOPE
from pipeline.core.errors import ConfigError, OutputError, PipelineError

log = logging.getLogger(__name__)

Product = Literal["L2A", "L1C"]

# ---------------------------------------------------------------------------
# Sentinel-2 product facts
# ---------------------------------------------------------------------------

#: band_id used in the product metadata (BOA_ADD_OFFSET band_id=..., bandId=...).
BAND_IDS: dict[str, int] = {
    "B01": 0, "B02": 1, "B03": 2, "B04": 3, "B05": 4, "B06": 5, "B07": 6,
    "B08": 7, "B8A": 8, "B09": 9, "B10": 10, "B11": 11, "B12": 12,
}
#: Bands of each product level (L2A has no B10).
PRODUCT_BANDS: dict[str, tuple[str, ...]] = {
    "L1C": tuple(BAND_IDS),
    "L2A": tuple(b for b in BAND_IDS if b != "B10"),
}
#: Layers in each resolution folder of a real L2A product (PSD 14.x).
L2A_RESOLUTION_LAYERS: dict[int, tuple[str, ...]] = {
    10: ("B02", "B03", "B04", "B08", "AOT", "WVP", "TCI"),
    20: ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B11", "B12",
         "AOT", "WVP", "SCL", "TCI"),
    60: ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B09", "B11", "B12",
         "AOT", "WVP", "SCL", "TCI"),
}
AUX_LAYERS = ("SCL", "AOT", "WVP", "TCI")
QUANTIFICATION = 10000.0
RADIO_OFFSET = -1000.0
AOT_QUANTIFICATION = 1000.0
WVP_QUANTIFICATION = 1000.0

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

_NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_NS_USER_PRODUCT = {
    "L2A": "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd",
    "L1C": "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd",
}
_NS_TILE = {
    "L2A": "https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-2A_Tile_Metadata.xsd",
    "L1C": "https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-1C_Tile_Metadata.xsd",
}

#: Default acquisition: Sentinel-2B over Hokkaido, 15 June 2023.
DEFAULT_SENSING_TIME = dt.datetime(2023, 6, 15, 1, 56, 19, 24000, tzinfo=dt.UTC)
DEFAULT_TILE = "54TWN"
#: Default scene origin: a 60 m multiple inside tile 54TWN (UL 499980, 4800000).
DEFAULT_ORIGIN = (499980.0 + 60 * 1250, 4800000.0 - 60 * 1150)
DEFAULT_CRS = "EPSG:32654"
#: Sun position at the default acquisition (degrees).
SUN_ZENITH = 24.0
SUN_AZIMUTH = 152.0


class RasterLayer(NamedTuple):
    """One raster to put in a product: array (rows, cols) or (bands, rows, cols), transform, CRS."""

    data: np.ndarray
    transform: Affine
    crs: CRS | str


def parse_baseline(baseline: str) -> tuple[int, int]:
    """``"05.10"`` -> ``(5, 10)``; raises :class:`ConfigError` for other forms."""
    m = re.fullmatch(r"(\d{2})\.(\d{2})", baseline.strip())
    if not m:
        raise ConfigError(f"processing baseline {baseline!r}: expected two two-digit numbers like '05.10'")
    return int(m.group(1)), int(m.group(2))


def has_radiometric_offset(baseline: str) -> bool:
    """True for processing baselines 04.00 and later (DN carry a -1000 offset)."""
    return parse_baseline(baseline) >= (4, 0)


def reflectance_to_dn(reflectance: np.ndarray, baseline: str) -> np.ndarray:
    """Encode reflectance as Sentinel-2 DN of ``baseline``: DN = refl * 10000 - offset.

    NaN (no data) becomes DN 0. Valid values are clipped to 1..65534 (0 is no
    data, 65535 saturated); before baseline 04.00 this clips negative
    reflectance to DN 1, as real products did.
    """
    offset = RADIO_OFFSET if has_radiometric_offset(baseline) else 0.0
    refl = np.asarray(reflectance, dtype=np.float64)
    nodata = ~np.isfinite(refl)
    dn = np.rint(np.where(nodata, 0.0, refl) * QUANTIFICATION - offset)
    dn = np.clip(dn, 1, 65534)
    dn[nodata] = 0
    return dn.astype(np.uint16)


# ---------------------------------------------------------------------------
# SAFE layout and metadata
# ---------------------------------------------------------------------------


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%S")


def _iso_ms(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class SafeNaming:
    """Names of a Sentinel-2 product, its granule and its files (ESA compact naming)."""

    product: Product
    baseline: str
    sensing_time: dt.datetime
    tile: str = DEFAULT_TILE
    mission: str = "S2B"
    relative_orbit: int = 117
    absolute_orbit: int = 32766

    @property
    def generation_time(self) -> dt.datetime:
        t = self.sensing_time + dt.timedelta(hours=2, minutes=19, seconds=11)
        return t.replace(microsecond=0)

    @property
    def granule_sensing_time(self) -> dt.datetime:
        return self.sensing_time + dt.timedelta(seconds=47)

    @property
    def baseline_code(self) -> str:
        major, minor = parse_baseline(self.baseline)
        return f"N{major:02d}{minor:02d}"

    @property
    def product_name(self) -> str:
        """``S2B_MSIL2A_20230615T015619_N0510_R117_T54TWN_20230615T041530.SAFE``."""
        return (
            f"{self.mission}_MSI{self.product}_{_stamp(self.sensing_time)}_{self.baseline_code}"
            f"_R{self.relative_orbit:03d}_T{self.tile}_{_stamp(self.generation_time)}.SAFE"
        )

    @property
    def granule_name(self) -> str:
        """``L2A_T54TWN_A032766_20230615T015706``."""
        return f"{self.product}_T{self.tile}_A{self.absolute_orbit:06d}_{_stamp(self.granule_sensing_time)}"

    @property
    def granule_identifier(self) -> str:
        return (
            f"{self.mission}_OPER_MSI_{self.product}_TL_{self.mission[1:]}PS_{_stamp(self.generation_time)}"
            f"_A{self.absolute_orbit:06d}_T{self.tile}_N{self.baseline}"
        )

    @property
    def datastrip_identifier(self) -> str:
        return (
            f"{self.mission}_OPER_MSI_{self.product}_DS_{self.mission[1:]}PS_{_stamp(self.generation_time)}"
            f"_S{_stamp(self.granule_sensing_time)}_N{self.baseline}"
        )

    @property
    def datatake_identifier(self) -> str:
        return f"G{self.mission}_{_stamp(self.sensing_time)}_{self.absolute_orbit:06d}_N{self.baseline}"

    def image_file(self, layer: str, resolution: int) -> str:
        """Path of a layer relative to the product, without ``.jp2`` (as in IMAGE_FILE)."""
        stem = f"T{self.tile}_{_stamp(self.sensing_time)}_{layer}"
        base = f"GRANULE/{self.granule_name}/IMG_DATA"
        if self.product == "L2A":
            return f"{base}/R{resolution}m/{stem}_{resolution}m"
        return f"{base}/{stem}"


def _split_layer_key(key: str) -> tuple[str, int | None]:
    """``"B02"`` -> ("B02", None); ``"B02_20m"`` -> ("B02", 20)."""
    m = re.fullmatch(r"([A-Z0-9]+?)(?:_(\d+)M)?", key.strip().upper())
    if not m:
        raise ValueError(f"layer key {key!r}: expected a band or layer name like 'B02' or 'B02_20m'")
    return m.group(1), int(m.group(2)) if m.group(2) else None


def _resolution_of(transform: Affine, key: str) -> int:
    xres, yres = transform.a, -transform.e
    if transform.b != 0 or transform.d != 0 or yres <= 0 or not math.isclose(xres, yres, rel_tol=1e-9):
        raise ValueError(f"layer {key}: expected a north-up transform with square pixels, got {tuple(transform)[:6]}")
    res = round(xres)
    if res <= 0 or not math.isclose(xres, res, rel_tol=1e-6):
        raise ValueError(f"layer {key}: pixel size {xres} is not a whole number of metres")
    return res


def _write_jp2(path: Path, data: np.ndarray, transform: Affine, crs: CRS | str) -> None:
    """Lossless JPEG 2000 with georeferencing and no nodata tag (like real S2 files)."""
    arr = data if data.ndim == 3 else data[np.newaxis]
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="JP2OpenJPEG", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
        dtype=arr.dtype, crs=CRS.from_user_input(crs), transform=transform,
        QUALITY="100", REVERSIBLE="YES", YCBCR420="NO",
    ) as dst:
        dst.write(arr)


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

    chars = _el(general, "Product_Image_Characteristics")
    for text, index in (("NODATA", 0), ("SATURATED", 65535)):
        special = _el(chars, "Special_Values")
        _el(special, "SPECIAL_VALUE_TEXT", text)
        _el(special, "SPECIAL_VALUE_INDEX", index)
    order = _el(chars, "Image_Display_Order")
    _el(order, "RED_CHANNEL", 3)
    _el(order, "GREEN_CHANNEL", 2)
    _el(order, "BLUE_CHANNEL", 1)
    offsets = has_radiometric_offset(naming.baseline)
    if level == "L2A":
        qlist = _el(chars, "QUANTIFICATION_VALUES_LIST")
        _el(qlist, "BOA_QUANTIFICATION_VALUE", f"{QUANTIFICATION:.0f}", unit="none")
        _el(qlist, "AOT_QUANTIFICATION_VALUE", f"{AOT_QUANTIFICATION:.1f}", unit="none")
        _el(qlist, "WVP_QUANTIFICATION_VALUE", f"{WVP_QUANTIFICATION:.1f}", unit="cm")
        if offsets:
            olist = _el(chars, "BOA_ADD_OFFSET_VALUES_LIST")
            for band_id in BAND_IDS.values():
                _el(olist, "BOA_ADD_OFFSET", f"{RADIO_OFFSET:.0f}", band_id=str(band_id))
    else:
        _el(chars, "QUANTIFICATION_VALUE", f"{QUANTIFICATION:.0f}", unit="none")
        if offsets:
            olist = _el(chars, "Radiometric_Offset_List")
            for band_id in BAND_IDS.values():
                _el(olist, "RADIO_ADD_OFFSET", f"{RADIO_OFFSET:.0f}", band_id=str(band_id))
    conversion = _el(chars, "Reflectance_Conversion")
    doy = naming.sensing_time.timetuple().tm_yday
    _el(conversion, "U", repr(1.0 / (1.0 - 0.01673 * math.cos(0.0172 * (doy - 4))) ** 2))
    irradiance = _el(conversion, "Solar_Irradiance_List")
    for band, band_id in BAND_IDS.items():
        _el(irradiance, "SOLAR_IRRADIANCE", _SOLAR_IRRADIANCE[band], bandId=str(band_id), unit="W/m²/µm")
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
    if level == "L2A":
        scl_list = _el(chars, "Scene_Classification_List")
        for index, text in SCL_CLASSES.items():
            sc = _el(scl_list, "Scene_Classification_ID")
            _el(sc, "SCENE_CLASSIFICATION_TEXT", text)
            _el(sc, "SCENE_CLASSIFICATION_INDEX", index)

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

    aux = _el(root, "n1:Auxiliary_Data_Info")
    _el(aux, "PRODUCTION_DEM_TYPE", "CopernicusDEM30")

    quality = _el(root, "n1:Quality_Indicators_Info")
    _el(quality, "Cloud_Coverage_Assessment", f"{cloud_cover:.6f}")
    if level == "L2A" and scl_percentages is not None:
        qi = _el(quality, "Image_Content_QI")
        names = {
            0: "NODATA_PIXEL_PERCENTAGE", 1: "SATURATED_DEFECTIVE_PIXEL_PERCENTAGE",
            2: "DARK_FEATURES_PERCENTAGE", 3: "CLOUD_SHADOW_PERCENTAGE", 4: "VEGETATION_PERCENTAGE",
            5: "NOT_VEGETATED_PERCENTAGE", 6: "WATER_PERCENTAGE", 7: "UNCLASSIFIED_PERCENTAGE",
            8: "MEDIUM_PROBA_CLOUDS_PERCENTAGE", 9: "HIGH_PROBA_CLOUDS_PERCENTAGE",
            10: "THIN_CIRRUS_PERCENTAGE", 11: "SNOW_ICE_PERCENTAGE",
        }
        for index, name in names.items():
            _el(qi, name, f"{scl_percentages.get(index, 0.0):.6f}")
    return _xml_bytes(root)


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
    angles = _el(geometric, "Tile_Angles", metadataLevel="Standard")
    mean = _el(angles, "Mean_Sun_Angle")
    _el(mean, "ZENITH_ANGLE", repr(float(sun_zenith)), unit="deg")
    _el(mean, "AZIMUTH_ANGLE", repr(float(sun_azimuth)), unit="deg")
    qi = _el(root, "n1:Quality_Indicators_Info", metadataLevel="Standard")
    _el(qi, "Image_Content_QI")
    return _xml_bytes(root)


def _manifest_xml(files: Sequence[str]) -> bytes:
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


def write_safe(
    parent: Path,
    layers: Mapping[str, RasterLayer | tuple[np.ndarray, Affine, CRS | str]],
    *,
    product: Product = "L2A",
    baseline: str = "05.10",
    sensing_time: dt.datetime = DEFAULT_SENSING_TIME,
    tile: str = DEFAULT_TILE,
    mission: str = "S2B",
    relative_orbit: int = 117,
    absolute_orbit: int = 32766,
    footprint_lonlat: Sequence[tuple[float, float]] | None = None,
    cloud_cover: float = 0.0,
    scl_percentages: Mapping[int, float] | None = None,
) -> Path:
    """Write a Sentinel-2 ``.SAFE`` product in the ESA layout into ``parent``; return its path.

    ``layers`` maps a layer key to ``(array, transform, crs)``. Keys are band
    names (``"B02"``), ``"SCL"``, ``"AOT"``, ``"WVP"``, ``"TCI"``, optionally
    with a resolution suffix (``"B02_20m"``) to add the resampled copies a
    real L2A product carries. Nothing is resampled: each array is written
    as given, at the resolution of its transform:

    - L2A: ``GRANULE/L2A_T<tile>_A<orbit>_<time>/IMG_DATA/R<res>m/T<tile>_<time>_<layer>_<res>m.jp2``
    - L1C: ``GRANULE/L1C_T<tile>_A<orbit>_<time>/IMG_DATA/T<tile>_<time>_<layer>.jp2``

    Band arrays must be uint16 DN (use :func:`reflectance_to_dn`), SCL uint8,
    TCI uint8 with three bands. Also written: ``MTD_MSIL2A.xml`` /
    ``MTD_MSIL1C.xml`` (baseline, quantification, offsets from 04.00 on,
    the IMAGE_FILE list), ``GRANULE/<id>/MTD_TL.xml`` (tile geocoding),
    ``manifest.safe`` and the empty auxiliary folders of a real product.
    """
    if product not in ("L2A", "L1C"):
        raise ValueError(f"product {product!r}: expected 'L2A' or 'L1C'")
    parse_baseline(baseline)
    if sensing_time.tzinfo is None:
        sensing_time = sensing_time.replace(tzinfo=dt.UTC)
    naming = SafeNaming(product, baseline, sensing_time, tile, mission, relative_orbit, absolute_orbit)
    allowed = set(PRODUCT_BANDS[product]) | ({"SCL", "AOT", "WVP", "TCI"} if product == "L2A" else {"TCI"})

    entries: list[tuple[str, int, str, RasterLayer]] = []  # (layer, res, relpath, raster)
    crs0: CRS | None = None
    for key, value in layers.items():
        layer, suffix_res = _split_layer_key(key)
        if layer not in allowed:
            raise ValueError(
                f"layer {key!r} cannot be part of an {product} product; expected one of {', '.join(sorted(allowed))}"
            )
        raster = RasterLayer(*value)
        data = np.asarray(raster.data)
        res = _resolution_of(raster.transform, key)
        if suffix_res is not None and suffix_res != res:
            raise ValueError(f"layer {key!r}: key says {suffix_res} m but the transform has {res} m pixels")
        expected_dtype = np.uint8 if layer in ("SCL", "TCI") else np.uint16
        if data.dtype != expected_dtype:
            raise ValueError(f"layer {key!r}: expected {np.dtype(expected_dtype).name} data, got {data.dtype}")
        if layer == "TCI" and (data.ndim != 3 or data.shape[0] != 3):
            raise ValueError(f"layer {key!r}: expected a (3, rows, cols) RGB array, got shape {data.shape}")
        if layer != "TCI" and data.ndim != 2:
            raise ValueError(f"layer {key!r}: expected a 2-D array, got shape {data.shape}")
        crs = CRS.from_user_input(raster.crs)
        if crs0 is None:
            crs0 = crs
        elif crs != crs0:
            raise ValueError(f"layer {key!r}: CRS {crs} differs from the other layers' {crs0}")
        entries.append((layer, res, naming.image_file(layer, res), RasterLayer(data, raster.transform, crs)))
    if not entries or crs0 is None:
        raise ValueError("write_safe needs at least one layer")
    relpaths = [e[2] for e in entries]
    if len(set(relpaths)) != len(relpaths):
        raise ValueError(f"two layers map to the same file in an {product} product: {sorted(relpaths)}")

    root = Path(parent) / naming.product_name
    if root.exists():
        raise OutputError(f"{root}: product directory already exists")
    granule = root / "GRANULE" / naming.granule_name
    for sub in ("AUX_DATA", "QI_DATA", "IMG_DATA"):
        (granule / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("DATASTRIP", "HTML", "rep_info"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    # Layers in the order of real products: by resolution, then band order.
    order = {name: i for i, name in enumerate((*BAND_IDS, "TCI", "AOT", "WVP", "SCL"))}
    order.update({"TCI": 100, "AOT": 101, "WVP": 102, "SCL": 103})
    entries.sort(key=lambda e: (e[1], order[e[0]]))
    geocoding: dict[int, tuple[float, float, int, int]] = {}
    for layer, res, rel, raster in entries:
        _write_jp2(root / f"{rel}.jp2", raster.data, raster.transform, raster.crs)
        rows, cols = raster.data.shape[-2:]
        if layer != "TCI":
            geocoding.setdefault(res, (raster.transform.c, raster.transform.f, rows, cols))

    if footprint_lonlat is None:
        res0 = min(geocoding)
        ulx, uly, rows, cols = geocoding[res0]
        xs = [ulx, ulx + cols * res0, ulx + cols * res0, ulx]
        ys = [uly, uly, uly - rows * res0, uly - rows * res0]
        lon, lat = Transformer.from_crs(crs0, "EPSG:4326", always_xy=True).transform(xs, ys)
        footprint_lonlat = list(zip(lon, lat, strict=True))

    mtd_name = f"MTD_MSI{product}.xml"
    (root / mtd_name).write_bytes(product_metadata_xml(
        naming, [e[2] for e in entries], footprint_lonlat=footprint_lonlat,
        cloud_cover=cloud_cover, scl_percentages=scl_percentages,
    ))
    (granule / "MTD_TL.xml").write_bytes(tile_metadata_xml(naming, crs0, geocoding))
    (root / "INSPIRE.xml").write_bytes(_xml_bytes(ET.Element("gmd:MD_Metadata", {
        "xmlns:gmd": "http://www.isotc211.org/2005/gmd"})))
    (root / "manifest.safe").write_bytes(_manifest_xml([mtd_name, *(f"{r}.jp2" for r in relpaths)]))
    log.debug("wrote %s with %d layers", root, len(entries))
    return root


# ---------------------------------------------------------------------------
# Synthetic terrain
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoTerrain:
    """Elevation (m) as a function of UTM coordinates: hills, massifs and incised valleys.

    The same function gives the 10 m scene terrain and the DEM sampled at its
    own lon/lat pixel centres, so the two agree wherever they are compared.
    Valley 0 holds the river.
    """

    cx: float
    cy: float
    kx: np.ndarray  # random-phase hills: wave vectors (rad/m), phases, amplitudes (m)
    ky: np.ndarray
    phase: np.ndarray
    amp: np.ndarray
    massifs: np.ndarray  # (M, 5): x, y (relative to cx, cy), sigma_x, sigma_y, amplitude
    valleys: np.ndarray  # (V, 7): angle, offset, meander amplitude, length, phase, width, depth
    base: float = 680.0
    mid: float = 700.0
    half: float = 520.0

    @classmethod
    def random(cls, rng: np.random.Generator, centre: tuple[float, float]) -> DemoTerrain:
        """Draw a terrain around ``centre`` (UTM metres)."""
        n = 40
        wavelength = np.exp(rng.uniform(np.log(300.0), np.log(6000.0), n))
        direction = rng.uniform(0, np.pi, n)
        k = 2 * np.pi / wavelength
        # Amplitude ~ wavelength^0.9: relief grows with scale (hills on hills).
        amp = 0.04 * wavelength ** 0.9 * rng.uniform(0.6, 1.4, n)
        m = 6
        massifs = np.column_stack([
            rng.uniform(-6000, 6000, m), rng.uniform(-6000, 6000, m),
            rng.uniform(1500, 4000, m), rng.uniform(1500, 4000, m),
            rng.uniform(-150, 350, m),
        ])
        v = 7
        valleys = np.column_stack([
            rng.uniform(0, np.pi, v), rng.uniform(-4500, 4500, v),
            rng.uniform(100, 400, v), rng.uniform(1500, 4000, v), rng.uniform(0, 2 * np.pi, v),
            rng.uniform(160, 320, v), rng.uniform(110, 220, v),
        ])
        valleys[0, 1] = rng.uniform(-1500, 1500)  # the river crosses the centre part
        valleys[0, 5:] = (420.0, 260.0)
        return cls(
            cx=centre[0], cy=centre[1], kx=k * np.cos(direction), ky=k * np.sin(direction),
            phase=rng.uniform(0, 2 * np.pi, n), amp=amp, massifs=massifs, valleys=valleys,
        )

    def valley_distance(self, x: np.ndarray, y: np.ndarray, index: int = 0) -> np.ndarray:
        """Signed distance (m, approximately) across the centre line of valley ``index`` (0: river)."""
        dx = np.asarray(x, dtype=np.float64) - self.cx
        dy = np.asarray(y, dtype=np.float64) - self.cy
        angle, offset, m_amp, m_len, m_phase = self.valleys[index, :5]
        c, s = math.cos(angle), math.sin(angle)
        wave = 2 * np.pi / m_len
        across = -dx * s + dy * c - offset
        sin_w, cos_w = _sin_cos_linear(wave * c, wave * s, m_phase, dx, dy)
        tilt = m_amp * wave * cos_w
        return (across - m_amp * sin_w) / np.sqrt(1.0 + tilt ** 2)

    def river_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (m) across the river's meandering centre line."""
        return self.valley_distance(x, y, 0)

    def _hills(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        if _is_grid(dx, dy):
            # Grid: sin(a + b) = sin a cos b + cos a sin b, summed over waves by matrix products.
            a = self.kx[:, np.newaxis] * dx[0][np.newaxis, :]  # (K, W)
            b = self.ky[:, np.newaxis] * dy[:, 0][np.newaxis, :] + self.phase[:, np.newaxis]  # (K, H)
            amp = self.amp[:, np.newaxis]
            out: np.ndarray = (np.cos(b) * amp).T @ np.sin(a) + (np.sin(b) * amp).T @ np.cos(a)
            return out
        shape = np.broadcast_shapes(dx.shape, dy.shape)
        px = np.broadcast_to(dx, shape).ravel()
        py = np.broadcast_to(dy, shape).ravel()
        flat = np.empty(px.size)
        for i in range(0, px.size, 32768):
            sl = slice(i, i + 32768)
            arg = np.outer(self.kx, px[sl]) + np.outer(self.ky, py[sl]) + self.phase[:, np.newaxis]
            flat[sl] = self.amp @ np.sin(arg)
        return flat.reshape(shape)

    def elevation(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Elevation in metres at UTM ``x``, ``y`` (arrays broadcast together), float64."""
        dx = np.asarray(x, dtype=np.float64) - self.cx
        dy = np.asarray(y, dtype=np.float64) - self.cy
        h = self.base + self._hills(dx, dy)
        for mx, my, sx, sy, a in self.massifs:
            # exp(u + v) = exp(u) exp(v): cheap on grids, exact everywhere.
            h = h + a * (np.exp(-0.5 * ((dx - mx) / sx) ** 2) * np.exp(-0.5 * ((dy - my) / sy) ** 2))
        for i in range(len(self.valleys)):
            width, depth = self.valleys[i, 5:]
            d = self.valley_distance(x, y, i)
            h = h - depth * np.exp(-((d / width) ** 2))
        # Soft clamp into [mid - half, mid + half] (about 200-1200 m).
        return self.mid + self.half * np.tanh((h - self.mid) / self.half)

    def gradient(self, x: float, y: float, step: float = 1.0) -> tuple[float, float]:
        """(dz/dx east, dz/dy north) at one point, central differences."""
        z = self.elevation(np.array([x + step, x - step, x, x]), np.array([y, y, y + step, y - step]))
        return float(z[0] - z[1]) / (2 * step), float(z[2] - z[3]) / (2 * step)


def _is_grid(dx: np.ndarray, dy: np.ndarray) -> bool:
    return dx.ndim == 2 and dy.ndim == 2 and dx.shape[0] == 1 and dy.shape[1] == 1


def _sin_cos_linear(ax: float, ay: float, const: float, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of ``ax * dx + ay * dy + const``, separably on (1, W) x (H, 1) grids."""
    if _is_grid(dx, dy):
        a = ax * dx
        b = ay * dy + const
        sa, ca, sb, cb = np.sin(a), np.cos(a), np.sin(b), np.cos(b)
        return sa * cb + ca * sb, ca * cb - sa * sb
    arg = ax * dx + ay * dy + const
    return np.sin(arg), np.cos(arg)


def horn_slope(elevation: np.ndarray, res: float) -> np.ndarray:
    """Slope in degrees by Horn's method (edges by replication)."""
    z = np.pad(np.asarray(elevation, dtype=np.float64), 1, mode="edge")
    a, b, c = z[:-2, :-2], z[:-2, 1:-1], z[:-2, 2:]
    d, f = z[1:-1, :-2], z[1:-1, 2:]
    g, h, i = z[2:, :-2], z[2:, 1:-1], z[2:, 2:]
    dzdx = ((c + 2 * f + i) - (a + 2 * d + g)) / (8 * res)
    dzdy = ((g + 2 * h + i) - (a + 2 * b + c)) / (8 * res)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy)))


# ---------------------------------------------------------------------------
# Synthetic scene
# ---------------------------------------------------------------------------

#: Surface reflectance per class (L2A, BOA); columns as in :data:`_CLASSES`.
#: Rule and source: medians of the 15 labelled Landslide4Sense patches (shared
#: ``l4s/train``, Sentinel-2 L1C top-of-atmosphere) per class of
#: :func:`patch_classes`, B8A = B08 (the patches have no B8A), inverted through
#: :data:`_ATMOSPHERE` and clipped at 0 (:func:`spectra_from_patches`), rounded to
#: 4 decimals. Pixels: forest 120087, meadow 89899, bare 727, rock 590,
#: scar 8932, water 89; snow 0 (no snow spectrum, so no snow in
#: the scene). A class darker at the top of the atmosphere than the path
#: reflectance (B10 of water) is clipped to 0 at the surface. ``cloud`` is
#: hand-set (the patches hold no clouds).
#: tests/test_demo.py recomputes these from the patches.
_CLASSES = ("forest", "meadow", "bare", "rock", "scar", "water", "cloud")
SPECTRA: dict[str, tuple[float, ...]] = {
    "B01": (0.0151, 0.0225, 0.0797, 0.0449, 0.0483, 0.0039, 0.55),
    "B02": (0.0189, 0.0301, 0.0957, 0.0699, 0.0689, 0.0036, 0.56),
    "B03": (0.0342, 0.0447, 0.1023, 0.0835, 0.0808, 0.0019, 0.57),
    "B04": (0.0226, 0.0380, 0.1071, 0.0937, 0.0904, 0.0007, 0.58),
    "B05": (0.0610, 0.0700, 0.1206, 0.0997, 0.1090, 0.0017, 0.59),
    "B06": (0.1777, 0.1545, 0.1612, 0.1275, 0.1486, 0.0071, 0.60),
    "B07": (0.2176, 0.1830, 0.1823, 0.1392, 0.1647, 0.0091, 0.60),
    "B08": (0.2253, 0.1859, 0.1655, 0.1316, 0.1663, 0.0070, 0.61),
    "B8A": (0.2229, 0.1839, 0.1637, 0.1302, 0.1646, 0.0069, 0.61),
    "B09": (0.2437, 0.1994, 0.1574, 0.1960, 0.1966, 0.0194, 0.58),
    "B10": (0.0040, 0.0080, 0.0080, 0.0140, 0.0040, 0.0000, 0.25),
    "B11": (0.1161, 0.1263, 0.2040, 0.1593, 0.1986, 0.0047, 0.45),
    "B12": (0.0526, 0.0660, 0.1628, 0.1176, 0.1516, 0.0023, 0.33),
}


def class_spectrum(name: str, product: Product = "L2A") -> dict[str, float]:
    """Band -> reflectance of class ``name`` in :data:`SPECTRA`: surface (L2A) or top of atmosphere (L1C)."""
    if name not in _CLASSES:
        raise ValueError(f"class {name!r}: expected one of {', '.join(_CLASSES)}")
    col = _CLASSES.index(name)
    if product == "L2A":
        return {b: SPECTRA[b][col] for b in SPECTRA}
    return {b: _ATMOSPHERE[b][0] + _ATMOSPHERE[b][1] * SPECTRA[b][col] for b in SPECTRA}


#: L1C top of atmosphere ~ path + transmittance * surface (clear-sky, reflectance units). The path
#: terms are the dark-object values of the labelled Landslide4Sense patches (the 0.5th percentile of
#: each band's top-of-atmosphere reflectance; B8A as B08); the transmittances are typical clear-sky ones.
_ATMOSPHERE: dict[str, tuple[float, float]] = {
    "B01": (0.078, 0.75), "B02": (0.050, 0.80), "B03": (0.030, 0.86), "B04": (0.016, 0.90),
    "B05": (0.015, 0.90), "B06": (0.020, 0.92), "B07": (0.022, 0.93), "B08": (0.019, 0.93),
    "B8A": (0.019, 0.94), "B09": (0.012, 0.35), "B10": (0.001, 0.05), "B11": (0.006, 0.92),
    "B12": (0.002, 0.88),
}
#: How much vegetation vigour (NIR plateau) drives each band (exponent).
_VIGOUR_WEIGHT: dict[str, float] = {
    "B01": -0.4, "B02": -0.4, "B03": -0.3, "B04": -0.5, "B05": 0.3, "B06": 0.9, "B07": 1.0,
    "B08": 1.0, "B8A": 1.0, "B09": 1.0, "B10": 0.0, "B11": -0.3, "B12": -0.3,
}
_NOISE_SIGMA = 0.004  # sensor noise, reflectance units, per native pixel


#: Fewest pixels a class needs in :func:`spectra_from_patches` to get a data-derived spectrum.
MIN_CLASS_PIXELS = 50
#: Classes of :func:`spectra_from_patches`, in the order their pixel rules claim pixels.
PATCH_CLASSES = ("scar", "snow", "water", "rock", "bare", "forest", "meadow")


@dataclass(frozen=True)
class PatchSpectra:
    """What :func:`patch_spectra` found: per-class pixel counts and median spectra.

    ``toa``: median top-of-atmosphere reflectance per class and band (L1C,
    B8A copied from B08); ``surface``: the same inverted through
    :data:`_ATMOSPHERE`, clipped at 0. Classes with fewer than
    :data:`MIN_CLASS_PIXELS` pixels have a count but no spectrum.
    """

    counts: dict[str, int]
    toa: dict[str, dict[str, float]]
    surface: dict[str, dict[str, float]]


def patch_classes(image: np.ndarray, mask: np.ndarray, channels: Sequence[str]) -> dict[str, np.ndarray]:
    """Boolean class masks of one Landslide4Sense patch (physical units, L1C TOA).

    Pixel rules, first rule wins (NDVI = (B08-B04)/(B08+B04), NDWI =
    (B03-B08)/(B03+B08), NDSI = (B03-B11)/(B03+B11)):

    - ``scar``: landslide pixels (mask 1); every other class is mask 0;
    - ``snow``: NDSI > 0.4 and B03 > 0.3 (bright; dark high-NDSI pixels are shadow or water);
    - ``water``: NDWI > 0 on slopes under 15 degrees (steeper NDWI > 0 pixels are terrain shadow);
    - ``rock`` (bare rock outcrop): NDVI < 0.25, B04 >= 0.06 (not shadow), slope >= 30 degrees;
    - ``bare`` (gravel, roads, field or clear-cut soil): the same on slopes under 15 degrees;
    - ``forest``: NDVI >= 0.65;
    - ``meadow``: 0.45 <= NDVI < 0.65.

    Pixels no rule claims (shadows, mixed NDVI 0.25-0.45, bare ground at 15-30
    degrees, which may be soil or rock) are left out.
    """
    idx = {c: i for i, c in enumerate(channels)}
    b03, b04, b08, b11 = (image[idx[c]].astype(np.float64) for c in ("B03", "B04", "B08", "B11"))
    slope = image[idx[SLOPE]]
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = (b08 - b04) / (b08 + b04)
        ndwi = (b03 - b08) / (b03 + b08)
        ndsi = (b03 - b11) / (b03 + b11)
    finite = np.isfinite(image).all(axis=0) & np.isfinite(ndvi) & np.isfinite(ndwi) & np.isfinite(ndsi)
    bare_like = (ndvi < 0.25) & (b04 >= 0.06)
    rules = {
        "scar": mask == 1,
        "snow": (ndsi > 0.4) & (b03 > 0.3),
        "water": (ndwi > 0) & (slope < 15.0),
        "rock": bare_like & (slope >= 30.0),
        "bare": bare_like & (slope < 15.0),
        "forest": ndvi >= 0.65,
        "meadow": (ndvi >= 0.45) & (ndvi < 0.65),
    }
    free = finite.copy()
    out: dict[str, np.ndarray] = {}
    for name in PATCH_CLASSES:
        sel = rules[name] & free
        if name != "scar":
            sel &= mask == 0
        out[name] = sel
        free &= ~sel
    return out


def surface_from_toa(band: str, toa: float) -> float:
    """Invert the demo's atmosphere, ``toa = path + trans * surface``, clipped at 0."""
    path, trans = _ATMOSPHERE[band]
    return max(0.0, (toa - path) / trans)


def patch_spectra(root: Path) -> PatchSpectra:
    """Per-class pixel counts and median spectra of the labelled patches under ``root``.

    ``root`` is a folder with ``img``/``mask`` (e.g. the shared
    ``l4s/train``). Pixels are classed by :func:`patch_classes`; the median of
    each class's pixels over all patches is its spectrum. The patches carry
    no B8A: its value is B08's. Surface reflectance inverts :data:`_ATMOSPHERE`.
    """
    from pipeline.training.datasets import find_patches, read_image, read_mask

    pixels: dict[str, list[np.ndarray]] = {c: [] for c in PATCH_CLASSES}
    channels: tuple[str, ...] | None = None
    for rec in find_patches(root, require_masks=True):
        patch = read_image(rec.image)
        assert rec.mask is not None
        mask, mask_valid = read_mask(rec.mask)
        channels = patch.channels
        valid = patch.valid & mask_valid
        for name, sel in patch_classes(patch.image, mask, channels).items():
            pixels[name].append(patch.image[:, sel & valid])
    assert channels is not None
    idx = {c: i for i, c in enumerate(channels)}
    counts: dict[str, int] = {}
    toa: dict[str, dict[str, float]] = {}
    surface: dict[str, dict[str, float]] = {}
    for name, parts in pixels.items():
        values = np.concatenate(parts, axis=1)
        counts[name] = int(values.shape[1])
        if counts[name] < MIN_CLASS_PIXELS:
            continue
        median = np.median(values.astype(np.float64), axis=1)
        toa[name] = {b: float(median[idx["B08" if b == "B8A" else b]]) for b in S2_BANDS}
        surface[name] = {b: surface_from_toa(b, v) for b, v in toa[name].items()}
    return PatchSpectra(counts, toa, surface)


def spectra_from_patches(root: Path) -> dict[str, dict[str, float]]:
    """Median surface reflectance per class (class -> band -> value) from the labelled patches.

    The classes with at least :data:`MIN_CLASS_PIXELS` pixels under the rules
    of :func:`patch_classes`; see :func:`patch_spectra`.
    """
    return patch_spectra(root).surface


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise (float32) with features of about ``scale_px`` pixels."""
    rows, cols = shape
    if scale_px <= 4:
        noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), scale_px / 2.0)
    else:
        step = scale_px / 2.0
        coarse = rng.standard_normal((int(rows / step) + 3, int(cols / step) + 3), dtype=np.float32)
        coarse = ndimage.gaussian_filter(coarse, 1.0, mode="wrap")
        noise = ndimage.zoom(coarse, step, order=1, prefilter=False, grid_mode=False)[:rows, :cols]
        if noise.shape != shape:
            noise = np.pad(noise, ((0, rows - noise.shape[0]), (0, cols - noise.shape[1])), mode="edge")
    noise -= noise.mean()
    noise /= noise.std() + 1e-12
    return noise.astype(np.float32, copy=False)


def _block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return a
    r, c = a.shape
    return a.reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))


@dataclass(frozen=True)
class Scar:
    """One painted landslide: its downslope centre line (UTM) and summary numbers."""

    scar_id: int
    path: np.ndarray  # (n, 2) x, y from head scarp to toe
    half_width_m: float
    length_m: float


class DemoScene:
    """All fields of the synthetic scene on its 10 m grid (built by :func:`make_scene`)."""

    def __init__(self, size: int, seed: int, origin: tuple[float, float] = DEFAULT_ORIGIN,
                 crs: str = DEFAULT_CRS) -> None:
        if size % 6 != 0 or size < 120:
            raise ConfigError(
                f"demo size {size}: expected a multiple of 6, at least 120, so that the 10, 20 and 60 m "
                "bands cover the same extent as in real tiles (10980 = 6 x 1830); try 1020 or 510"
            )
        if origin[0] % 60 or origin[1] % 60:
            raise ConfigError(f"demo origin {origin}: expected multiples of 60 m (Sentinel-2 tile grid)")
        self.size = size
        self.seed = seed
        self.crs = CRS.from_user_input(crs)
        self.transform = Affine(10.0, 0.0, origin[0], 0.0, -10.0, origin[1])
        rng = np.random.default_rng([seed, 0])
        shape = (size, size)
        self.x = origin[0] + 10.0 * (np.arange(size) + 0.5)  # column centres
        self.y = origin[1] - 10.0 * (np.arange(size) + 0.5)  # row centres
        centre = (origin[0] + 5.0 * size, origin[1] - 5.0 * size)
        self.terrain = DemoTerrain.random(rng, centre)
        X, Y = self.x[np.newaxis, :], self.y[:, np.newaxis]
        self.elevation = self.terrain.elevation(X, Y).astype(np.float32)
        self.slope = horn_slope(self.elevation, 10.0).astype(np.float32)
        self.valid10 = self.swath_valid(10)

        # Illumination (no terrain correction in L2A by default: full topographic shading).
        d_row, d_col = np.gradient(self.elevation.astype(np.float64), 10.0)
        dzdx, dzdn = d_col, -d_row  # rows run south
        self._dzdx, self._dzdn = dzdx.astype(np.float32), dzdn.astype(np.float32)
        slope_rad = np.arctan(np.hypot(dzdx, dzdn))
        aspect = np.arctan2(-dzdx, -dzdn)  # downslope azimuth, clockwise from north
        z, az = math.radians(SUN_ZENITH), math.radians(SUN_AZIMUTH)
        cos_i = math.cos(z) * np.cos(slope_rad) + math.sin(z) * np.sin(slope_rad) * np.cos(az - aspect)
        self.cos_incidence = cos_i.astype(np.float32)
        self.illumination = (0.45 + 0.55 * np.clip(cos_i / math.cos(z), 0.0, 1.6)).astype(np.float32)

        # Land cover fractions.
        river = np.abs(self.terrain.river_distance(X, Y))
        water = np.clip(0.5 - (river - 12.0) / 10.0, 0.0, 1.0).astype(np.float32)
        # Farmland on broad gentle ground (valley floors, terraces), not on slivers.
        gentle = (ndimage.gaussian_filter(self.slope, 4.0) < 10.0) & (self.elevation < np.quantile(self.elevation, 0.5))
        gentle &= _smooth_noise(rng, shape, 25) > -0.3
        farmland = ndimage.binary_opening(gentle, iterations=4) & (water == 0)
        # Parcels ~150 x 80 m on a rotated grid; each parcel meadow, bare field or woodland.
        theta = rng.uniform(0, np.pi / 2)
        u = (X - origin[0]) * math.cos(theta) + (Y - origin[1]) * math.sin(theta)
        v = -(X - origin[0]) * math.sin(theta) + (Y - origin[1]) * math.cos(theta)
        parcel = (np.floor(u / 150.0) * 7919 + np.floor(v / 80.0) * 104729).astype(np.int64)
        parcel_draw = (np.sin(parcel * 12.9898 + seed * 78.233) * 43758.5453) % 1.0
        field = farmland & (parcel_draw < 0.15)
        meadow = farmland & (parcel_draw >= 0.15) & (parcel_draw < 0.85)
        forest = ~(field | meadow)
        land = 1.0 - water
        self.fractions: dict[str, np.ndarray] = {
            "forest": (forest * land).astype(np.float32),
            "meadow": (meadow * land).astype(np.float32),
            "field": (field * land).astype(np.float32),
            "water": water,
        }
        self.canopy = (1.0 + 0.07 * _smooth_noise(rng, shape, 1.5)).astype(np.float32)
        self.vigour = (1.0 + 0.08 * _smooth_noise(rng, shape, 40)).astype(np.float32)
        self.soil_texture = (1.0 + 0.05 * _smooth_noise(rng, shape, 2)).astype(np.float32)

        # Clouds (a few blobs, a few % of the scene, thin edges) and their shadows.
        blobs = np.zeros(shape, np.float32)
        idx = np.arange(size, dtype=np.float32)
        for _ in range(int(rng.integers(2, 4))):
            r0, c0 = rng.uniform(0.1, 0.9, 2) * size
            sr = rng.uniform(0.035, 0.06) * size
            sc = sr * rng.uniform(0.6, 1.6)
            blobs += np.exp(-0.5 * ((idx - r0) / sr) ** 2)[:, np.newaxis] * np.exp(-0.5 * ((idx - c0) / sc) ** 2)
        lumpy = blobs * (1.0 + 0.45 * _smooth_noise(rng, shape, 10))
        self.cloud = np.clip((lumpy - 0.5) / 0.35, 0.0, 1.0).astype(np.float32)
        height = 1500.0
        disp = height * math.tan(z)  # shadow away from the sun
        d_east = disp * math.sin(az + math.pi)
        d_north = disp * math.cos(az + math.pi)
        self.shadow = ndimage.shift(self.cloud, (-d_north / 10.0, d_east / 10.0), order=0, cval=0.0)
        self.shadow = np.where(self.cloud > 0.05, 0.0, self.shadow).astype(np.float32)

        # Landslide scars.
        self.scar_fraction = np.zeros(shape, np.float32)
        self.scar_labels = np.zeros(shape, np.int32)
        self.scar_brightness = np.ones(shape, np.float32)
        self.scar_moisture = np.zeros(shape, np.float32)
        self.scars: list[Scar] = []
        self._paint_scars(rng)
        self.revegetation = np.clip(0.06 + 0.06 * _smooth_noise(rng, shape, 3), 0.0, 0.18).astype(np.float32)
        self.aot = (0.12 + 0.015 * _smooth_noise(rng, shape, 60)).astype(np.float32)
        self.wvp = (2.2 - 0.0008 * (self.elevation - 700.0) + 0.1 * _smooth_noise(rng, shape, 60)).astype(np.float32)

        # Look-alikes (not landslides, not in the truth): own random stream, so the rest is unchanged.
        self.lookalikes: dict[str, np.ndarray] = {}
        self._paint_lookalikes(np.random.default_rng([seed, 3]))

    # -- geometry -----------------------------------------------------------
    def grid(self, res: int) -> tuple[Affine, int]:
        """Transform and side length of the ``res`` m grid (same extent at 10, 20, 60 m)."""
        return Affine(float(res), 0.0, self.transform.c, 0.0, -float(res), self.transform.f), self.size * 10 // res

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return (left, top - 10.0 * self.size, left + 10.0 * self.size, top)

    def _swath_edge(self, y: np.ndarray) -> np.ndarray:
        """Easting of the swath's eastern edge at northing ``y`` (outside: east of it)."""
        left, bottom, right, top = self.bounds
        width = right - left
        frac = (top - y) / (top - bottom)
        return left + width * (0.80 + 0.17 * frac)

    def swath_valid(self, res: int) -> np.ndarray:
        """True inside the imaged swath, at the centres of the ``res`` m pixels."""
        transform, n = self.grid(res)
        xc = transform.c + res * (np.arange(n) + 0.5)
        yc = transform.f - res * (np.arange(n) + 0.5)
        return xc[np.newaxis, :] < self._swath_edge(yc)[:, np.newaxis]

    def footprint_lonlat(self) -> list[tuple[float, float]]:
        left, bottom, right, top = self.bounds
        xs = [left, float(self._swath_edge(np.array(top))), float(self._swath_edge(np.array(bottom))), left]
        ys = [top, top, bottom, bottom]
        lon, lat = Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
        return list(zip(lon, lat, strict=True))

    # -- scars --------------------------------------------------------------
    def _paint_scars(self, rng: np.random.Generator) -> None:
        size = self.size
        margin = min(25, size // 12)
        spacing = min(400.0, 2.0 * size)  # metres between scar heads
        blocked = (self.cloud > 0.01) | (self.shadow > 0.01) | ~self.valid10
        blocked |= self.fractions["water"] > 0
        blocked = ndimage.maximum_filter(blocked, size=min(41, size // 6 * 2 + 1))
        candidates = (self.slope >= 32.0) & ~blocked
        candidates[:margin] = candidates[-margin:] = False
        candidates[:, :margin] = candidates[:, -margin:] = False
        idx = np.flatnonzero(candidates)
        # 6-12 scars on scenes of about 5 km and more, proportionally fewer on smaller ones.
        n_target = max(1, round(int(rng.integers(6, 13)) * min(1.0, (size / 480.0) ** 2)))
        if idx.size == 0:
            log.warning("demo scene: no steep slope free of clouds for landslide scars")
            return
        order = rng.permutation(idx)[:600]
        roughness = _smooth_noise(rng, (size, size), 2.0)
        for flat in order:
            if len(self.scars) >= n_target:
                break
            r, c = divmod(int(flat), size)
            head = np.array([self.x[c], self.y[r]])
            if any(np.hypot(*(head - s.path[0])) < spacing for s in self.scars):
                continue
            scar = self._trace(rng, head, len(self.scars) + 1)
            if scar is None:
                continue
            frac, window = self._rasterize(scar, roughness)
            mask = frac >= 0.5
            area = int(mask.sum())
            if area < 25:
                continue
            ws = (slice(window[0], window[1]), slice(window[2], window[3]))
            if blocked[ws][mask].any() or self.slope[ws][mask].mean() < 27.0:
                continue
            if (self.scar_labels[ws] > 0).any() and ndimage.binary_dilation(mask, iterations=3)[self.scar_labels[ws] > 0].any():
                continue
            self.scars.append(scar)
            self.scar_fraction[ws] = np.maximum(self.scar_fraction[ws], frac)
            self.scar_labels[ws][mask] = scar.scar_id
            self.scar_brightness[ws][frac > 0] = rng.uniform(0.88, 1.12)
            self.scar_moisture[ws][frac > 0] = rng.uniform(0.0, 0.12)
        if len(self.scars) < n_target:
            log.warning("demo scene: painted %d landslide scars (wanted %d); the scene has few steep slopes",
                        len(self.scars), n_target)

    def _gradient_at(self, x: float, y: float) -> tuple[float, float]:
        """Terrain gradient (east, north) at a point, bilinear between 10 m pixel centres."""
        col = (x - self.transform.c) / 10.0 - 0.5
        row = (self.transform.f - y) / 10.0 - 0.5
        c0 = min(max(int(math.floor(col)), 0), self.size - 2)
        r0 = min(max(int(math.floor(row)), 0), self.size - 2)
        fc, fr = min(max(col - c0, 0.0), 1.0), min(max(row - r0, 0.0), 1.0)
        out = []
        for grid in (self._dzdx, self._dzdn):
            top = grid[r0, c0] * (1 - fc) + grid[r0, c0 + 1] * fc
            bottom = grid[r0 + 1, c0] * (1 - fc) + grid[r0 + 1, c0 + 1] * fc
            out.append(float(top * (1 - fr) + bottom * fr))
        return out[0], out[1]

    def _trace(self, rng: np.random.Generator, head: np.ndarray, scar_id: int) -> Scar | None:
        """Follow the steepest descent from ``head`` for 200-600 m while the slope stays steep."""
        length = rng.uniform(200.0, 600.0)
        step = 5.0
        points = [head]
        p = head.astype(np.float64)
        left, bottom, right, top = self.bounds
        travelled = 0.0
        while travelled < length:
            gx, gy = self._gradient_at(float(p[0]), float(p[1]))
            g = math.hypot(gx, gy)
            if math.degrees(math.atan(g)) < 18.0 and travelled > 60.0:
                break
            if g == 0:
                break
            p = p - step * np.array([gx, gy]) / g
            inset = min(200.0, 1.5 * self.size)
            if not (left + inset < p[0] < right - inset and bottom + inset < p[1] < top - inset):
                break
            points.append(p)
            travelled += step
        if travelled < 100.0:
            return None
        return Scar(scar_id, np.array(points), float(rng.uniform(25.0, 55.0)), travelled)

    def _rasterize(self, scar: Scar, roughness: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Fractional cover of a tongue around the path (narrow head, widest mid-way, fanned toe)."""
        n = len(scar.path)
        s = np.linspace(0.0, 1.0, n)
        radius = scar.half_width_m * (0.55 + 0.45 * np.sin(np.pi * np.minimum(s * 1.25, 1.0)) + 0.25 * s ** 3)
        pad = radius.max() + 30.0
        xmin, ymin = scar.path.min(axis=0) - pad
        xmax, ymax = scar.path.max(axis=0) + pad
        c0 = max(int((xmin - self.transform.c) // 10), 0)
        c1 = min(int((xmax - self.transform.c) // 10) + 1, self.size)
        r0 = max(int((self.transform.f - ymax) // 10), 0)
        r1 = min(int((self.transform.f - ymin) // 10) + 1, self.size)
        xs = self.x[c0:c1][np.newaxis, :, np.newaxis]
        ys = self.y[r0:r1][:, np.newaxis, np.newaxis]
        dist = np.hypot(xs - scar.path[:, 0], ys - scar.path[:, 1]) - radius
        signed = dist.min(axis=2) + 5.0 * roughness[r0:r1, c0:c1]
        frac = np.clip(0.5 - signed / 10.0, 0.0, 1.0).astype(np.float32)
        return frac, (r0, r1, c0, c1)

    # -- look-alikes ----------------------------------------------------------
    def _paint_lookalikes(self, rng: np.random.Generator) -> None:
        """Bare ground that is not a landslide: rock outcrops, gravel bars, roads, clear-cuts.

        Each kind gets a fraction field in :attr:`lookalikes` (0 within 3 pixels
        of a scar); the land cover fractions below are reduced to make room.
        Counts are a handful per kind on the default 1020 px scene, scaled with
        the area (at least one each). No snow: the patches gave no snow spectrum.
        """
        size = self.size
        shape = (size, size)
        X, Y = self.x[np.newaxis, :], self.y[:, np.newaxis]
        keep_out = ndimage.binary_dilation(self.scar_fraction > 0, iterations=3)
        clear = self.valid10 & (self.cloud < 0.01) & (self.shadow < 0.01)
        edge = 0.5 / 10.0  # fraction per metre across a soft 10 m edge
        area = (size / 1020.0) ** 2
        roughness = _smooth_noise(rng, shape, 2.0)

        def count(lo: int, hi: int) -> int:
            return max(1, round(int(rng.integers(lo, hi + 1)) * area))

        def place(name: str, n: int, centres: np.ndarray, draw: Any) -> None:
            """Draw shapes at random ``centres`` until ``n`` fit clear of scars and each other."""
            frac = np.zeros(shape, np.float32)
            taken = sum(self.lookalikes.values(), np.zeros(shape, np.float32)) > 0
            placed = 0
            for flat in rng.permutation(np.flatnonzero(centres))[:400]:
                if placed >= n:
                    break
                r, c = divmod(int(flat), size)
                shape_frac, window = draw(r, c)
                if shape_frac is None:
                    continue
                ws = (slice(window[0], window[1]), slice(window[2], window[3]))
                inside = shape_frac > 0
                if (keep_out[ws] & inside).any() or (taken[ws] & inside).any() or (frac[ws] > 0)[inside].any():
                    continue
                if int((shape_frac >= 0.5).sum()) < 6:
                    continue
                frac[ws] = np.maximum(frac[ws], shape_frac)
                placed += 1
            self.lookalikes[name] = frac

        def window_around(r: int, c: int, radius_px: int) -> tuple[int, int, int, int]:
            return (max(r - radius_px, 0), min(r + radius_px + 1, size),
                    max(c - radius_px, 0), min(c + radius_px + 1, size))

        # Rock outcrops: irregular blobs 60-300 m across on slopes >= 35 degrees, only where steep.
        def outcrop(r: int, c: int) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
            a, b = rng.uniform(30.0, 150.0), rng.uniform(25.0, 80.0)
            angle = rng.uniform(0, np.pi)
            win = window_around(r, c, int(a / 10) + 3)
            dx = self.x[win[2]:win[3]][np.newaxis, :] - self.x[c]
            dy = self.y[win[0]:win[1]][:, np.newaxis] - self.y[r]
            u = dx * math.cos(angle) + dy * math.sin(angle)
            v = -dx * math.sin(angle) + dy * math.cos(angle)
            signed = (np.hypot(u / a, v / b) - 1.0) * b + 8.0 * roughness[win[0]:win[1], win[2]:win[3]]
            frac = np.clip(0.5 - signed * edge, 0.0, 1.0) * (self.slope[win[0]:win[1], win[2]:win[3]] >= 28.0)
            parts, _ = ndimage.label(frac > 0, structure=np.ones((3, 3), bool))
            centre = parts[r - win[0], c - win[2]]
            if centre == 0:
                return None, win
            return np.where(parts == centre, frac, 0.0).astype(np.float32), win  # one piece

        place("rock", count(6, 10), (self.slope >= 35.0) & clear, outcrop)

        # Gravel bars: lenses 150-400 m long, 20-60 m wide, on one bank of the river, half in the channel.
        river = self.terrain.river_distance(X, Y)

        def gravel_bar(r: int, c: int) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
            length, width = rng.uniform(150.0, 400.0), rng.uniform(20.0, 60.0)
            side = 1.0 if rng.uniform() < 0.5 else -1.0
            win = window_around(r, c, int(length / 20) + 8)
            d = side * river[win[0]:win[1], win[2]:win[3]]
            along = np.hypot(self.x[win[2]:win[3]][np.newaxis, :] - self.x[c],
                             self.y[win[0]:win[1]][:, np.newaxis] - self.y[r]) / (length / 2)
            w = width * np.sqrt(np.clip(1.0 - along ** 2, 0.0, 1.0))
            frac = np.clip(np.minimum(d - 2.0, 2.0 + w - d) * edge + 0.5, 0.0, 1.0) * (along < 1.0)
            return frac.astype(np.float32), win

        place("gravel", count(4, 6), (np.abs(river) < 5.0) & clear, gravel_bar)

        # Clear-cuts: rotated rectangles 60-250 x 50-150 m, wholly in forest on slopes under 35 degrees.
        forest = (self.fractions["forest"] >= 1.0) & (self.slope < 35.0)

        def clearcut(r: int, c: int) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
            half_a, half_b = rng.uniform(30.0, 125.0), rng.uniform(25.0, 75.0)
            angle = rng.uniform(0, np.pi / 2)
            win = window_around(r, c, int(math.hypot(half_a, half_b) / 10) + 2)
            dx = self.x[win[2]:win[3]][np.newaxis, :] - self.x[c]
            dy = self.y[win[0]:win[1]][:, np.newaxis] - self.y[r]
            u = np.abs(dx * math.cos(angle) + dy * math.sin(angle))
            v = np.abs(-dx * math.sin(angle) + dy * math.cos(angle))
            frac = np.clip(0.5 - np.maximum(u - half_a, v - half_b) * edge, 0.0, 1.0)
            if not forest[win[0]:win[1], win[2]:win[3]][frac > 0].all():
                return None, win
            return frac.astype(np.float32), win

        place("clearcut", count(4, 8), forest & clear, clearcut)

        # Roads: 1-2 thin lines, 12-20 m wide with their cleared verges: one along the valley floor beside the river, one
        # winding across the scene; cut where they would come near a scar.
        roads = np.zeros(shape, np.float32)
        n_roads = int(rng.integers(1, 3))
        for i in range(n_roads):
            width = rng.uniform(12.0, 20.0)
            if i == 0:
                offset = (1.0 if rng.uniform() < 0.5 else -1.0) * rng.uniform(60.0, 120.0)
                across = river - offset
            else:
                angle = rng.uniform(0, np.pi)
                ca, sa = math.cos(angle), math.sin(angle)
                dx, dy = X - self.terrain.cx, Y - self.terrain.cy
                wave, phase = 2 * np.pi / rng.uniform(800.0, 2000.0), rng.uniform(0, 2 * np.pi)
                along = dx * ca + dy * sa
                across = -dx * sa + dy * ca - rng.uniform(-0.3, 0.3) * 10.0 * size \
                    - rng.uniform(40.0, 120.0) * np.sin(wave * along + phase)
            line = np.clip(0.5 - (np.abs(across) - width / 2) * edge, 0.0, 1.0)
            roads = np.maximum(roads, line.astype(np.float32))
        taken = sum(self.lookalikes.values(), np.zeros(shape, np.float32))
        roads = np.minimum(roads, 1.0 - taken)
        roads[keep_out | (self.fractions["water"] > 0)] = 0.0
        self.lookalikes["road"] = roads.astype(np.float32)

        total = sum(self.lookalikes.values(), np.zeros(shape, np.float32))
        total = np.clip(total, 0.0, 1.0)
        for name in ("forest", "meadow", "field", "water"):
            self.fractions[name] = (self.fractions[name] * (1.0 - total)).astype(np.float32)
        assert not (total > 0)[self.scar_fraction > 0].any()

    # -- radiometry ---------------------------------------------------------
    def classes_scl(self) -> np.ndarray:
        """Scene classification at 10 m (before aggregation to 20/60 m)."""
        f = self.fractions
        scl = np.full((self.size, self.size), 4, np.uint8)
        scl[(f["field"] > 0.5) | (self.scar_fraction >= 0.5) | (self.lookalike_fraction() > 0.5)] = 5
        scl[f["water"] >= 0.5] = 6
        scl[self.cos_incidence < 0.12] = 2
        scl[self.shadow > 0.3] = 3
        scl[self.cloud > 0.2] = 8
        scl[self.cloud > 0.6] = 9
        return scl

    def scl(self, res: int) -> np.ndarray:
        """SCL at ``res`` m: majority of the 10 m classes (clouds win ties), 0 outside the swath."""
        classes = self.classes_scl()
        factor = res // 10
        codes = np.arange(12)
        priority = np.array([0, 0, 1, 5, 2, 3, 4, 0, 6, 7, 0, 0]) * 1e-3
        best = None
        best_score = None
        for code in codes:
            if not (classes == code).any():
                continue
            score = _block_mean((classes == code).astype(np.float32), factor) + priority[code]
            if best is None:
                best, best_score = np.full(score.shape, code, np.uint8), score
            else:
                better = score > best_score
                best[better] = code
                best_score = np.where(better, score, best_score)
        assert best is not None
        best[~self.swath_valid(res)] = 0
        return best

    def reflectance(self, band: str, product: Product = "L2A", res: int | None = None) -> np.ndarray:
        """Reflectance of ``band`` at its native (or given) resolution, as written (noise included).

        L2A: surface reflectance; L1C: top of atmosphere. NaN outside the swath.
        """
        col = {name: i for i, name in enumerate(_CLASSES)}
        spec = SPECTRA[band]
        f = self.fractions
        la = self.lookalikes  # zero wherever a scar is
        vig = self.vigour ** _VIGOUR_WEIGHT[band]
        swir = band in ("B11", "B12")
        scar = self.scar_fraction
        reveg = self.revegetation * scar
        soil = scar - reveg
        ground = (
            (f["forest"] * (1 - scar) + reveg) * spec[col["forest"]] * self.canopy * vig
            + f["meadow"] * (1 - scar) * spec[col["meadow"]] * vig
            + f["field"] * (1 - scar) * spec[col["bare"]] * self.soil_texture
            + (la["gravel"] + la["road"] + la["clearcut"]) * spec[col["bare"]] * self.soil_texture
            + la["rock"] * spec[col["rock"]] * self.soil_texture
            + soil * spec[col["scar"]] * self.scar_brightness * self.soil_texture
            * (1 - self.scar_moisture * (2.0 if swir else 0.5))
        ) * self.illumination + f["water"] * (1 - scar) * spec[col["water"]]
        ground = ground * (1.0 - 0.7 * self.shadow)
        if product == "L1C":
            path, trans = _ATMOSPHERE[band]
            ground = path + trans * ground
        value = (1.0 - self.cloud) * ground + self.cloud * spec[col["cloud"]]
        native = S2_BANDS[band] if res is None else res
        out = _block_mean(value.astype(np.float32), native // 10)
        noise_rng = np.random.default_rng([self.seed, 1, BAND_IDS[band], native])
        out = out + noise_rng.normal(0.0, _NOISE_SIGMA, out.shape).astype(np.float32)
        out[~self.swath_valid(native)] = np.nan
        return out

    def lookalike_fraction(self) -> np.ndarray:
        """Cover of all look-alikes (rock, gravel, road, clear-cut) per 10 m pixel, 0..1."""
        total = sum(self.lookalikes.values(), np.zeros((self.size, self.size), np.float32))
        return np.clip(total, 0.0, 1.0).astype(np.float32)

    def truth_mask(self) -> np.ndarray:
        """1 where a scar covers at least half of the 10 m pixel."""
        return (self.scar_labels > 0).astype(np.uint8)


def make_scene(size: int = 1020, seed: int = 0) -> DemoScene:
    """Build the synthetic scene in memory (deterministic for ``seed``)."""
    return DemoScene(size, seed)


# ---------------------------------------------------------------------------
# Writing the demo directory
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoPaths:
    """What :func:`write_demo_data` wrote."""

    safe: Path
    dem: Path
    scene_yaml: Path
    truth_mask: Path
    truth_scars: Path


def _resample_reflectance(native: np.ndarray, native_res: int, res: int) -> np.ndarray:
    """Copy of a band at another resolution: block mean down, nearest up (NaN propagates)."""
    if res == native_res:
        return native
    if res > native_res:
        return _block_mean(native, res // native_res)
    factor = native_res // res
    return np.repeat(np.repeat(native, factor, axis=0), factor, axis=1)


def _tci(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    rgb = np.stack([r, g, b])
    nodata = ~np.isfinite(rgb).all(axis=0)
    out = np.clip(np.rint(np.nan_to_num(rgb) * 255.0 / 0.25), 1, 255).astype(np.uint8)
    out[:, nodata] = 0
    return out


def _scene_layers(scene: DemoScene, product: Product, baseline: str) -> dict[str, RasterLayer]:
    layers: dict[str, RasterLayer] = {}
    crs = scene.crs
    bands = PRODUCT_BANDS[product]
    native = {b: scene.reflectance(b, product) for b in bands}
    if product == "L1C":
        for b in bands:
            layers[b] = RasterLayer(reflectance_to_dn(native[b], baseline), scene.grid(S2_BANDS[b])[0], crs)
        layers["TCI"] = RasterLayer(_tci(native["B04"], native["B03"], native["B02"]), scene.grid(10)[0], crs)
        return layers
    for res, names in L2A_RESOLUTION_LAYERS.items():
        transform = scene.grid(res)[0]
        valid = scene.swath_valid(res)
        refl = {b: _resample_reflectance(native[b], S2_BANDS[b], res) for b in names if b in native}
        for b, r in refl.items():
            layers[f"{b}_{res}m"] = RasterLayer(reflectance_to_dn(r, baseline), transform, crs)
        factor = res // 10
        aot = np.where(valid, np.rint(_block_mean(scene.aot, factor) * AOT_QUANTIFICATION), 0)
        wvp = np.where(valid, np.rint(_block_mean(scene.wvp, factor) * WVP_QUANTIFICATION), 0)
        layers[f"AOT_{res}m"] = RasterLayer(aot.astype(np.uint16), transform, crs)
        layers[f"WVP_{res}m"] = RasterLayer(wvp.astype(np.uint16), transform, crs)
        layers[f"TCI_{res}m"] = RasterLayer(_tci(refl["B04"], refl["B03"], refl["B02"]), transform, crs)
        if "SCL" in names:
            layers[f"SCL_{res}m"] = RasterLayer(scene.scl(res), transform, crs)
    return layers


def _write_dem(scene: DemoScene, path: Path, rng: np.random.Generator) -> None:
    """DEM in EPSG:4326 at 1 arc-second, int16, nodata -32768, a few voids."""
    arcsec = 1.0 / 3600.0
    to_ll = Transformer.from_crs(scene.crs, "EPSG:4326", always_xy=True)
    west, south, east, north = to_ll.transform_bounds(*scene.bounds, densify_pts=21)
    margin = 0.01
    west = math.floor((west - margin) / arcsec) * arcsec
    south = math.floor((south - margin) / arcsec) * arcsec
    east = math.ceil((east + margin) / arcsec) * arcsec
    north = math.ceil((north + margin) / arcsec) * arcsec
    cols = round((east - west) / arcsec)
    rows = round((north - south) / arcsec)
    transform = Affine(arcsec, 0.0, west, 0.0, -arcsec, north)
    lon = west + arcsec * (np.arange(cols) + 0.5)
    lat = north - arcsec * (np.arange(rows) + 0.5)
    lon2, lat2 = np.meshgrid(lon, lat)
    to_utm = Transformer.from_crs("EPSG:4326", scene.crs, always_xy=True)
    x, y = to_utm.transform(lon2, lat2)
    dem = np.rint(scene.terrain.elevation(x, y)).astype(np.int16)
    # Voids: small clusters, as radar DEMs have on steep slopes.
    left, bottom, right, top = scene.bounds
    inside = (x > left) & (x < right) & (y > bottom) & (y < top)
    rr, cc = np.nonzero(inside)
    for k in rng.choice(rr.size, size=5, replace=False):
        radius = rng.uniform(0.8, 2.5)
        r0, c0 = rr[k], cc[k]
        yy, xx = np.ogrid[:rows, :cols]
        dem[(yy - r0) ** 2 + (xx - c0) ** 2 <= radius ** 2] = -32768
    with rasterio.open(
        path, "w", driver="GTiff", width=cols, height=rows, count=1, dtype="int16",
        crs="EPSG:4326", transform=transform, nodata=-32768, compress="deflate",
        tiled=True, blockxsize=256, blockysize=256,
    ) as dst:
        dst.write(dem, 1)
        dst.update_tags(AREA_OR_POINT="Area", SOURCE="synthetic demo terrain (pipeline.demo.synthetic)")
        dst.set_band_description(1, "elevation (m)")


def _write_truth(scene: DemoScene, mask_path: Path, gpkg_path: Path) -> None:
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape
    from shapely.ops import unary_union

    with rasterio.open(
        mask_path, "w", driver="GTiff", width=scene.size, height=scene.size, count=1, dtype="uint8",
        crs=scene.crs, transform=scene.transform, compress="deflate", tiled=True,
        blockxsize=256, blockysize=256,
    ) as dst:
        dst.write(scene.truth_mask(), 1)
        dst.set_band_description(1, "landslide scar (1) or not (0)")
    labels = scene.scar_labels
    parts: dict[int, list[Any]] = {}
    for geom, value in shapes(labels, mask=labels > 0, transform=scene.transform):
        parts.setdefault(int(value), []).append(shape(geom))
    rows = []
    for scar in scene.scars:
        geom = unary_union(parts.get(scar.scar_id, []))
        sel = labels == scar.scar_id
        rows.append({
            "scar_id": scar.scar_id,
            "area_m2": float(sel.sum() * 100.0),
            "length_m": round(scar.length_m, 1),
            "mean_slope_deg": round(float(scene.slope[sel].mean()), 2),
            "geometry": geom,
        })
    if rows:
        gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=scene.crs.to_wkt())
    else:
        gdf = gpd.GeoDataFrame(
            {"scar_id": np.array([], np.int64), "area_m2": np.array([], float),
             "length_m": np.array([], float), "mean_slope_deg": np.array([], float)},
            geometry=gpd.GeoSeries([], crs=scene.crs.to_wkt()),
        )
    gdf.to_file(gpkg_path, layer="truth_scars", driver="GPKG")


def _scene_yaml(safe_name: str) -> str:
    return (
        "# Demo scene written by `python -m pipeline demo-data`; paths are relative to this file.\n"
        "scene:\n"
        f"  safe: {safe_name}\n"
        "dem:\n"
        "  path: dem.tif\n"
        "output:\n"
        "  dir: output\n"
        "reference:                # the painted scars: the run prints object recall and precision\n"
        "  path: truth_scars.gpkg\n"
        "  iou: 0.1\n"
    )


def write_demo_data(
    out_dir: Path,
    *,
    size: int = 1020,
    seed: int = 0,
    product: Product = "L2A",
    baseline: str = "05.10",
    force: bool = False,
) -> DemoPaths:
    """Write the demo product, DEM, truth and ``scene.yaml`` into ``out_dir``.

    ``size`` is the scene side in 10 m pixels (a multiple of 6). The directory
    is assembled beside ``out_dir`` and renamed into place at the end; an
    existing non-empty ``out_dir`` is refused unless ``force``.
    """
    if product not in ("L2A", "L1C"):
        raise ConfigError(f"demo product {product!r}: expected 'L2A' or 'L1C'")
    parse_baseline(baseline)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputError(f"{out_dir}: directory is not empty; choose another directory or pass --force to replace it")
    scene = make_scene(size, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        layers = _scene_layers(scene, product, baseline)
        valid = scene.valid10
        scl10 = scene.classes_scl()
        n_valid = max(int(valid.sum()), 1)
        percentages = {int(c): 100.0 * float(((scl10 == c) & valid).sum()) / n_valid for c in range(1, 12)}
        percentages[0] = 100.0 * (1.0 - valid.mean())
        cloud_cover = percentages[8] + percentages[9]
        safe = write_safe(
            tmp, layers, product=product, baseline=baseline,
            footprint_lonlat=scene.footprint_lonlat(), cloud_cover=cloud_cover,
            scl_percentages=percentages,
        )
        _write_dem(scene, tmp / "dem.tif", np.random.default_rng([seed, 2]))
        _write_truth(scene, tmp / "truth_mask.tif", tmp / "truth_scars.gpkg")
        (tmp / "scene.yaml").write_text(_scene_yaml(safe.name), encoding="utf-8")
        os.chmod(tmp, 0o755)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = DemoPaths(
        safe=out_dir / safe.name,
        dem=out_dir / "dem.tif",
        scene_yaml=out_dir / "scene.yaml",
        truth_mask=out_dir / "truth_mask.tif",
        truth_scars=out_dir / "truth_scars.gpkg",
    )
    log.info("wrote demo %s (%d scars) to %s", product, len(scene.scars), out_dir)
    return paths


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing an existing directory only after success."""
    old: Path | None = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    try:
        os.replace(tmp, out_dir)
    except OSError as exc:
        if old is not None:
            os.replace(old, out_dir)
        raise OutputError(f"{out_dir}: cannot move the demo data into place: {exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m pipeline demo-data``."""
    parser.add_argument("out_dir", type=Path, help="directory to write (must be new or empty unless --force)")
    parser.add_argument("--size", type=int, default=1020,
                        help="scene side in 10 m pixels, a multiple of 6 (default: 1020, about 10 km)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    parser.add_argument("--product", choices=("L2A", "L1C"), default="L2A", help="product level (default: L2A)")
    parser.add_argument("--baseline", default="05.10",
                        help="processing baseline; 04.00 and later carry the -1000 DN offset (default: 05.10)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty directory")


def cli_demo(args: argparse.Namespace) -> int:
    """Run ``demo-data``: write the demo input and print what was written."""
    try:
        paths = write_demo_data(
            args.out_dir, size=args.size, seed=args.seed, product=args.product,
            baseline=args.baseline, force=args.force,
        )
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Sentinel-2 product: {paths.safe}")
    print(f"DEM (EPSG:4326):    {paths.dem}")
    print(f"truth mask:         {paths.truth_mask}")
    print(f"truth polygons:     {paths.truth_scars}")
    print(f"scene config:       {paths.scene_yaml}")
    print(f"run it with:        python -m pipeline run {paths.scene_yaml}")
    return 0
