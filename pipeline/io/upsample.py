"""Same-CRS upsampling of a coarser band onto a finer grid (20 m and 60 m bands onto 10 m).

Separable weights, with GDAL's warper's values and rules: a destination pixel
whose centre falls outside the source, or on a no-data source pixel, is no
data; bilinear weights of no-data or missing neighbours are dropped and the
rest renormalised. With an integer ratio the taps of each phase are slices of
the source instead of gathers (:func:`tap_phases`), with the same float32
operations and so the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from pipeline.core.grid import Grid

if TYPE_CHECKING:
    from pipeline.io.raster_source import RasterSource

#: Output rows resampled at a time (keeps temporaries small).
_STRIP = 256

#: One phase of an integer upsampling along an axis: (first output index, first index of each
#: tap in the source, number of outputs, weight of each tap).
_Phase = tuple[int, int, int, int, np.float32, np.float32]

#: Bilinear taps along one axis: indices of the two taps into the window, and their weights.
_Taps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class _Axis:
    """Destination pixel centres along one axis, in continuous source pixel coordinates."""

    pos: np.ndarray      # the centres' positions
    cell: np.ndarray     # the source pixel under each centre
    inside: np.ndarray   # indices of the destination pixels whose centre lies in the source (one run)
    size: int            # source pixels along the axis
    ratio: int           # source pixel size / destination pixel size when an integer >= 2, else 0


def _axis(start: float, step: float, n: int, size: int, ratio: float) -> _Axis:
    pos = start + (np.arange(n) + 0.5) * step
    cell = np.floor(pos).astype(np.int64)
    inside = np.flatnonzero((cell >= 0) & (cell < size))
    return _Axis(pos, cell, inside, size, _integer_ratio(ratio))


def applies(source: RasterSource, grid: Grid, resampling: Resampling) -> bool:
    """True when ``grid`` upsamples ``source`` in its own CRS (20 m / 60 m bands to 10 m)."""
    if grid.crs != source.crs or resampling not in (Resampling.bilinear, Resampling.nearest):
        return False
    (sx, sy), (gx, gy) = source.res, grid.res
    return sx >= gx * (1 - 1e-9) and sy >= gy * (1 - 1e-9)


def upsample_onto(source: RasterSource, ds: rasterio.io.DatasetReader, grid: Grid,
                  resampling: Resampling, out: np.ndarray) -> None:
    """Resample ``source`` (open as ``ds``) onto ``grid`` into ``out`` (float32, NaN-filled):
    nearest neighbour or bilinear, reading only the source window the grid needs."""
    t, g = source.transform, grid.transform
    x = _axis((g.c - t.c) / t.a, g.a / t.a, grid.width, source.width, t.a / g.a)
    y = _axis((t.f - g.f) / -t.e, g.e / t.e, grid.height, source.height, t.e / g.e)
    if not x.inside.size or not y.inside.size:
        return
    (row0, row1), (col0, col1) = _span(y, resampling), _span(x, resampling)
    src = source.to_physical(ds.read(source.band, window=Window(col0, row0, col1 - col0, row1 - row0)))
    rows, cols = y.inside, x.inside  # inside pixels form one run of rows and one of columns
    if resampling == Resampling.nearest:
        out[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1] = \
            src[np.ix_(y.cell[rows] - row0, x.cell[cols] - col0)]
    else:
        _bilinear(src, (y, x), (row0, col0), out)


def _span(axis: _Axis, resampling: Resampling) -> tuple[int, int]:
    """First and end source pixel along ``axis`` that resampling the inside pixels reads."""
    if resampling == Resampling.nearest:
        return int(axis.cell[axis.inside].min()), int(axis.cell[axis.inside].max()) + 1
    first = np.floor(axis.pos - 0.5).astype(np.int64)[axis.inside]
    return max(int(first.min()), 0), min(int(first.max()) + 2, axis.size)


def _bilinear(src: np.ndarray, axes: tuple[_Axis, _Axis], origin: tuple[int, int], out: np.ndarray) -> None:
    """Bilinear interpolation of the window ``src`` (starting at source pixel ``origin``, (row, col))
    at the inside pixels of ``axes`` (y, x), in strips of output rows."""
    y, x = axes
    row0, col0 = origin
    valid = ~np.isnan(src)
    complete = bool(valid.all())
    filled = src if complete else np.where(valid, src, np.float32(0))
    weights = None if complete else valid.astype(np.float32)
    cols = x.inside
    cslice = slice(int(cols[0]), int(cols[-1]) + 1)
    tx = _taps(x.pos[cols], col0, x.size, src.shape[1])
    phases_x = tap_phases(tx, x.ratio)
    sum_x = tx[2] + tx[3]
    unit_x = bool((sum_x == 1).all())
    for k in range(0, y.inside.size, _STRIP):  # strips of output rows keep temporaries small
        rs = y.inside[k:k + _STRIP]
        ty = _taps(y.pos[rs], row0, y.size, src.shape[0])
        phases_y = tap_phases(ty, y.ratio)
        num = _along(_along(filled, ty, 0, phases_y), tx, 1, phases_x)
        if complete:
            # no no-data in the window (the usual case): the weight sum is separable,
            # the product of the row and column sums (below 1 only at the source edges)
            sum_y = ty[2] + ty[3]
            if unit_x and (sum_y == 1).all():
                # all weights sum to one (away from the source edges): num / 1 is num
                out[int(rs[0]):int(rs[-1]) + 1, cslice] = num
                continue
            den = sum_y[:, None] * sum_x[None, :]
        else:
            den = _along(_along(weights, ty, 0, phases_y), tx, 1, phases_x)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(den >= 1e-5, num / den, np.float32(np.nan)).astype(np.float32, copy=False)
        if not complete:
            # like GDAL: no value where the source pixel under the centre is no data
            value[~valid[np.ix_(y.cell[rs] - row0, x.cell[cols] - col0)]] = np.nan
        out[int(rs[0]):int(rs[-1]) + 1, cslice] = value


def _taps(pos: np.ndarray, start: int, size: int, n: int) -> _Taps:
    """Bilinear taps along one axis: indices into the window of ``n`` pixels starting at source
    pixel ``start``, and weights (0 outside the source of ``size`` pixels)."""
    i0 = np.floor(pos - 0.5).astype(np.int64)
    w1 = (pos - 0.5 - i0).astype(np.float32)
    w0 = np.float32(1) - w1
    w0 = np.where((i0 >= 0) & (i0 < size), w0, 0).astype(np.float32)
    w1 = np.where((i0 + 1 >= 0) & (i0 + 1 < size), w1, 0).astype(np.float32)
    return np.clip(i0 - start, 0, n - 1), np.clip(i0 + 1 - start, 0, n - 1), w0, w1


def _integer_ratio(ratio: float) -> int:
    """``ratio`` (source pixel size / destination pixel size) when it is an integer of 2 or more, else 0."""
    r = round(ratio)
    return r if r >= 2 and abs(ratio - r) < 1e-9 else 0


def tap_phases(taps: _Taps, ratio: int) -> list[_Phase] | None:
    """The bilinear taps of an integer upsampling as ``ratio`` strided phases, or None.

    With an integer ratio, outputs ``p, p + ratio, p + 2 ratio, ...`` read
    consecutive source pixels with one pair of weights: each phase is a slice
    of the source instead of a gather. Only when that holds exactly for every
    output of the axis (not at a source edge, where weights drop and indices
    clip; not when the float32 weights of a phase differ in their last bit):
    the values are then the same, bit for bit, as from the gathered taps.
    """
    if not ratio:
        return None
    j0, j1, w0, w1 = taps
    if j0.size < ratio:
        return None
    phases: list[_Phase] = []
    for p in range(ratio):
        a0, a1, v0, v1 = j0[p::ratio], j1[p::ratio], w0[p::ratio], w1[p::ratio]
        steps = np.arange(a0.size)
        if not (np.array_equal(a0, a0[0] + steps) and np.array_equal(a1, a1[0] + steps)
                and (v0 == v0[0]).all() and (v1 == v1[0]).all()):
            return None
        phases.append((p, int(a0[0]), int(a1[0]), int(a0.size), v0[0], v1[0]))
    return phases


def _along(arr: np.ndarray, taps: _Taps, axis: int, phases: list[_Phase] | None) -> np.ndarray:
    """Bilinear interpolation of ``arr`` along ``axis`` (0 or 1): tap 0 x weight 0 + tap 1 x weight 1,
    per output; with ``phases`` (:func:`tap_phases`) from slices, the same float32 operations."""
    j0, j1, w0, w1 = taps
    if phases is None:
        shape = (-1, 1) if axis == 0 else (1, -1)
        return np.take(arr, j0, axis=axis) * w0.reshape(shape) + np.take(arr, j1, axis=axis) * w1.reshape(shape)
    ratio = len(phases)
    out = np.empty((j0.size, arr.shape[1]) if axis == 0 else (arr.shape[0], j0.size), np.float32)
    for p, s0, s1, m, v0, v1 in phases:
        if axis == 0:
            out[p::ratio] = arr[s0:s0 + m] * v0 + arr[s1:s1 + m] * v1
        else:
            out[:, p::ratio] = arr[:, s0:s0 + m] * v0 + arr[:, s1:s1 + m] * v1
    return out
