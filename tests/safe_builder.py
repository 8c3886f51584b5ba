"""Build Sentinel-2 SAFE products from arrays, for tests.

The layout, file names and metadata XML are the ones the demo input writes
(:func:`pipeline.demo.synthetic.write_safe`), which follow the ESA products: only the
pixels come from the caller. Nothing is resampled: each array is written at
the resolution of its transform, in that resolution's folder (L2A
``IMG_DATA/R<res>m/..._<band>_<res>m.jp2``, L1C ``IMG_DATA/..._<band>.jp2``).

    safe = build_safe(tmp_path, {"B04": (dn, transform, "EPSG:32633")}, baseline="03.01")
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from pipeline.demo.safe_writer import RasterLayer, write_safe
from pipeline.demo.sentinel2 import (
    DEFAULT_SENSING_TIME,
    QUANTIFICATION,
    RADIO_OFFSET,
    has_radiometric_offset,
    reflectance_to_dn,
)

__all__ = ["build_safe", "dn_offset", "reflectance_to_dn", "decode_dn"]

BandInput = tuple[np.ndarray, Affine, CRS | str]


def dn_offset(baseline: str) -> float:
    """The additive offset a product of ``baseline`` declares (-1000 from 04.00 on, else 0)."""
    return RADIO_OFFSET if has_radiometric_offset(baseline) else 0.0


def decode_dn(dn: np.ndarray, baseline: str) -> np.ndarray:
    """Reflectance from DN the way the metadata says: (DN + offset) / 10000, NaN where DN is 0."""
    refl = (dn.astype(np.float64) + dn_offset(baseline)) / QUANTIFICATION
    return np.where(dn == 0, np.nan, refl)


def _sensing_time(date: dt.date | dt.datetime | None) -> dt.datetime:
    if date is None:
        return DEFAULT_SENSING_TIME
    if isinstance(date, dt.datetime):
        return date if date.tzinfo is not None else date.replace(tzinfo=dt.UTC)
    return dt.datetime.combine(date, DEFAULT_SENSING_TIME.timetz())


def build_safe(
    tmp_dir: Path,
    bands: Mapping[str, BandInput],
    *,
    product: str = "L2A",
    baseline: str = "05.10",
    scl: BandInput | None = None,
    date: dt.date | dt.datetime | None = None,
    tile: str = "54TWN",
) -> Path:
    """Write a SAFE product into ``tmp_dir`` from ``bands`` and return its ``.SAFE`` path.

    ``bands`` maps band names (``"B02"``, ``"B8A"``; ``"B02_20m"`` for an
    extra resampled copy in an L2A product) to ``(array, transform, crs)``.
    Integer arrays are written as DN unchanged (uint16); floating arrays are
    taken as reflectance and encoded for ``baseline`` (NaN -> DN 0). ``scl``
    (L2A only) is the scene classification, written as uint8. ``date``
    (a date or a datetime) sets the sensing time in names and metadata.
    """
    layers: dict[str, RasterLayer] = {}
    for name, (data, transform, crs) in bands.items():
        arr = np.asarray(data)
        if np.issubdtype(arr.dtype, np.floating):
            arr = reflectance_to_dn(arr, baseline)
        elif arr.dtype != np.uint16:
            if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
                raise ValueError(f"band {name}: DN values must fit in uint16")
            arr = arr.astype(np.uint16)
        layers[name] = RasterLayer(arr, transform, crs)
    if scl is not None:
        data, transform, crs = scl
        arr = np.asarray(data)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise ValueError("SCL values must fit in uint8")
        layers["SCL"] = RasterLayer(arr.astype(np.uint8), transform, crs)
    if product not in ("L2A", "L1C"):
        raise ValueError(f"product {product!r}: expected 'L2A' or 'L1C'")
    return write_safe(
        Path(tmp_dir), layers, product=product,  # type: ignore[arg-type]
        baseline=baseline, sensing_time=_sensing_time(date), tile=tile,
    )
