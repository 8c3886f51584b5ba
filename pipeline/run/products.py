"""Sentinel-2 products the regional job finds by itself, and those it leaves out with the reason.

A region's ``products`` section names where products arrive: folder globs of
SAFE products (``.SAFE`` folders or their ``.zip``) or of per-band folders,
and STAC ItemCollection files on disk (read with pystac; asset files must be
local). Each product is described from its own metadata without reading
pixels: sensing time, footprint (lon/lat), cloud cover, processing level.
A product is skipped, with the reason, when it was sensed outside the date
window, lies outside the region's area of interest, is cloudier than
``max_cloud_cover`` or is found twice (the same product name, zipped and not).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.configbase import glob_matches, has_glob, scene_id_from_name
from pipeline.core.errors import InputError

log = logging.getLogger(__name__)

#: ``S2B_MSIL2A_20180910T015651_N0206_R060_T54TWN_20180910T045350``: mission, level, sensing time
_SAFE_NAME = re.compile(r"^S2[A-D]_MSI(L1C|L2A)_(\d{8}T\d{6})_")
#: a date (and time) in a folder name: ``20180910`` or ``20180910T015651``
_NAME_DATE = re.compile(r"(?<!\d)(\d{8})(?:T(\d{6}))?(?!\d)")
_BAND_TOKEN = re.compile(r"(?<![A-Za-z0-9])(B0[1-9]|B1[0-2]|B8A)(?![0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class Product:
    """One product found, described from its metadata."""

    source: str                        # where it was found: its path, or ``<items.json>#<item id>``
    id: str                            # the scene id of its outputs
    kind: str                          # safe | safe_zip | bands_dir | stac
    path: Path | None = None           # the SAFE folder, the zip or the band folder
    sensing: dt.datetime | None = None
    footprint: Any = None              # shapely geometry in lon/lat, None when unknown
    cloud_cover: float | None = None   # percent, as the product states it
    level: str | None = None           # L1C | L2A
    bands: dict[str, Path] = field(default_factory=dict)  # STAC items: band -> local file
    scl: Path | None = None            # STAC items: the scene classification
    dn_offset: float = 0.0             # STAC items: reflectance = (DN + offset) / 10000


@dataclass(frozen=True)
class Skipped:
    """A product found and not used this night."""

    source: str
    reason: str
    id: str | None = None
    product: Product | None = None  # what its metadata said, when it could be read


@dataclass(frozen=True)
class Filters:
    """What a product must meet to be used."""

    start: dt.date | None = None
    end: dt.date | None = None
    max_cloud_cover: float | None = None
    aoi: Any = None                    # shapely geometry in lon/lat


def find_products(paths: list[Path], stac: list[Path], filters: Filters) -> tuple[list[Product], list[Skipped]]:
    """The products under the globs ``paths`` and in the STAC ItemCollections ``stac`` that pass
    ``filters`` (oldest first), and those skipped with their reasons."""
    found: list[Product] = []
    skipped: list[Skipped] = []
    for pattern in paths:
        matches = _glob(pattern)
        if not matches:
            log.info("products: %s matches nothing", pattern)
        for path in matches:
            try:
                found.append(describe_path(path))
            except InputError as exc:
                skipped.append(Skipped(str(path), f"unreadable: {exc}"))
    for items in stac:
        from pipeline.run.stac import stac_products

        more, bad = stac_products(items)
        found += more
        skipped += bad
    kept: list[Product] = []
    seen: dict[str, Product] = {}
    order = sorted(found, key=lambda p: (p.sensing is None, p.sensing or dt.datetime.min.replace(tzinfo=dt.UTC),
                                         p.id, p.kind != "safe", p.source))
    for product in order:
        reason = skip_reason(product, filters)
        if reason is None and product.id in seen:
            reason = f"the same product as {seen[product.id].source}"
        if reason is not None:
            skipped.append(Skipped(product.source, reason, product.id, product))
            continue
        seen[product.id] = product
        kept.append(product)
    return kept, skipped


def skip_reason(product: Product, filters: Filters) -> str | None:
    """Why ``product`` is not used under ``filters``; None when it is."""
    day = product.sensing.astimezone(dt.UTC).date() if product.sensing else None
    if (filters.start or filters.end) and day is None:
        return "no sensing time in its metadata or name: the date window cannot be checked"
    if filters.start and day is not None and day < filters.start:
        return f"sensed on {day}, before the window's start {filters.start}"
    if filters.end and day is not None and day > filters.end:
        return f"sensed on {day}, after the window's end {filters.end}"
    if filters.max_cloud_cover is not None and product.cloud_cover is not None \
            and product.cloud_cover > filters.max_cloud_cover:
        return f"cloud cover {product.cloud_cover:.1f} % above max_cloud_cover {filters.max_cloud_cover:g} %"
    if filters.aoi is not None and product.footprint is not None and not product.footprint.intersects(filters.aoi):
        return "its footprint does not intersect the area of interest"
    return None


def _glob(pattern: Path) -> list[Path]:
    if not has_glob(pattern):
        return [pattern] if pattern.exists() else []
    return glob_matches(pattern)


# -- one product on disk ------------------------------------------------------------------------
def describe_path(path: Path) -> Product:
    """A SAFE folder, a zipped SAFE product or a per-band folder, from its metadata; InputError when
    it is none of them or its metadata cannot be read."""
    if path.is_dir() and path.name.upper().endswith(".SAFE"):
        return _safe_folder(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        return _safe_zip(path)
    if path.is_dir():
        return _band_folder(path)
    raise InputError(f"{path}: not a .SAFE folder, a zipped SAFE product or a folder of band files")


def _safe_folder(path: Path) -> Product:
    from pipeline.io.safe_metadata import parse_safe_metadata

    mtd = [p for p in (path / "MTD_MSIL2A.xml", path / "MTD_MSIL1C.xml") if p.is_file()]
    if not mtd:
        raise InputError(f"{path}: no MTD_MSIL2A.xml or MTD_MSIL1C.xml")
    meta = parse_safe_metadata(mtd[0])
    return _from_metadata(str(path), path, "safe", path.name, meta)


def _safe_zip(path: Path) -> Product:
    from pipeline.io.safe_metadata import parse_safe_metadata

    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.SAFE/MTD_MSIL(1C|2A)\.xml", n, re.I)]
            if len(names) != 1:
                raise InputError(f"{path}: expected one <name>.SAFE/MTD_MSIL*.xml in the zip, found {len(names)}")
            info = zf.getinfo(names[0])
            if info.file_size > 50 * 2**20:
                raise InputError(f"{path}: {names[0]} is {info.file_size} bytes; not product metadata")
            content = zf.read(info)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a readable zip file ({exc})") from None
    meta = parse_safe_metadata(Path(path.name) / names[0], content)
    return _from_metadata(str(path), path, "safe_zip", names[0].split("/", 1)[0], meta)


def _from_metadata(source: str, path: Path, kind: str, name: str, meta: Any) -> Product:
    import shapely

    footprint = shapely.Polygon(meta.footprint_lonlat) if len(meta.footprint_lonlat) >= 3 else None
    if footprint is not None and not footprint.is_valid:
        footprint = shapely.make_valid(footprint)
    stem = name[: -len(".SAFE")] if name.upper().endswith(".SAFE") else name
    sensing = meta.start_time or _time_from_name(stem)
    return Product(source=source, id=scene_id_from_name((meta.product_uri or stem).removesuffix(".SAFE")),
                   kind=kind, path=path, sensing=sensing, footprint=footprint, cloud_cover=meta.cloud_cover,
                   level=meta.level)


def _time_from_name(name: str) -> dt.datetime | None:
    """The sensing time a product or folder name carries: the SAFE name's, else the first date."""
    safe = _SAFE_NAME.match(name)
    text = safe.group(2) if safe else None
    if text is None and (found := _NAME_DATE.search(name)):
        text = found.group(1) + "T" + (found.group(2) or "000000")
    if text is None:
        return None
    try:
        return dt.datetime.strptime(text, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _band_folder(path: Path) -> Product:
    """A folder of per-band files: the time and level from its name, the footprint from the bands'
    bounds; no cloud cover (the filter lets it through)."""
    files = [p for p in sorted(path.iterdir()) if p.is_file() and _BAND_TOKEN.search(p.name)
             and p.suffix.lower() in (".tif", ".tiff", ".jp2")]
    if not files:
        raise InputError(f"{path}: no band files (names with B02, B8A, ...; .tif, .tiff or .jp2)")
    level = "L2A" if re.search(r"L2A", path.name, re.I) else "L1C" if re.search(r"L1C", path.name, re.I) else None
    return Product(source=str(path), id=scene_id_from_name(path.name), kind="bands_dir", path=path,
                   sensing=_time_from_name(path.name), footprint=raster_footprint(files[0]), level=level)


def raster_footprint(path: Path) -> Any:
    """The bounds of a band file as a lon/lat polygon, opened as the run opens inputs (the input
    allow-list, metadata only); None when it cannot be used (the run then says why)."""
    import shapely
    from rasterio.crs import CRS

    from pipeline.io.raster_source import open_raster

    try:
        return shapely.box(*open_raster(path, "band file").bounds_in(CRS.from_epsg(4326)))
    except (InputError, ValueError):
        return None
