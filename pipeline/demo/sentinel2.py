"""Sentinel-2 product facts the demo writes by: band ids, product levels, DN encoding, the default acquisition."""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

import numpy as np

from pipeline.core.errors import ConfigError

Product = Literal["L2A", "L1C"]

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
QUANTIFICATION = 10000.0
RADIO_OFFSET = -1000.0
AOT_QUANTIFICATION = 1000.0
WVP_QUANTIFICATION = 1000.0

#: Default acquisition: Sentinel-2B over Hokkaido, 15 June 2023.
DEFAULT_SENSING_TIME = dt.datetime(2023, 6, 15, 1, 56, 19, 24000, tzinfo=dt.UTC)
DEFAULT_TILE = "54TWN"
#: Default scene origin: a 60 m multiple inside tile 54TWN (UL 499980, 4800000).
DEFAULT_ORIGIN = (499980.0 + 60 * 1250, 4800000.0 - 60 * 1150)
DEFAULT_CRS = "EPSG:32654"
#: Sun position at the default acquisition (degrees).
SUN_ZENITH = 24.0
SUN_AZIMUTH = 152.0


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
    reflectance to DN 1, as real products do.
    """
    offset = RADIO_OFFSET if has_radiometric_offset(baseline) else 0.0
    refl = np.asarray(reflectance, dtype=np.float64)
    nodata = ~np.isfinite(refl)
    dn = np.rint(np.where(nodata, 0.0, refl) * QUANTIFICATION - offset)
    dn = np.clip(dn, 1, 65534)
    dn[nodata] = 0
    return dn.astype(np.uint16)
