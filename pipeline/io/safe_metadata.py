"""Sentinel-2 product metadata (MTD_MSIL1C.xml / MTD_MSIL2A.xml): level, dates, DN scaling, band files."""

from __future__ import annotations

import datetime as dt
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.channels import canonical
from pipeline.core.errors import InputError
from pipeline.io.gdal import error_detail
from pipeline.io.xmlutil import find_text, local_name

log = logging.getLogger(__name__)

#: Band order of ``band_id`` attributes in Sentinel-2 product metadata.
_SAFE_BAND_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                    "B09", "B10", "B11", "B12")


@dataclass(frozen=True)
class SafeMetadata:
    """What the stacking stage needs from MTD_MSIL1C.xml / MTD_MSIL2A.xml."""

    level: str                        # "L1C" or "L2A"
    product_type: str | None          # e.g. "S2MSI2A"
    product_uri: str | None
    processing_baseline: str | None   # e.g. "04.00"
    start_time: dt.datetime | None
    quantification: float
    offsets: dict[str, float] = field(default_factory=dict)
    image_files: tuple[str, ...] = ()
    source: Path | None = None        # the MTD_MSIL*.xml file these come from
    cloud_cover: float | None = None  # Cloud_Coverage_Assessment, percent of the tile
    #: the swath's outline (``Product_Footprint``) as (lon, lat) pairs; empty when not stated
    footprint_lonlat: tuple[tuple[float, float], ...] = ()

    @property
    def acquisition_date(self) -> dt.date | None:
        return self.start_time.date() if self.start_time else None


def parse_safe_metadata(xml_path: Path, content: bytes | None = None) -> SafeMetadata:
    """Parse the product metadata file of an L1C or L2A SAFE product (``content``: its bytes, read
    from elsewhere, such as a zipped product; ``xml_path`` then only names it).

    Reads the product type, processing baseline, start time, the quantification
    value and the per-band additive offsets (``BOA_ADD_OFFSET`` for L2A,
    ``RADIO_ADD_OFFSET`` for L1C; products from baselines before 04.00 have
    none, which means 0), the cloud cover and the footprint.
    """
    level = "L2A" if "L2A" in xml_path.name.upper() else "L1C"
    try:
        root = ET.fromstring(content) if content is not None else ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{xml_path}: cannot parse product metadata ({error_detail(exc)})") from None
    offsets = _offsets(root, level, xml_path)
    quantification = _quantification(root, level, xml_path)
    start = _start_time(root, xml_path)
    images = tuple(el.text.strip() for el in root.iter()
                   if local_name(el.tag) in ("IMAGE_FILE", "IMAGE_FILE_2A") and el.text and el.text.strip())
    return SafeMetadata(
        level=level,
        product_type=find_text(root, "PRODUCT_TYPE"),
        product_uri=find_text(root, "PRODUCT_URI"),
        processing_baseline=find_text(root, "PROCESSING_BASELINE"),
        start_time=start,
        quantification=quantification,
        offsets=offsets,
        image_files=images,
        source=xml_path,
        cloud_cover=_cloud_cover(root, xml_path),
        footprint_lonlat=_footprint(root, xml_path),
    )


def _cloud_cover(root: ET.Element, xml_path: Path) -> float | None:
    """``Cloud_Coverage_Assessment`` (percent), None when missing or not a number (a warning)."""
    text = find_text(root, "Cloud_Coverage_Assessment")
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        log.warning("%s: Cloud_Coverage_Assessment is not a number: %r", xml_path, text)
        return None


def _footprint(root: ET.Element, xml_path: Path) -> tuple[tuple[float, float], ...]:
    """The ``Global_Footprint``'s ``EXT_POS_LIST`` (lat lon pairs in the file) as (lon, lat)."""
    text = find_text(root, "EXT_POS_LIST")
    if not text:
        return ()
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) < 6 or len(values) % 2:
        log.warning("%s: EXT_POS_LIST is not a list of latitude/longitude pairs", xml_path)
        return ()
    return tuple((values[i + 1], values[i]) for i in range(0, len(values), 2))


def _band_of_id(root: ET.Element, xml_path: Path) -> dict[str, str]:
    """``bandId`` -> band name, from the spectral information list when present."""
    band_of_id: dict[str, str] = {str(i): b for i, b in enumerate(_SAFE_BAND_ORDER)}
    for el in root.iter():
        if local_name(el.tag) == "Spectral_Information":
            bid, phys = el.get("bandId"), el.get("physicalBand")
            if bid is not None and phys:
                try:
                    band_of_id[bid] = canonical(phys)
                except ValueError:
                    log.warning("%s: unknown physicalBand %r ignored", xml_path, phys)
    return band_of_id


def _offsets(root: ET.Element, level: str, xml_path: Path) -> dict[str, float]:
    """Band name -> additive DN offset (``BOA_ADD_OFFSET`` for L2A, ``RADIO_ADD_OFFSET`` for L1C)."""
    band_of_id = _band_of_id(root, xml_path)
    offset_tag = "BOA_ADD_OFFSET" if level == "L2A" else "RADIO_ADD_OFFSET"
    offsets: dict[str, float] = {}
    for el in root.iter():
        if local_name(el.tag) == offset_tag and el.text:
            bid = el.get("band_id")
            if bid not in band_of_id:
                raise InputError(f"{xml_path}: {offset_tag} has unknown band_id {bid!r}")
            try:
                offsets[band_of_id[bid]] = float(el.text)
            except ValueError:
                raise InputError(f"{xml_path}: {offset_tag} band_id={bid}: not a number: {el.text!r}") from None
    return offsets


def _quantification(root: ET.Element, level: str, xml_path: Path) -> float:
    """The quantification value (DN per unit of reflectance); 10000 when the metadata has none."""
    tag = "BOA_QUANTIFICATION_VALUE" if level == "L2A" else "QUANTIFICATION_VALUE"
    text = find_text(root, tag)
    if text is None:
        log.warning("%s: no %s, assuming 10000", xml_path, tag)
        return 10000.0
    try:
        quantification = float(text)
    except ValueError:
        raise InputError(f"{xml_path}: {tag}: not a number: {text!r}") from None
    if quantification <= 0:
        raise InputError(f"{xml_path}: {tag} must be positive, got {quantification}")
    return quantification


def _start_time(root: ET.Element, xml_path: Path) -> dt.datetime | None:
    """The product's start time, None when it has none or it cannot be parsed (a warning)."""
    text = find_text(root, "PRODUCT_START_TIME", "DATATAKE_SENSING_START")
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        log.warning("%s: cannot parse PRODUCT_START_TIME %r", xml_path, text)
        return None
