"""Write a Sentinel-2 ``.SAFE`` product in the ESA layout from arrays (the demo's and the tests')."""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS

from pipeline.core.errors import OutputError
from pipeline.demo.safe_metadata import inspire_xml, manifest_xml, product_metadata_xml, tile_metadata_xml
from pipeline.demo.safe_naming import SafeNaming
from pipeline.demo.sentinel2 import (
    BAND_IDS,
    DEFAULT_SENSING_TIME,
    DEFAULT_TILE,
    PRODUCT_BANDS,
    Product,
    parse_baseline,
)

log = logging.getLogger(__name__)

#: Order of the layers within one resolution, as in real products: bands, then TCI, AOT, WVP, SCL.
_LAYER_ORDER = {**{band: i for i, band in enumerate(BAND_IDS)}, "TCI": 100, "AOT": 101, "WVP": 102, "SCL": 103}


class RasterLayer(NamedTuple):
    """One raster to put in a product: array (rows, cols) or (bands, rows, cols), transform, CRS."""

    data: np.ndarray
    transform: Affine
    crs: CRS | str


@dataclass(frozen=True)
class ProductSummary:
    """What the product metadata says about the whole scene.

    ``footprint_lonlat``: the imaged area as (lon, lat) corners; ``None``
    takes the extent of the finest layer. ``scl_percentages``: SCL class ->
    percentage of the scene (L2A ``Image_Content_QI``).
    """

    footprint_lonlat: Sequence[tuple[float, float]] | None = None
    cloud_cover: float = 0.0
    scl_percentages: Mapping[int, float] | None = None


class _Entry(NamedTuple):
    layer: str
    res: int
    relpath: str
    raster: RasterLayer


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


def write_safe(
    parent: Path,
    layers: Mapping[str, RasterLayer | tuple[np.ndarray, Affine, CRS | str]],
    *,
    product: Product = "L2A",
    baseline: str = "05.10",
    sensing_time: dt.datetime = DEFAULT_SENSING_TIME,
    tile: str = DEFAULT_TILE,
    summary: ProductSummary | None = None,
) -> Path:
    """Write a Sentinel-2 ``.SAFE`` product in the ESA layout into ``parent``; return its path.

    ``layers`` maps a layer key to ``(array, transform, crs)``. Keys are band
    names (``"B02"``), ``"SCL"``, ``"AOT"``, ``"WVP"``, ``"TCI"``, optionally
    with a resolution suffix (``"B02_20m"``) to add the resampled copies a
    real L2A product carries. Nothing is resampled: each array is written
    as given, at the resolution of its transform:

    - L2A: ``GRANULE/L2A_T<tile>_A<orbit>_<time>/IMG_DATA/R<res>m/T<tile>_<time>_<layer>_<res>m.jp2``
    - L1C: ``GRANULE/L1C_T<tile>_A<orbit>_<time>/IMG_DATA/T<tile>_<time>_<layer>.jp2``

    Band arrays must be uint16 DN (use :func:`~pipeline.demo.sentinel2.reflectance_to_dn`),
    SCL uint8, TCI uint8 with three bands. Also written: ``MTD_MSIL2A.xml`` /
    ``MTD_MSIL1C.xml`` (baseline, quantification, offsets from 04.00 on,
    the IMAGE_FILE list, what ``summary`` says), ``GRANULE/<id>/MTD_TL.xml``
    (tile geocoding), ``manifest.safe`` and the empty auxiliary folders of a
    real product.
    """
    if product not in ("L2A", "L1C"):
        raise ValueError(f"product {product!r}: expected 'L2A' or 'L1C'")
    parse_baseline(baseline)
    if sensing_time.tzinfo is None:
        sensing_time = sensing_time.replace(tzinfo=dt.UTC)
    naming = SafeNaming(product, baseline, sensing_time, tile)
    entries, crs = _checked_entries(layers, naming)
    root = _make_product_folders(Path(parent), naming)
    in_file_order = sorted(entries, key=lambda e: (e.res, _LAYER_ORDER[e.layer]))
    geocoding = _write_layers(root, in_file_order)
    summary = summary or ProductSummary()
    footprint = summary.footprint_lonlat
    if footprint is None:
        footprint = _footprint_of(geocoding, crs)
    mtd_name = f"MTD_MSI{product}.xml"
    (root / mtd_name).write_bytes(product_metadata_xml(
        naming, [e.relpath for e in in_file_order], footprint_lonlat=footprint,
        cloud_cover=summary.cloud_cover, scl_percentages=summary.scl_percentages,
    ))
    (root / "GRANULE" / naming.granule_name / "MTD_TL.xml").write_bytes(tile_metadata_xml(naming, crs, geocoding))
    (root / "INSPIRE.xml").write_bytes(inspire_xml())
    # The manifest lists the files in the order of ``layers``.
    (root / "manifest.safe").write_bytes(manifest_xml([mtd_name, *(f"{e.relpath}.jp2" for e in entries)]))
    log.debug("wrote %s with %d layers", root, len(entries))
    return root


