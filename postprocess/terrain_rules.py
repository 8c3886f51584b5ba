"""Step 5 of the cleaning, the optional terrain rules: objects dropped by their mean slope, NDVI or NDWI.

An object is dropped when its mean slope is below ``min_mean_slope_deg``,
its mean NDVI above ``max_mean_ndvi`` (vegetation) or its mean NDWI above
``max_mean_ndwi`` (open water: turbid rivers and lakes are bright like fresh
scars). An object whose slope (or NDVI, or NDWI) is unknown on all its pixels
is kept.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from pipeline.core.config import PostprocessSection


def terrain_keep(
    mean_slope: np.ndarray | None,
    mean_ndvi: np.ndarray | None,
    params: PostprocessSection,
    mean_ndwi: np.ndarray | None = None,
) -> np.ndarray | None:
    """Objects kept by the terrain rules (None when no rule applies); an unknown (NaN) mean keeps."""
    keep: np.ndarray | None = None
    if params.min_mean_slope_deg is not None and mean_slope is not None:
        keep = ~(mean_slope < params.min_mean_slope_deg)
    for limit, mean in ((params.max_mean_ndvi, mean_ndvi), (params.max_mean_ndwi, mean_ndwi)):
        if limit is not None and mean is not None:
            above = mean > limit
            keep = ~above if keep is None else keep & ~above
    return keep


def _normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    s = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s != 0, (a - b) / s, np.nan).astype(np.float32)


def ndvi(red: da.Array, nir: da.Array) -> da.Array:
    """(NIR - red) / (NIR + red); NaN where the sum is zero."""
    return da.map_blocks(_normalized_difference, nir, red, dtype=np.float32)


def ndwi(green: da.Array, nir: da.Array) -> da.Array:
    """McFeeters' water index (green - NIR) / (green + NIR); NaN where the sum is zero."""
    return da.map_blocks(_normalized_difference, green, nir, dtype=np.float32)
