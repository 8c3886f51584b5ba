"""Bilinear upsampling across coordinate reference systems (a DEM onto the 10 m grid).

GDAL's warper computes, for every destination pixel, where its centre lies in
the source and interpolates the four nearest source pixels; with a practically
exact transformer, most of its work is in the transformer. This module
computes the same thing with far fewer exact transforms, and exactly
reproducibly:

* Source positions are transformed exactly (PROJ, through GDAL, the same
  operation the warper picks) on a lattice every :data:`LATTICE` pixels and
  interpolated bilinearly in between; the result is checked against exact
  transforms at the lattice's cell centres and refused (the caller falls back
  to GDAL) when it is off by more than :data:`TOLERANCE` source pixels.
* The lattice is anchored to the destination CRS's pixel lattice, not to the
  window, and positions are absolute source pixel coordinates, so a
  destination pixel gets bit-for-bit the same value in every window that
  contains it (blocks and their halos agree exactly).
* Interpolation follows GDAL's rules for a kernel that is not widened
  (upsampling): a pixel whose centre falls outside the source or on a no-data
  source pixel is no data; taps outside the source or on no-data are dropped
  and the other weights renormalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from pipeline.core.grid import Grid

if TYPE_CHECKING:
    from pipeline.io.raster_source import RasterSource

#: Destination pixels between exactly transformed lattice nodes.
LATTICE = 16
#: Largest accepted error of the interpolated positions, in source pixels
#: (the tolerance the GDAL path gives its approximate transformer).
TOLERANCE = 1e-4
#: The interpolation is checked in every CHECK-th lattice cell along each axis.
CHECK = 4
#: Output rows interpolated at a time (keeps temporaries in cache).
STRIP = 16
#: Smallest sum of tap weights that still gives a value (as GDAL).
MIN_WEIGHT = 1e-5


def _axis(origin: float, res: float, n: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice along one axis of a grid: node coordinates, and for each of the ``n`` pixels the
    index of the node before it and its weight towards the next one.

    Pixels are numbered on the CRS-wide lattice of this pixel size (``origin / res``
    rounded), so windows of one grid share nodes and weights.
    """
    g = origin / res
    base = math.floor(g + 0.5)
    phase = round(g - base, 6)  # the grid's sub-pixel offset, identical for all its windows
    index = base + np.arange(n, dtype=np.int64)
    first = int(index[0] // step)
    last = int(index[-1] // step) + 1
    nodes = np.arange(first, last + 1, dtype=np.int64) * step
    k = index // step - first
    w = (index - (k + first) * step) / step  # exact: small integers over a power of two
    return (nodes + phase + 0.5) * res, k, w


@dataclass(frozen=True)
class Positions:
    """Continuous source pixel coordinates (column, row; pixel centres at +0.5) of a grid's
    pixel centres, interpolated from a lattice of exact ones."""

    shape: tuple[int, int]
    cols: np.ndarray   # (lattice rows, grid width): source column, interpolated along x
    rows: np.ndarray   # same for the source row
    k: np.ndarray      # per grid row: lattice row before it
    w: np.ndarray      # per grid row: weight of the lattice row after it
    lo: tuple[float, float]   # smallest (column, row) any pixel can get
    hi: tuple[float, float]   # largest

    def strip(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Source (column, row) of the grid rows ``r0:r1``, float64."""
        k, w = self.k[r0:r1], self.w[r0:r1, None]
        cols = self.cols[k] * (1.0 - w) + self.cols[k + 1] * w
        rows = self.rows[k] * (1.0 - w) + self.rows[k + 1] * w
        return cols, rows


def _to_pixels(xs: np.ndarray, ys: np.ndarray, dst_crs: CRS, src_crs: CRS,
               src_transform: Affine) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        tx, ty = transform_points(dst_crs, src_crs, xs.ravel(), ys.ravel())
    except RasterioError:
        return None
    tx, ty = np.asarray(tx, np.float64).reshape(xs.shape), np.asarray(ty, np.float64).reshape(xs.shape)
    if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
        return None
    t = src_transform
    return (tx - t.c) / t.a, (ty - t.f) / t.e


def source_positions(grid: Grid, src_crs: CRS, src_transform: Affine, step: int = LATTICE) -> Positions | None:
    """Where ``grid``'s pixel centres fall in a north-up source raster (``src_transform``, the
    whole raster's), or None when that cannot be interpolated within :data:`TOLERANCE`
    (a node outside the projection's domain, or a strongly curved transform)."""
    t = grid.transform  # a Grid is north-up
    if src_transform.b != 0 or src_transform.d != 0:
        return None
    x, kx, wx = _axis(t.c, t.a, grid.width, step)
    y, ky, wy = _axis(t.f, t.e, grid.height, step)
    xs, ys = np.meshgrid(x, y)
    nodes = _to_pixels(xs, ys, grid.crs, src_crs, src_transform)
    if nodes is None:
        return None
    node_cols, node_rows = nodes
    # the interpolation checked at cell centres (where it is worst), in every CHECK-th cell
    # along each axis (the error varies smoothly) and in the last cells
    ci = np.unique(np.r_[np.arange(0, x.size - 1, CHECK), x.size - 2])
    ri = np.unique(np.r_[np.arange(0, y.size - 1, CHECK), y.size - 2])
    mx, my = np.meshgrid((x[ci] + x[ci + 1]) / 2, (y[ri] + y[ri + 1]) / 2)
    exact = _to_pixels(mx, my, grid.crs, src_crs, src_transform)
    if exact is None:
        return None
    for node, centre in zip(nodes, exact, strict=True):
        guess = (node[np.ix_(ri, ci)] + node[np.ix_(ri, ci + 1)] + node[np.ix_(ri + 1, ci)]
                 + node[np.ix_(ri + 1, ci + 1)]) / 4
        if np.abs(guess - centre).max() > TOLERANCE:
            return None
    cols = node_cols[:, kx] * (1.0 - wx) + node_cols[:, kx + 1] * wx
    rows = node_rows[:, kx] * (1.0 - wx) + node_rows[:, kx + 1] * wx
    lo = (float(node_cols.min()), float(node_rows.min()))
    hi = (float(node_cols.max()), float(node_rows.max()))
    return Positions(grid.shape, cols, rows, ky, wy, lo, hi)


def reproject_onto(source: RasterSource, ds: rasterio.io.DatasetReader, grid: Grid, resampling: Resampling,
                   out: np.ndarray, scale: tuple[float, float]) -> bool:
    """Bilinear upsampling of ``source`` (open as ``ds``) from another CRS into ``out`` (float32,
    NaN-filled): the same values as GDAL's warper and bit-for-bit the same in every window.
    False (``out`` untouched) when this path does not apply: another resampling, a kernel GDAL
    would widen (``scale`` below 1: downsampling), or positions that cannot be interpolated
    exactly enough."""
    if resampling != Resampling.bilinear or min(scale) < 1.0:
        return False
    positions = source_positions(grid, source.crs, source.transform)
    if positions is None:
        return False
    window = source_window(positions, source.width, source.height)
    if window is None:
        return True  # the grid misses the source: all no data
    col0, row0, cols, rows = window
    src = source.to_physical(ds.read(source.band, window=Window(col0, row0, cols, rows)))
    bilinear(src, (row0, col0), (source.height, source.width), positions, out)
    return True


def source_window(positions: Positions, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(col0, row0, cols, rows) of the source pixels the interpolation can touch, within a
    source of ``width`` x ``height``; None when the grid misses the source."""
    (c_lo, r_lo), (c_hi, r_hi) = positions.lo, positions.hi
    col0 = max(math.floor(c_lo - 0.5), 0)
    row0 = max(math.floor(r_lo - 0.5), 0)
    col1 = min(math.floor(c_hi - 0.5) + 2, width)
    row1 = min(math.floor(r_hi - 0.5) + 2, height)
    if col1 <= col0 or row1 <= row0:
        return None
    return col0, row0, col1 - col0, row1 - row0


def bilinear(src: np.ndarray, origin: tuple[int, int], size: tuple[int, int], positions: Positions,
             out: np.ndarray) -> None:
    """Fill ``out`` (the grid's shape, float32) by bilinear interpolation of ``src``.

    ``src`` is a float32 window (NaN = no data) of a source raster of ``size``
    (rows, cols), starting at ``origin`` (row, col), covering
    :func:`source_window`. Pixels with no value are NaN.
    """
    height, width = size
    row0, col0 = origin
    h, w = src.shape
    valid = ~np.isnan(src)
    complete = bool(valid.all())
    # one pixel of zeros around the window: taps outside it weigh nothing
    pad_w = w + 2
    values = np.zeros((h + 2, pad_w), np.float32)
    values[1:-1, 1:-1] = np.where(valid, src, np.float32(0)) if not complete else src
    values = values.ravel()
    weights = None
    # taps can fall outside the source only where the window touches its edges
    at_edge = col0 == 0 or row0 == 0 or col0 + w == width or row0 + h == height
    if not complete or at_edge:
        weights = np.zeros((h + 2, pad_w), np.float32)
        weights[1:-1, 1:-1] = valid
        weights = weights.ravel()
    for r0 in range(0, out.shape[0], STRIP):
        r1 = min(r0 + STRIP, out.shape[0])
        sx, sy = positions.strip(r0, r1)
        inside = bool(sx.min() >= 0 and sx.max() < width and sy.min() >= 0 and sy.max() < height)
        u = sx - (col0 + 0.5 - 1)
        v = sy - (row0 + 0.5 - 1)
        if inside:
            x0 = u.astype(np.int64)  # u, v >= 0.5 here: truncation is floor
            y0 = v.astype(np.int64)
        else:
            x0 = np.clip(np.floor(u), 0, w).astype(np.int64)  # positions are finite (source_positions)
            y0 = np.clip(np.floor(v), 0, h).astype(np.int64)
        fx = (u - x0).astype(np.float32)
        fy = (v - y0).astype(np.float32)
        flat = y0 * pad_w + x0
        value = _lerp(values, flat, pad_w, fx, fy)
        if weights is not None:
            den = _lerp(weights, flat, pad_w, fx, fy)
            with np.errstate(invalid="ignore", divide="ignore"):
                value = np.where(den >= MIN_WEIGHT, value / den, np.float32(np.nan))
        if not inside or not complete:
            # no value where the centre's source pixel is outside the source or no data
            cx, cy = np.floor(sx), np.floor(sy)
            bad = ~((cx >= 0) & (cx < width) & (cy >= 0) & (cy < height))
            if not complete:
                centre = (np.clip(cy - row0 + 1, 0, h + 1).astype(np.int64) * pad_w
                          + np.clip(cx - col0 + 1, 0, w + 1).astype(np.int64))
                bad |= weights.take(centre) == 0  # type: ignore[union-attr]
            value[bad] = np.nan
        out[r0:r1] = value


def _lerp(values: np.ndarray, flat: np.ndarray, row: int, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    a = values.take(flat)
    b = values.take(flat + 1)
    top = a + fx * (b - a)
    c = values.take(flat + row)
    d = values.take(flat + (row + 1))
    bottom = c + fx * (d - c)
    return top + fy * (bottom - top)