def _checked_entries(
    layers: Mapping[str, RasterLayer | tuple[np.ndarray, Affine, CRS | str]], naming: SafeNaming,
) -> tuple[list[_Entry], CRS]:
    """The layers as product entries, in the order given, each checked against what the product can hold."""
    product = naming.product
    allowed = set(PRODUCT_BANDS[product]) | ({"SCL", "AOT", "WVP", "TCI"} if product == "L2A" else {"TCI"})
    entries: list[_Entry] = []
    crs0: CRS | None = None
    for key, value in layers.items():
        entry = _checked_entry(key, RasterLayer(*value), naming, allowed)
        crs = CRS.from_user_input(entry.raster.crs)
        if crs0 is None:
            crs0 = crs
        elif crs != crs0:
            raise ValueError(f"layer {key!r}: CRS {crs} differs from the other layers' {crs0}")
        entries.append(entry._replace(raster=entry.raster._replace(crs=crs)))
    if not entries or crs0 is None:
        raise ValueError("write_safe needs at least one layer")
    relpaths = [e.relpath for e in entries]
    if len(set(relpaths)) != len(relpaths):
        raise ValueError(f"two layers map to the same file in an {product} product: {sorted(relpaths)}")
    return entries, crs0


def _checked_entry(key: str, raster: RasterLayer, naming: SafeNaming, allowed: set[str]) -> _Entry:
    """One layer's entry; raises ``ValueError`` for a layer, resolution, dtype or shape the product cannot hold."""
    layer, suffix_res = _split_layer_key(key)
    if layer not in allowed:
        raise ValueError(
            f"layer {key!r} cannot be part of an {naming.product} product; expected one of {', '.join(sorted(allowed))}"
        )
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
    return _Entry(layer, res, naming.image_file(layer, res), RasterLayer(data, raster.transform, raster.crs))


def _make_product_folders(parent: Path, naming: SafeNaming) -> Path:
    """The new product folder with the granule and auxiliary folders of a real product."""
    root = parent / naming.product_name
    if root.exists():
        raise OutputError(f"{root}: product directory already exists")
    granule = root / "GRANULE" / naming.granule_name
    for sub in ("AUX_DATA", "QI_DATA", "IMG_DATA"):
        (granule / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("DATASTRIP", "HTML", "rep_info"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def _write_layers(root: Path, entries: Sequence[_Entry]) -> dict[int, tuple[float, float, int, int]]:
    """Write each entry's JPEG 2000 file; return the tile geocoding, resolution -> (ULX, ULY, rows, cols)."""
    geocoding: dict[int, tuple[float, float, int, int]] = {}
    for layer, res, rel, raster in entries:
        _write_jp2(root / f"{rel}.jp2", raster.data, raster.transform, raster.crs)
        rows, cols = raster.data.shape[-2:]
        if layer != "TCI":
            geocoding.setdefault(res, (raster.transform.c, raster.transform.f, rows, cols))
    return geocoding


def _footprint_of(geocoding: Mapping[int, tuple[float, float, int, int]], crs: CRS) -> list[tuple[float, float]]:
    """(lon, lat) corners of the finest resolution's extent."""
    res0 = min(geocoding)
    ulx, uly, rows, cols = geocoding[res0]
    xs = [ulx, ulx + cols * res0, ulx + cols * res0, ulx]
    ys = [uly, uly, uly - rows * res0, uly - rows * res0]
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    return list(zip(lon, lat, strict=True))
