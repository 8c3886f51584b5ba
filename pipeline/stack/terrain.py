"""Terrain slope with Horn's method, in degrees.

Horn (1981) weights the eight neighbours of each pixel::

    a b c
    d e f      dz/dx = ((c + 2f + i) - (a + 2d + g)) / (8 * xres)
    g h i      dz/dy = ((g + 2h + i) - (a + 2b + c)) / (8 * yres)

    slope = atan(sqrt(dz/dx^2 + dz/dy^2)) in degrees

This is the formula of ``gdaldem slope``. Voids (NaN) stay NaN; a neighbour
that is a void or lies outside the raster is replaced by the centre value,
which is what ``gdaldem slope -compute_edges`` does, so every non-void pixel
gets a slope. The dask wrapper computes it block by block with a one-pixel
halo and gives the same result as the whole-array function.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np

__all__ = ["horn_slope", "horn_slope_padded", "horn_slope_dask"]


def horn_slope_padded(padded: np.ndarray, xres: float, yres: float) -> np.ndarray:
    """Slope (degrees) of the interior of ``padded``, an elevation array with a 1-pixel halo.

    Returns float32 of shape ``(rows - 2, cols - 2)``. NaN marks voids.
    """
    if padded.ndim != 2 or padded.shape[0] < 3 or padded.shape[1] < 3:
        raise ValueError(f"expected a 2-D array with a 1-pixel halo, got shape {padded.shape}")
    if xres <= 0 or yres <= 0:
        raise ValueError(f"pixel sizes must be positive, got {xres}, {yres}")
    p = padded.astype(np.float32, copy=False)
    if p.shape[0] - 2 > _STRIP:  # strips of rows keep the temporaries small
        return np.concatenate([horn_slope_padded(p[r:r + _STRIP + 2], xres, yres)
                               for r in range(0, p.shape[0] - 2, _STRIP)])
    rows, cols = p.shape[0] - 2, p.shape[1] - 2
    # fast path: plain slices; NaN propagates to pixels next to voids and edges
    out = _horn([p[1 + dr:1 + dr + rows, 1 + dc:1 + dc + cols] for dr, dc in _OFFSETS], xres, yres)
    centre = p[1:-1, 1:-1]
    fix_r, fix_c = np.nonzero(np.isnan(out) & ~np.isnan(centre))
    if fix_r.size:
        # pixels next to a void or the edge: missing neighbours take the centre value
        c = centre[fix_r, fix_c]
        nbs = []
        for dr, dc in _OFFSETS:
            v = p[fix_r + 1 + dr, fix_c + 1 + dc]
            nbs.append(np.where(np.isnan(v), c, v))
        out[fix_r, fix_c] = _horn(nbs, xres, yres)
    out[np.isnan(centre)] = np.nan  # the Horn window ignores its centre: voids must be set here
    return out


#: Rows computed at a time.
_STRIP = 256

#: (row, col) offsets of the Horn window in the order a, b, c, d, f, g, h, i.
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _horn(window: Sequence[np.ndarray], xres: float, yres: float) -> np.ndarray:
    """Horn's slope from the eight neighbours ``a, b, c, d, f, g, h, i`` (in :data:`_OFFSETS` order)."""
    a, b, c, d, f, g, h, i = window
    dzdx = ((c + 2 * f + i) - (a + 2 * d + g)) / np.float32(8 * xres)
    dzdy = ((g + 2 * h + i) - (a + 2 * b + c)) / np.float32(8 * yres)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32, copy=False)


def horn_slope(dem: np.ndarray, xres: float, yres: float) -> np.ndarray:
    """Slope in degrees of a whole elevation array (NaN = void), same shape as ``dem``."""
    padded = np.pad(np.asarray(dem, dtype=np.float32), 1, mode="constant", constant_values=np.nan)
    return horn_slope_padded(padded, xres, yres)


def horn_slope_dask(dem: da.Array, xres: float, yres: float) -> da.Array:
    """Block-wise Horn slope of a dask elevation array (1-pixel halo, same chunks).

    Each output block reads its own block plus one-pixel strips of its
    neighbours, so memory depends on the chunk size only.
    """
    if dem.ndim != 2:
        raise ValueError(f"expected a 2-D elevation array, got {dem.ndim} dimensions")
    dem = dem.astype(np.float32)
    return dem.map_overlap(
        horn_slope_padded,
        depth=1,
        boundary=np.nan,
        trim=False,
        chunks=dem.chunks,
        dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
        xres=float(xres),
        yres=float(yres),
    )
