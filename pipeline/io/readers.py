"""Input readers: Sentinel-2 products (SAFE or per-band files), DEM and slope.

Readers are lazy. Opening a scene finds the band files and parses product
metadata; opening a raster (:func:`open_raster`) checks that the file exists,
opens with GDAL, is georeferenced and is not visibly truncated, without reading
pixels. Pixels are read later, one destination block at a time, by
:meth:`RasterSource.read_onto`, which reads only the source window that block
needs and reprojects it.

SAFE products list the MD5 checksums of their files in ``manifest.safe``: the
files a run reads are checked against them before any pixel is read
(:func:`verify_scene_files`, ``scene.verify_checksums``), because a flipped bit
inside a JPEG 2000 codestream decodes to wrong pixels without any error.

Value conventions of :meth:`RasterSource.read_onto`: float32, no-data as NaN,
physical value = (stored value + ``offset``) * ``scale``. For Sentinel-2 bands
that gives reflectance = (DN + offset) / quantification, with DN 0 (or the
file's no-data value) masked before the offset is applied.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import math
import os
import re
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.core import fsutil
from pipeline.core.channels import S2_BANDS, canonical
from pipeline.core.config import DemSection, SceneSection, is_remote_path, is_safe_scene_id, scene_id_from_name
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.grid import Bounds, Grid

#: Special values of Sentinel-2 band files (MTD ``Special_Values``): 0 is NODATA and
#: 65535 SATURATED. Neither is a measurement, so both become no data.
SAFE_SPECIAL_VALUES: tuple[float, ...] = (0.0, 65535.0)

log = logging.getLogger(__name__)

#: GDAL configuration for every read in a process that imports this module (the pipeline and its
#: Dask worker processes): VRT bands over raw bytes of arbitrary files and Python pixel functions
#: are switched off. GDAL reads these from the environment at each use; raw bands obey the option
#: from GDAL 3.12, and :func:`open_raster` refuses them itself for older GDAL.
GDAL_SAFETY_OPTIONS: dict[str, str] = {
    "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
    "GDAL_VRT_ENABLE_PYTHON": "NO",
}
os.environ.update(GDAL_SAFETY_OPTIONS)

#: GDAL drivers of JPEG 2000 files, in order of preference (the first one this GDAL has is used).
JP2_DRIVERS = ("JP2OpenJPEG", "JP2KAK", "JP2ECW", "JP2MrSID", "JPEG2000")

#: What an input raster may be, for messages.
EXPECTED_FORMATS = "a GeoTIFF/COG or JPEG 2000 file"

#: Nested VRTs deeper than this are refused (and a VRT that names itself).
_VRT_MAX_DEPTH = 8

#: Gives an open (read-only) dataset of a path: :meth:`RasterSource.read_onto`'s ``opener``.
Opener = Callable[[Path], "rasterio.io.DatasetReader"]

#: Maximum error of GDAL's approximate coordinate transformer, in source pixels.
#: GDAL's default (0.125) shifts pixels by up to 1/8 source pixel depending on
#: where a block starts, which would leave seams between blocks; 1e-4 is exact
#: for practical purposes and costs about 30 % more than the default (0 is not
#: accepted by rasterio's WarpedVRT).
WARP_TOLERANCE = 1e-4

#: Output rows resampled at a time by the same-CRS upsampling path.
_STRIP = 256

#: Extensions of per-band raster files recognised in a folder.
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")

#: Band order of ``band_id`` attributes in Sentinel-2 product metadata.
_SAFE_BAND_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                    "B09", "B10", "B11", "B12")

_BAND_TOKEN = re.compile(r"(?<![A-Za-z0-9])(B(?:8A|0?[1-9]|1[0-2])|SCL)(?![A-Za-z0-9])", re.IGNORECASE)


def error_detail(exc: BaseException) -> str:
    """The message of ``exc`` and of the errors that caused it (GDAL puts the useful part there).

    Pipeline errors are raised ``from None`` with this text, because GDAL's
    exception objects do not survive pickling to and from dask workers.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).replace("See previous exception for details.", "").strip().rstrip(".")
        if text and text not in parts:
            parts.append(text)
        current = current.__cause__ or current.__context__
    return ": ".join(parts) or type(exc).__name__


_detail = error_detail


# ---------------------------------------------------------------------------
# single rasters
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RasterSource:
    """One band of a raster file plus how to turn stored values into physical units.

    Attributes are plain values (no open handles), so a source can be pickled
    into dask tasks; every read opens the file in the calling thread.
    """

    path: Path
    role: str
    crs: CRS
    transform: Affine
    width: int
    height: int
    dtype: str
    band: int = 1
    nodata: tuple[float, ...] = ()
    offset: float = 0.0
    scale: float = 1.0
    driver: str | None = None     # the GDAL driver the file was checked with; reads use only that one

    @property
    def bounds(self) -> Bounds:
        """(left, bottom, right, top) in the source CRS."""
        t = self.transform
        return (t.c, t.f + self.height * t.e, t.c + self.width * t.a, t.f)

    @property
    def res(self) -> tuple[float, float]:
        """(x, y) pixel size, positive."""
        return (self.transform.a, -self.transform.e)

    def bounds_in(self, crs: CRS) -> Bounds:
        """Bounds transformed to ``crs`` (densified edges)."""
        if crs == self.crs:
            return self.bounds
        return transform_bounds(self.crs, crs, *self.bounds, densify_pts=21)

    # -- pixel access ------------------------------------------------------
    def to_physical(self, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stored values -> float32 physical values with NaN for no-data.

        ``out`` (float32, ``raw``'s shape, for example a window of a block's channel) receives the
        values and is returned instead of a new array: the conversion, offset and scale are applied
        on the way in (the same float32 operations, the same values).
        """
        if out is None:
            out = np.empty(raw.shape, np.float32)
        elif out.shape != raw.shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {raw.shape}, got {out.dtype} {out.shape}")
        values = [v for v in self.nodata if not math.isnan(v)]
        bad = None
        if raw.dtype.kind == "f":
            bad = np.isnan(raw)
        for value in values:
            hit = raw == value
            bad = hit if bad is None else np.logical_or(bad, hit, out=bad)
        if self.offset != 0.0:
            np.add(raw, np.float32(self.offset), out=out, dtype=np.float32, casting="unsafe")
        else:
            np.copyto(out, raw, casting="unsafe")
        if self.scale != 1.0:
            np.multiply(out, np.float32(self.scale), out=out)
        if bad is not None:
            np.copyto(out, np.float32(np.nan), where=bad)
        return out

    def warp_scale(self, crs: CRS, resolution: tuple[float, float]) -> tuple[float, float]:
        """Destination pixels per source pixel (x, y) when warping to ``crs`` at ``resolution``.

        GDAL widens interpolation kernels when downsampling by this factor and
        otherwise estimates it for each block from the block's own window.
        Passing one value, derived from the whole source, keeps blocks (and
        grids cut to different areas of interest) consistent.
        """
        try:
            left, bottom, right, top = self.bounds_in(crs)
        except RasterioError:
            return (1.0, 1.0)
        if not all(map(math.isfinite, (left, bottom, right, top))) or right <= left or top <= bottom:
            return (1.0, 1.0)
        return ((right - left) / resolution[0] / self.width, (top - bottom) / resolution[1] / self.height)

    def read_onto(self, grid: Grid, resampling: Resampling = Resampling.bilinear,
                  scale: tuple[float, float] | None = None, *, opener: Opener | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Read the part of this raster that ``grid`` needs and resample it onto ``grid``.

        Only the source window covering the destination bounds (plus a margin
        for the resampling kernel) is read, so memory depends on the size of
        ``grid``, not of the file. Returns float32 (rows, cols), NaN where
        the source has no data or does not reach. ``scale`` is
        :meth:`warp_scale` of the full grid when ``grid`` is one block of it.
        ``opener`` gives an open dataset of a path, kept open by the caller
        (many small reads of the same files); by default the file is opened
        for this read. ``out`` (float32, ``grid``'s shape, for example one
        channel of a block) receives the values and is returned, instead of a
        new array.
        """
        if out is None:
            out = np.full(grid.shape, np.nan, dtype=np.float32)
        else:
            if out.shape != grid.shape or out.dtype != np.float32:
                raise ValueError(f"out must be float32 of shape {grid.shape}, got {out.dtype} {out.shape}")
            out.fill(np.nan)
        failure: str | None = None
        try:
            with (contextlib.nullcontext(opener(self.path)) if opener is not None
                  else rasterio.open(self.path, driver=self.driver)) as ds:
                direct = self._aligned_offsets(grid)
                if direct is not None:
                    self._read_direct(ds, grid, direct, out)
                elif self._separable(grid, resampling):
                    self._read_upsampled(ds, grid, resampling, out)
                else:
                    scale = scale or self.warp_scale(grid.crs, grid.res)
                    if not self._read_reprojected(ds, grid, resampling, out, scale):
                        self._read_warped(ds, grid, resampling, out, scale)
        except (RasterioError, OSError) as exc:
            failure = _detail(exc)
        if failure is not None:
            # raised outside the except block: no GDAL exception in the context chain,
            # so the error pickles back from dask worker processes with its type
            raise InputError(
                f"{self.path}: cannot read pixels of the {self.role} ({failure}); "
                "the file may be truncated or corrupt"
            )
        return out

    def read_decimated(self, grid: Grid, factor: int, out: np.ndarray) -> bool:
        """Fill ``out`` (``grid``'s rows and columns // ``factor``) with the mean of each ``factor`` x
        ``factor`` block of pixels, in physical values, NaN where a block has no data.

        Only for a raster on ``grid``'s own pixels and covering it; returns False
        (``out`` untouched) otherwise. GDAL's decimating read averages the
        valid pixels (the file's no-data value, else the first one declared
        here: DN 0 for Sentinel-2; saturated DN are averaged in), taking an
        overview or JPEG 2000 resolution level when the file has one: exact
        on full-resolution pixels, an overview's average otherwise, which is
        what a quicklook needs.
        """
        offsets = self._aligned_offsets(grid)
        rows, cols = out.shape
        if offsets is None or rows == 0 or cols == 0:
            return False
        row0, col0 = offsets
        if row0 < 0 or col0 < 0 or row0 + rows * factor > self.height or col0 + cols * factor > self.width:
            return False
        window = Window(col0, row0, cols * factor, rows * factor)
        failure: str | None = None
        try:
            with rasterio.open(self.path, driver=self.driver) as ds:
                if self.nodata and ds.nodata is None:
                    # declare our no-data values to GDAL through a VRT so that the average skips them
                    from rasterio.vrt import WarpedVRT

                    with WarpedVRT(ds, src_nodata=self.nodata[0], nodata=self.nodata[0], dtype="float32") as vrt:
                        raw = vrt.read(self.band, window=window, out_shape=(rows, cols), out_dtype="float32",
                                       resampling=Resampling.average, masked=True)
                else:
                    raw = ds.read(self.band, window=window, out_shape=(rows, cols), out_dtype="float32",
                                  resampling=Resampling.average, masked=True)
        except (RasterioError, OSError) as exc:
            failure = _detail(exc)
        if failure is not None:
            raise InputError(f"{self.path}: cannot read pixels of the {self.role} ({failure})")
        values = self.to_physical(np.ma.getdata(raw))
        values[np.ma.getmaskarray(raw)] = np.nan
        out[:] = values
        return True

    def _aligned_offsets(self, grid: Grid) -> tuple[int, int] | None:
        """(row, col) offset of ``grid`` in this raster if both share one pixel grid."""
        if grid.crs != self.crs:
            return None
        (sx, sy), (gx, gy) = self.res, grid.res
        if not (math.isclose(sx, gx, rel_tol=1e-9) and math.isclose(sy, gy, rel_tol=1e-9)):
            return None
        col = (grid.transform.c - self.transform.c) / sx
        row = (self.transform.f - grid.transform.f) / sy
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None
        return round(row), round(col)

    def _read_direct(self, ds: rasterio.io.DatasetReader, grid: Grid, offsets: tuple[int, int],
                     out: np.ndarray) -> None:
        row0, col0 = offsets
        r0, c0 = max(row0, 0), max(col0, 0)
        r1, c1 = min(row0 + grid.height, self.height), min(col0 + grid.width, self.width)
        if r1 <= r0 or c1 <= c0:
            return
        raw = ds.read(self.band, window=Window(c0, r0, c1 - c0, r1 - r0))
        self.to_physical(raw, out=out[r0 - row0:r1 - row0, c0 - col0:c1 - col0])

    def _separable(self, grid: Grid, resampling: Resampling) -> bool:
        """True when ``grid`` upsamples this raster in its own CRS (20 m / 60 m bands to 10 m)."""
        if grid.crs != self.crs or resampling not in (Resampling.bilinear, Resampling.nearest):
            return False
        (sx, sy), (gx, gy) = self.res, grid.res
        return sx >= gx * (1 - 1e-9) and sy >= gy * (1 - 1e-9)

    def _read_upsampled(self, ds: rasterio.io.DatasetReader, grid: Grid, resampling: Resampling,
                        out: np.ndarray) -> None:
        """Same-CRS upsampling with separable weights, matching GDAL's warper.

        Same rules as GDAL: a destination pixel whose centre falls outside the
        source, or on a no-data source pixel, is no data; bilinear weights of
        no-data or missing neighbours are dropped and the rest renormalised.
        """
        t, g = self.transform, grid.transform
        # destination pixel centres in continuous source pixel coordinates
        px = (g.c - t.c) / t.a + (np.arange(grid.width) + 0.5) * (g.a / t.a)
        py = (t.f - g.f) / -t.e + (np.arange(grid.height) + 0.5) * (g.e / t.e)
        cx, cy = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
        inside_x = (cx >= 0) & (cx < self.width)
        inside_y = (cy >= 0) & (cy < self.height)
        if not inside_x.any() or not inside_y.any():
            return
        if resampling == Resampling.nearest:
            lo = (int(cy[inside_y].min()), int(cx[inside_x].min()))
            hi = (int(cy[inside_y].max()) + 1, int(cx[inside_x].max()) + 1)
        else:
            x0, y0 = np.floor(px - 0.5).astype(np.int64), np.floor(py - 0.5).astype(np.int64)
            lo = (max(int(y0[inside_y].min()), 0), max(int(x0[inside_x].min()), 0))
            hi = (min(int(y0[inside_y].max()) + 2, self.height), min(int(x0[inside_x].max()) + 2, self.width))
        window = Window(lo[1], lo[0], hi[1] - lo[1], hi[0] - lo[0])
        src = self.to_physical(ds.read(self.band, window=window))
        # inside pixels form one run of rows and one of columns (positions grow monotonically)
        rows, cols = np.flatnonzero(inside_y), np.flatnonzero(inside_x)
        cslice = slice(int(cols[0]), int(cols[-1]) + 1)
        if resampling == Resampling.nearest:
            out[int(rows[0]):int(rows[-1]) + 1, cslice] = src[np.ix_(cy[rows] - lo[0], cx[cols] - lo[1])]
            return
        valid = ~np.isnan(src)
        complete = bool(valid.all())
        filled = src if complete else np.where(valid, src, np.float32(0))
        weights = None if complete else valid.astype(np.float32)

        def taps(pos: np.ndarray, start: int, size: int, n: int) -> tuple[np.ndarray, ...]:
            """Bilinear taps along one axis: indices into the window and weights (0 outside the source)."""
            i0 = np.floor(pos - 0.5).astype(np.int64)
            w1 = (pos - 0.5 - i0).astype(np.float32)
            w0 = np.float32(1) - w1
            w0 = np.where((i0 >= 0) & (i0 < size), w0, 0).astype(np.float32)
            w1 = np.where((i0 + 1 >= 0) & (i0 + 1 < size), w1, 0).astype(np.float32)
            return np.clip(i0 - start, 0, n - 1), np.clip(i0 + 1 - start, 0, n - 1), w0, w1

        rx, ry = _integer_ratio(t.a / g.a), _integer_ratio(t.e / g.e)
        tx = taps(px[cols], lo[1], self.width, src.shape[1])
        phases_x = _tap_phases(tx, rx)
        sum_x = tx[2] + tx[3]
        unit_x = bool((sum_x == 1).all())
        for k in range(0, rows.size, _STRIP):  # strips of output rows keep temporaries small
            rs = rows[k:k + _STRIP]
            ty = taps(py[rs], lo[0], self.height, src.shape[0])
            phases_y = _tap_phases(ty, ry)
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
                value[~valid[np.ix_(cy[rs] - lo[0], cx[cols] - lo[1])]] = np.nan
            out[int(rs[0]):int(rs[-1]) + 1, cslice] = value

    def _read_reprojected(self, ds: rasterio.io.DatasetReader, grid: Grid, resampling: Resampling,
                          out: np.ndarray, scale: tuple[float, float]) -> bool:
        """Bilinear upsampling from another CRS (:mod:`pipeline.io.reproject`), the same values as
        GDAL's warper and bit-for-bit the same in every window; False (``out`` untouched) when
        that path does not apply: another resampling, a kernel GDAL would widen (downsampling),
        or positions that cannot be interpolated exactly enough."""
        from pipeline.io import reproject

        if resampling != Resampling.bilinear or min(scale) < 1.0:
            return False
        positions = reproject.source_positions(grid, self.crs, self.transform)
        if positions is None:
            return False
        window = reproject.source_window(positions, self.width, self.height)
        if window is None:
            return True  # the grid misses the source: all no data
        col0, row0, cols, rows = window
        src = self.to_physical(ds.read(self.band, window=Window(col0, row0, cols, rows)))
        reproject.bilinear(src, (row0, col0), (self.height, self.width), positions, out)
        return True

    def _source_window(self, grid: Grid) -> Window | None:
        """Window of this raster that covers ``grid``, with a resampling margin."""
        try:
            left, bottom, right, top = transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
        except RasterioError:
            return Window(0, 0, self.width, self.height)
        if not all(map(math.isfinite, (left, bottom, right, top))):
            return Window(0, 0, self.width, self.height)
        inv = ~self.transform
        c0, r0 = inv @ (left, top)
        c1, r1 = inv @ (right, bottom)
        c0, c1 = sorted((c0, c1))
        r0, r1 = sorted((r0, r1))
        # source pixels per destination pixel: kernels widen when downsampling
        ratio = max((c1 - c0) / grid.width, (r1 - r0) / grid.height, 1.0)
        margin = math.ceil(2 * ratio) + 2
        col0 = max(math.floor(c0) - margin, 0)
        row0 = max(math.floor(r0) - margin, 0)
        col1 = min(math.ceil(c1) + margin, self.width)
        row1 = min(math.ceil(r1) + margin, self.height)
        if col1 <= col0 or row1 <= row0:
            return None
        return Window(col0, row0, col1 - col0, row1 - row0)

    def _read_warped(self, ds: rasterio.io.DatasetReader, grid: Grid, resampling: Resampling,
                     out: np.ndarray, scale: tuple[float, float]) -> None:
        window = self._source_window(grid)
        if window is None:
            return
        src = self.to_physical(ds.read(self.band, window=window))
        if np.isnan(src).all():
            return
        out[:] = warp_array(src, ds.window_transform(window), self.crs, grid, resampling, scale)


#: One phase of an integer upsampling along an axis: (first output index, first index of each
#: tap in the source, number of outputs, weight of each tap).
_Phase = tuple[int, int, int, int, np.float32, np.float32]


def _integer_ratio(ratio: float) -> int:
    """``ratio`` (source pixel size / destination pixel size) when it is an integer of 2 or more, else 0."""
    r = round(ratio)
    return r if r >= 2 and abs(ratio - r) < 1e-9 else 0


def _tap_phases(taps: tuple[np.ndarray, ...], ratio: int) -> list[_Phase] | None:
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


def _along(arr: np.ndarray, taps: tuple[np.ndarray, ...], axis: int, phases: list[_Phase] | None) -> np.ndarray:
    """Bilinear interpolation of ``arr`` along ``axis`` (0 or 1): tap 0 x weight 0 + tap 1 x weight 1,
    per output; with ``phases`` (:func:`_tap_phases`) from slices, the same float32 operations."""
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


def warp_array(src: np.ndarray, src_transform: Affine, src_crs: CRS, grid: Grid,
               resampling: Resampling = Resampling.bilinear,
               scale: tuple[float, float] | None = None) -> np.ndarray:
    """Resample a float32 array (NaN = no data) onto ``grid`` with GDAL's warper.

    The array goes into an in-memory GeoTIFF and is read through a
    :class:`~rasterio.vrt.WarpedVRT` for ``grid``. The coordinate transformer
    is practically exact (:data:`WARP_TOLERANCE`), so a destination pixel gets
    the same value whichever block it is computed in; so does ``scale``
    (destination pixels per source pixel, see :meth:`RasterSource.warp_scale`),
    which fixes the kernel width GDAL uses when downsampling.
    """
    extras = {} if scale is None else {"XSCALE": f"{scale[0]:.12g}", "YSCALE": f"{scale[1]:.12g}"}
    rows, cols = src.shape
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=cols, height=rows, count=1, dtype="float32",
                      crs=src_crs, transform=src_transform, nodata=np.nan) as tmp:
            tmp.write(src.astype(np.float32, copy=False), 1)
        with mem.open() as tmp, WarpedVRT(
            tmp, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
            resampling=resampling, src_nodata=np.nan, nodata=np.nan, dtype="float32",
            tolerance=WARP_TOLERANCE, **extras,
        ) as vrt:
            return vrt.read(1)


# ---------------------------------------------------------------------------
# the input allow-list
# ---------------------------------------------------------------------------
def check_local_path(path: str | os.PathLike[str], role: str, expected: str = EXPECTED_FORMATS) -> Path:
    """``path`` as a :class:`Path` when it names a local file system path, else :class:`InputError`.

    GDAL virtual file systems (``/vsicurl/``, ``/vsimem/``, ``/vsizip/``, ...) and URLs
    (``scheme://``) are refused: inputs are local files, and opening one never makes a
    network request.
    """
    if is_remote_path(path):
        raise InputError(
            f"{os.fspath(path)}: {role} must be on the local disk; GDAL virtual file systems (/vsi...) "
            f"and URLs are not accepted (expected {expected})"
        )
    return Path(path)


@functools.lru_cache(maxsize=1)
def _jp2_driver() -> str:
    with rasterio.Env() as env:
        have = env.drivers()
    return next((name for name in JP2_DRIVERS if name in have), JP2_DRIVERS[0])


def _sniff_driver(path: Path) -> str | None:
    """The only GDAL driver ``path`` may be opened with, from its first bytes: GTiff (classic and
    BigTIFF, COG included), a JPEG 2000 driver (JP2 boxes or a raw codestream) or VRT; None for
    anything else."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "GTiff"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return _jp2_driver()
    if b"<vrtdataset" in head.lower():
        return "VRT"
    return None


def input_driver(path: str | os.PathLike[str], role: str, *, allow_vrt: bool = False,
                 vrt_option: str = "allow_vrt") -> str:
    """Check ``path`` against the input allow-list and return the one GDAL driver to open it with.

    Accepted: a local regular file that is a GeoTIFF/COG or JPEG 2000 file, or, with
    ``allow_vrt`` (the config option ``vrt_option``), a GDAL VRT whose sources are all accepted
    by the same rules (nested VRTs included) and that has no raw-file band
    (``VRTRawRasterBand``) and no Python pixel function. Everything is decided from the file's
    bytes and the VRT's XML before GDAL parses the file. Raises :class:`InputError` naming the
    file and what was expected.
    """
    return _allowed_driver(path, role, allow_vrt, vrt_option, ())


def _allowed_driver(path: str | os.PathLike[str], role: str, allow_vrt: bool, vrt_option: str,
                    chain: tuple[str, ...]) -> str:
    path = check_local_path(path, role)
    if not path.exists():
        raise InputError(f"{path}: {role} file not found")
    if path.is_dir():
        raise InputError(f"{path}: {role} must be a raster file, found a directory")
    if not path.is_file():
        raise InputError(f"{path}: {role} must be a regular file ({EXPECTED_FORMATS})")
    try:
        driver = _sniff_driver(path)
    except OSError as exc:
        raise InputError(f"{path}: {role} cannot be read ({_detail(exc)})") from None
    if driver is None:
        raise InputError(
            f"{path}: {role} cannot be opened as a raster: expected {EXPECTED_FORMATS}"
            + (" or a GDAL VRT" if allow_vrt else "")
        )
    if driver == "VRT":
        if not allow_vrt:
            raise InputError(
                f"{path}: {role} is a GDAL VRT, and VRT inputs are off (expected {EXPECTED_FORMATS}); "
                f"set {vrt_option}: true to accept VRTs over local GeoTIFF/JPEG 2000 files"
            )
        _check_vrt(path, role, vrt_option, chain)
    return driver


def _check_vrt(path: Path, role: str, vrt_option: str, chain: tuple[str, ...]) -> None:
    """Refuse a VRT with a raw-file band, a Python pixel function or a source that the allow-list
    refuses. GDAL matches VRT element and attribute names without regard to case; so does this."""
    key = os.path.realpath(path)
    if key in chain or len(chain) >= _VRT_MAX_DEPTH:
        raise InputError(f"{path}: {role}: VRTs nested too deep or naming themselves")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{path}: {role} is not a valid GDAL VRT ({_detail(exc)})") from None
    for el in root.iter():
        tag = _local(el.tag).lower()
        attrs = {k.lower(): v for k, v in el.attrib.items()}
        if tag == "vrtrasterband" and attrs.get("subclass", "").strip().lower() == "vrtrawrasterband":
            raise InputError(
                f"{path}: {role}: band {attrs.get('band', '?')} is a VRTRawRasterBand (raw bytes of a file "
                f"read as pixels), which is never accepted; VRT bands must take their pixels from "
                f"{EXPECTED_FORMATS}"
            )
        language = (el.text or "").strip().lower() if tag == "pixelfunctionlanguage" else ""
        if tag == "pixelfunctioncode" or language not in ("", "c"):
            raise InputError(
                f"{path}: {role}: VRT with a Python pixel function is not accepted (only GDAL's built-in "
                "pixel functions)"
            )
        if tag in ("sourcefilename", "sourcedataset"):
            text = (el.text or "").strip()
            if not text:
                raise InputError(f"{path}: {role}: VRT <{_local(el.tag)}> is empty")
            relative = attrs.get("relativetovrt", "0").strip() == "1"
            if is_remote_path(text):
                check_local_path(text, f"{role} (a source of the VRT {path})")
            source = path.parent / text if relative else Path(text)
            _allowed_driver(source, f"{role} (a source of the VRT {path})", True, vrt_option, (*chain, key))


def open_raster(path: Path, role: str, *, band: int = 1, nodata: Sequence[float] = (),
                use_file_nodata: bool = True, offset: float = 0.0, scale: float = 1.0,
                allow_vrt: bool = False, vrt_option: str = "allow_vrt") -> RasterSource:
    """Open ``path`` for metadata only and check it can be used as ``role``.

    Checks: the file passes the input allow-list (:func:`input_driver`: a local
    GeoTIFF/COG or JPEG 2000 file, or a checked VRT when ``allow_vrt``), GDAL
    opens it with that driver only, it has a CRS and a north-up geotransform,
    the band exists and (GeoTIFF, JPEG 2000) the file is not shorter than its
    own index says. No pixels are read. Raises :class:`InputError` naming the
    file.
    """
    opened_as = input_driver(path, role, allow_vrt=allow_vrt, vrt_option=vrt_option)
    path = Path(path)
    try:
        with rasterio.open(path, driver=opened_as) as ds:
            crs, transform = ds.crs, ds.transform
            width, height, count = ds.width, ds.height, ds.count
            driver = ds.driver
            file_nodata = ds.nodatavals[band - 1] if 0 < band <= count else None
            dtype = ds.dtypes[band - 1] if 0 < band <= count else ds.dtypes[0]
            if driver == "GTiff":
                _check_tiff_blocks(ds, path, role)
    except InputError:
        raise
    except (RasterioError, OSError) as exc:
        raise InputError(f"{path}: {role} cannot be opened as a raster by GDAL ({_detail(exc)})") from None
    if not 0 < band <= count:
        raise InputError(f"{path}: {role} has {count} band(s), band {band} was asked for")
    if crs is None:
        raise InputError(
            f"{path}: {role} has no CRS (coordinate reference system); assign the right one, "
            f"for example: gdal_edit.py -a_srs EPSG:32633 {path}"
        )
    if transform.is_identity:
        raise InputError(f"{path}: {role} has no geotransform (pixel positions unknown)")
    if transform.b != 0 or transform.d != 0 or transform.a <= 0 or transform.e >= 0:
        raise InputError(
            f"{path}: {role} must be a north-up raster without rotation, got geotransform "
            f"{tuple(transform)[:6]}; warp it first (gdalwarp)"
        )
    if driver in JP2_DRIVERS:
        _check_jp2_boxes(path, role)
    values = [float(v) for v in nodata]
    if use_file_nodata and file_nodata is not None:
        values.append(float(file_nodata))
    unique = tuple(dict.fromkeys(v for v in values if not math.isnan(v)))
    return RasterSource(path=path, role=role, crs=CRS.from_user_input(crs), transform=transform,
                        width=width, height=height, dtype=str(dtype), band=band, nodata=unique,
                        offset=offset, scale=scale, driver=opened_as)


def _check_tiff_blocks(ds: rasterio.io.DatasetReader, path: Path, role: str) -> None:
    """Fail when a GeoTIFF's block index points past the end of the file."""
    size = path.stat().st_size
    bh, bw = ds.block_shapes[0]
    nrow, ncol = math.ceil(ds.height / bh), math.ceil(ds.width / bw)
    bands = range(1, ds.count + 1) if ds.interleaving and ds.interleaving.name == "BAND" else (1,)
    if nrow * ncol * len(bands) > 500_000:
        return
    for bidx in bands:
        for r in range(nrow):
            for c in range(ncol):
                off = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=bidx)
                nbytes = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=bidx)
                if off is None or nbytes is None:
                    return
                if int(off) + int(nbytes) > size:
                    raise InputError(
                        f"{path}: {role} is truncated or corrupt: block ({r}, {c}) of band {bidx} "
                        f"ends at byte {int(off) + int(nbytes)} but the file has {size} bytes"
                    )


def _check_jp2_boxes(path: Path, role: str) -> None:
    """Fail when a JPEG 2000 file is shorter than its boxes say or its codestream lacks an end."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[4:8] != b"jP  ":
            return  # raw codestream (.j2k) or unusual layout: GDAL opened it, let reads decide
        pos = 0
        while pos < size:
            fh.seek(pos)
            header = fh.read(16)
            if len(header) < 8:
                break
            length, kind = struct.unpack(">I4s", header[:8])
            if length == 1:
                length = struct.unpack(">Q", header[8:16])[0]
            elif length == 0:
                length = size - pos
            if length < 8 or pos + length > size:
                raise InputError(
                    f"{path}: {role} is truncated or corrupt: JPEG 2000 box {kind!r} at byte {pos} "
                    f"needs {length} bytes, the file has {size - pos} left"
                )
            if kind == b"jp2c":
                fh.seek(pos + length - 2)
                if fh.read(2) != b"\xff\xd9":
                    raise InputError(
                        f"{path}: {role} is truncated or corrupt: JPEG 2000 codestream has no end marker"
                    )
            pos += length


# ---------------------------------------------------------------------------
# Sentinel-2 products
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BandFile:
    """Where one Sentinel-2 band lives and how its DN become reflectance."""

    path: Path
    offset: float = 0.0
    quantification: float = 10000.0
    nodata: tuple[float, ...] = (0.0,)
    use_file_nodata: bool = True


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

    @property
    def acquisition_date(self) -> dt.date | None:
        return self.start_time.date() if self.start_time else None


@dataclass(frozen=True)
class SceneInputs:
    """The bands a scene can supply (found, not yet opened) plus product facts."""

    product: str                      # "S2_L2A", "S2_L1C" or "bands"
    scene_id: str
    acquisition_date: dt.date | None
    bands: dict[str, BandFile]
    scl: Path | None = None
    metadata: SafeMetadata | None = None
    origin: Path | None = None        # SAFE or folder the bands came from
    allow_vrt: bool = False           # scene.allow_vrt: band and SCL files may be (checked) VRTs
    #: SAFE products: their ``manifest.safe`` (None when the product has none, or for per-band files)
    manifest: Path | None = None
    #: what :meth:`with_verified_checksums` found (None: not asked); see :class:`ChecksumCheck`
    checksums: ChecksumCheck | None = None

    def __post_init__(self) -> None:
        # the id names output folders: never "..", a path or anything outside the safe set
        if not is_safe_scene_id(self.scene_id):
            raise InputError(f"{self.describe()}: scene id {self.scene_id!r} is not a safe name; set scene.id")

    def describe(self) -> str:
        """Human-readable origin for messages."""
        where = str(self.origin) if self.origin else "the band mapping"
        return f"{self.product} input {where}"

    def open_band(self, name: str) -> RasterSource:
        """Open (metadata only) and validate the file of band ``name``."""
        bf = self.bands[name]
        return open_raster(bf.path, f"band {name}", nodata=bf.nodata, use_file_nodata=bf.use_file_nodata,
                           offset=bf.offset, scale=1.0 / bf.quantification,
                           allow_vrt=self.allow_vrt, vrt_option="scene.allow_vrt")

    def open_scl(self) -> RasterSource | None:
        """Open the scene classification layer, if the scene has one."""
        if self.scl is None:
            return None
        return open_raster(self.scl, "scene classification layer (SCL)", use_file_nodata=False,
                           allow_vrt=self.allow_vrt, vrt_option="scene.allow_vrt")

    def files_read(self, names: Sequence[str], *, scl: bool = True) -> list[tuple[Path, str]]:
        """(file, role) of what reading bands ``names`` (and the SCL) reads: the product metadata
        (offsets, quantification), the band files and the SCL file."""
        files: list[tuple[Path, str]] = []
        if self.metadata is not None and self.metadata.source is not None:
            files.append((self.metadata.source, "product metadata"))
        files += [(self.bands[n].path, f"band {n}") for n in dict.fromkeys(names) if n in self.bands]
        if scl and self.scl is not None:
            files.append((self.scl, "scene classification layer (SCL)"))
        return files

    def with_verified_checksums(self, names: Sequence[str], *, scl: bool = True,
                                threads: int | None = None) -> SceneInputs:
        """This scene with :attr:`checksums` set, after checking the files that reading bands
        ``names`` (and the SCL) reads against the checksums of the product's ``manifest.safe``.

        Raises :class:`InputError` naming every file whose checksum (or size) differs from the
        listed one, with both values. Files the manifest does not list, a product without a
        manifest and per-band inputs are not verified (:attr:`ChecksumCheck.verified` False, with
        the reason). Files are hashed in ``threads`` threads (default: up to 4, the CPU count);
        a file already verified in this process, unchanged since (size, modification time), is
        not hashed again.
        """
        files = self.files_read(names, scl=scl)
        if self.origin is None or not self.product.startswith("S2_"):
            check = ChecksumCheck(False, reason="per-band files carry no checksums (only SAFE products do)",
                                  unlisted=tuple(str(p) for p, _ in files))
        elif self.manifest is None:
            check = ChecksumCheck(False, reason=f"no manifest.safe in {self.origin}",
                                  unlisted=tuple(str(p) for p, _ in files))
            log.info("%s: no manifest.safe: checksums of the band files not verified", self.origin)
        else:
            check = verify_manifest_checksums(self.manifest, self.origin, files, threads=threads)
        return replace(self, checksums=check)


# ---------------------------------------------------------------------------
# SAFE checksums (manifest.safe)
# ---------------------------------------------------------------------------
#: ``checksumName`` values of ``manifest.safe`` -> :mod:`hashlib` algorithm. Sentinel-2 products
#: list MD5.
MANIFEST_HASHES: dict[str, str] = {"MD5": "md5", "SHA1": "sha1", "SHA-1": "sha1", "SHA256": "sha256",
                                   "SHA-256": "sha256", "SHA3-256": "sha3_256", "SHA3_256": "sha3_256"}


@dataclass(frozen=True)
class ListedChecksum:
    """One file's entry in ``manifest.safe``: ``<byteStream size=...>`` with its
    ``<checksum checksumName="MD5">`` (``value`` in lower-case hex)."""

    algorithm: str        # as the manifest names it, upper case: "MD5"
    value: str
    size: int | None = None


@dataclass(frozen=True)
class ChecksumCheck:
    """What checking a scene's files against its ``manifest.safe`` found.

    ``verified``: every file checked (:meth:`SceneInputs.files_read`) had a listed checksum and
    matched it (a mismatch raises instead). ``files``: how many were verified, ``bytes`` their
    size, ``hashed`` how many of them were hashed now (the others were verified earlier in this
    process and have not changed), ``seconds`` the time it took. ``unlisted``: files read without
    a listed checksum. ``reason``: why nothing (or not everything) was verified.
    """

    verified: bool
    files: int = 0
    bytes: int = 0
    hashed: int = 0
    seconds: float = 0.0
    algorithms: tuple[str, ...] = ()
    unlisted: tuple[str, ...] = ()
    reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary (for a run report)."""
        return {"verified": self.verified, "files": self.files, "bytes": self.bytes, "hashed": self.hashed,
                "seconds": round(self.seconds, 3), "algorithms": list(self.algorithms),
                "unlisted": list(self.unlisted), "reason": self.reason}


def _manifest_key(relative: str) -> str:
    """A path relative to the product root as the manifest's ``href`` gives it (``./GRANULE/...``),
    normalised for comparison."""
    text = relative.strip().replace("\\", "/")
    return os.path.normpath(text).replace(os.sep, "/").lstrip("/")


def parse_manifest_checksums(manifest: Path) -> dict[str, ListedChecksum]:
    """The checksums ``manifest.safe`` lists: path relative to the product root (normalised, ``/``)
    -> :class:`ListedChecksum`. Entries without a checksum are left out. Raises
    :class:`InputError` when the file cannot be parsed."""
    try:
        root = ET.parse(manifest).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(
            f"{manifest}: cannot parse the product's manifest ({_detail(exc)}); it lists the checksums of the "
            "band files: download the product again, or set scene.verify_checksums: false to skip the check"
        ) from None
    listed: dict[str, ListedChecksum] = {}
    for stream in root.iter():
        if _local(stream.tag) != "byteStream":
            continue
        href = checksum = None
        for child in stream:
            tag = _local(child.tag)
            if tag == "fileLocation" and child.get("href"):
                href = child.get("href")
            elif tag == "checksum" and child.text and child.text.strip():
                checksum = (str(child.get("checksumName") or "MD5").strip().upper(), child.text.strip().lower())
        if href is None or checksum is None:
            continue
        size_text = stream.get("size")
        try:
            size = int(size_text) if size_text is not None else None
        except ValueError:
            size = None
        listed[_manifest_key(href)] = ListedChecksum(checksum[0], checksum[1], size)
    return listed


#: Files verified in this process: (real path, size, mtime_ns, inode, algorithm, value). A run
#: stacks a scene more than once (the model stack, the attribute layers, the quicklook): each
#: file is hashed once, and again only when it changed.
_VERIFIED: set[tuple[object, ...]] = set()
_VERIFIED_LOCK = threading.Lock()

#: Bytes read per call when hashing.


def _stamp(path: Path, listed: ListedChecksum) -> tuple[object, ...]:
    st = path.stat()
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, listed.algorithm, listed.value)


def verify_manifest_checksums(manifest: Path, safe: Path, files: Sequence[tuple[Path, str]], *,
                              threads: int | None = None) -> ChecksumCheck:
    """Check ``files`` ((path, role) inside the SAFE product ``safe``) against the checksums and
    sizes ``manifest`` lists. Raises :class:`InputError` naming each file that differs, with the
    computed and the listed value; returns what was verified. Files outside the product (an SCL
    given in the config) are not listed in its manifest and are skipped."""
    t0 = time.perf_counter()
    listed = parse_manifest_checksums(manifest)
    root = os.path.normpath(os.path.abspath(safe))
    todo: list[tuple[Path, str, ListedChecksum]] = []
    unlisted: list[str] = []
    unknown: list[str] = []
    for path, role in dict.fromkeys(files):
        full = os.path.normpath(os.path.abspath(path))
        if os.path.commonpath([root, full]) != root:
            log.debug("%s: outside the product %s, no checksum to verify", path, safe)
            unlisted.append(str(path))
            continue
        entry = listed.get(_manifest_key(os.path.relpath(full, root)))
        if entry is None:
            unlisted.append(str(path))
        elif entry.algorithm not in MANIFEST_HASHES:
            unlisted.append(str(path))
            unknown.append(f"{path.name} ({entry.algorithm})")
        else:
            todo.append((path, role, entry))
    if unknown:
        log.warning("%s: checksum algorithm(s) not supported, files not verified: %s", manifest, ", ".join(unknown))

    problems: list[str] = []
    size_ok: list[tuple[Path, str, ListedChecksum, tuple[object, ...]]] = []
    total = 0
    for path, role, entry in todo:
        try:
            stamp = _stamp(path, entry)
        except OSError as exc:
            raise InputError(f"{path}: {role} cannot be read ({_detail(exc)})") from None
        size = int(stamp[1])  # type: ignore[call-overload]
        total += size
        if entry.size is not None and size != entry.size:
            problems.append(f"{path}: {role} is {size} bytes but {manifest.name} lists {entry.size} bytes "
                            f"({entry.algorithm} {entry.value})")
        else:
            size_ok.append((path, role, entry, stamp))
    with _VERIFIED_LOCK:
        pending = [item for item in size_ok if item[3] not in _VERIFIED]

    def digest(item: tuple[Path, str, ListedChecksum, tuple[object, ...]]) -> str:
        return fsutil.file_digest(item[0], MANIFEST_HASHES[item[2].algorithm])

    if pending:
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, min(len(pending), threads or min(4, os.cpu_count() or 1)))
        try:
            if workers == 1:
                digests = [digest(item) for item in pending]
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="checksum") as pool:
                    digests = list(pool.map(digest, pending))
        except OSError as exc:
            raise InputError(f"{manifest.parent}: cannot read a file to verify its checksum ({_detail(exc)})") from None
        for (path, role, entry, stamp), actual in zip(pending, digests, strict=True):
            if actual != entry.value:
                problems.append(
                    f"{path}: {role} does not match its checksum in {manifest}: {entry.algorithm} {actual} "
                    f"computed, {entry.value} listed"
                )
            else:
                with _VERIFIED_LOCK:
                    _VERIFIED.add(stamp)
    if problems:
        raise InputError(
            "corrupt input: " + "; ".join(problems)
            + ". The file was damaged after the product was made (download, copy or disk): download the "
            "product again (set scene.verify_checksums: false to skip the check)"
        )
    seconds = time.perf_counter() - t0
    inside_unlisted = [u for u in unlisted if os.path.commonpath([root, os.path.normpath(os.path.abspath(u))]) == root]
    if inside_unlisted and listed:
        log.warning("%s lists no checksum for %s: not verified", manifest, ", ".join(Path(u).name for u in inside_unlisted))
    elif not listed:
        log.info("%s lists no checksums: the band files are not verified", manifest)
    if todo:
        log.info("checksums of %d file(s) (%.0f MB) verified against %s in %.2f s (%d hashed)", len(todo),
                 total / 1e6, manifest.name, seconds, len(pending))
    reason = None
    if inside_unlisted:
        reason = f"{manifest.name} lists no checksum for {len(inside_unlisted)} file(s) read"
    elif not todo:
        reason = "no file read is listed in manifest.safe"
    return ChecksumCheck(
        verified=bool(todo) and not inside_unlisted,
        files=len(todo), bytes=total, hashed=len(pending), seconds=seconds,
        algorithms=tuple(sorted({e.algorithm for _, _, e in todo})), unlisted=tuple(unlisted), reason=reason,
    )


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find_text(root: ET.Element, *names: str) -> str | None:
    for el in root.iter():
        if _local(el.tag) in names and el.text and el.text.strip():
            return el.text.strip()
    return None


def parse_safe_metadata(xml_path: Path) -> SafeMetadata:
    """Parse the product metadata file of an L1C or L2A SAFE product.

    Reads the product type, processing baseline, start time, the quantification
    value and the per-band additive offsets (``BOA_ADD_OFFSET`` for L2A,
    ``RADIO_ADD_OFFSET`` for L1C; products from baselines before 04.00 have
    none, which means 0).
    """
    level = "L2A" if "L2A" in xml_path.name.upper() else "L1C"
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{xml_path}: cannot parse product metadata ({_detail(exc)})") from None

    # bandId -> band name, from the spectral information list when present
    band_of_id: dict[str, str] = {str(i): b for i, b in enumerate(_SAFE_BAND_ORDER)}
    for el in root.iter():
        if _local(el.tag) == "Spectral_Information":
            bid, phys = el.get("bandId"), el.get("physicalBand")
            if bid is not None and phys:
                try:
                    band_of_id[bid] = canonical(phys)
                except ValueError:
                    log.warning("%s: unknown physicalBand %r ignored", xml_path, phys)

    offset_tag = "BOA_ADD_OFFSET" if level == "L2A" else "RADIO_ADD_OFFSET"
    offsets: dict[str, float] = {}
    for el in root.iter():
        if _local(el.tag) == offset_tag and el.text:
            bid = el.get("band_id")
            if bid not in band_of_id:
                raise InputError(f"{xml_path}: {offset_tag} has unknown band_id {bid!r}")
            try:
                offsets[band_of_id[bid]] = float(el.text)
            except ValueError:
                raise InputError(f"{xml_path}: {offset_tag} band_id={bid}: not a number: {el.text!r}") from None

    q_tag = ("BOA_QUANTIFICATION_VALUE",) if level == "L2A" else ("QUANTIFICATION_VALUE",)
    q_text = _find_text(root, *q_tag)
    if q_text is None:
        log.warning("%s: no %s, assuming 10000", xml_path, q_tag[0])
        quantification = 10000.0
    else:
        try:
            quantification = float(q_text)
        except ValueError:
            raise InputError(f"{xml_path}: {q_tag[0]}: not a number: {q_text!r}") from None
        if quantification <= 0:
            raise InputError(f"{xml_path}: {q_tag[0]} must be positive, got {quantification}")

    start_text = _find_text(root, "PRODUCT_START_TIME", "DATATAKE_SENSING_START")
    start: dt.datetime | None = None
    if start_text:
        try:
            start = dt.datetime.fromisoformat(start_text.replace("Z", "+00:00"))
        except ValueError:
            log.warning("%s: cannot parse PRODUCT_START_TIME %r", xml_path, start_text)

    images = tuple(el.text.strip() for el in root.iter()
                   if _local(el.tag) in ("IMAGE_FILE", "IMAGE_FILE_2A") and el.text and el.text.strip())
    return SafeMetadata(
        level=level,
        product_type=_find_text(root, "PRODUCT_TYPE"),
        product_uri=_find_text(root, "PRODUCT_URI"),
        processing_baseline=_find_text(root, "PROCESSING_BASELINE"),
        start_time=start,
        quantification=quantification,
        offsets=offsets,
        image_files=images,
        source=xml_path,
    )


def _band_token(name: str) -> str | None:
    """``B02``/``B8A``/``SCL`` named in a Sentinel-2 file name, or None."""
    tokens = {m.group(1).upper() for m in _BAND_TOKEN.finditer(Path(name).stem)}
    if len(tokens) != 1:
        return None
    token = tokens.pop()
    return token if token == "SCL" else canonical(token)


def _pick_l2a_file(candidates: dict[str, dict[int, Path]], band: str) -> Path | None:
    by_res = candidates.get(band, {})
    if not by_res:
        return None
    native = S2_BANDS.get(band, 20)
    return by_res[native] if native in by_res else by_res[min(by_res)]


def read_safe(safe: Path, scene_id: str | None = None) -> SceneInputs:
    """Find the band files and metadata of a Sentinel-2 L1C or L2A SAFE directory.

    Bands are taken at their native resolution (L2A offers several). Files
    listed in the metadata but missing on disk are an error naming them.
    """
    safe = check_local_path(safe, "scene.safe", "a Sentinel-2 .SAFE directory on disk")
    if not safe.exists():
        raise InputError(f"{safe}: Sentinel-2 SAFE directory not found")
    if not safe.is_dir():
        raise InputError(f"{safe}: expected a Sentinel-2 .SAFE directory, found a file")
    mtd = [p for p in (safe / "MTD_MSIL2A.xml", safe / "MTD_MSIL1C.xml") if p.is_file()]
    if not mtd:
        raise InputError(
            f"{safe}: not a Sentinel-2 SAFE product: no MTD_MSIL2A.xml or MTD_MSIL1C.xml "
            "(products in the pre-2017 multi-granule format are not supported)"
        )
    meta = parse_safe_metadata(mtd[0])
    granules = sorted(p for p in (safe / "GRANULE").glob("*") if p.is_dir()) if (safe / "GRANULE").is_dir() else []
    if not granules:
        raise InputError(f"{safe}: no GRANULE/<id> directory with band files")
    if len(granules) > 1:
        raise InputError(f"{safe}: {len(granules)} granules found; only single-tile products are supported")
    img = granules[0] / "IMG_DATA"

    # candidate files: band -> resolution -> path
    candidates: dict[str, dict[int, Path]] = {}
    if meta.image_files:
        listed = [safe / f"{rel}.jp2" for rel in meta.image_files]
        inside = os.path.normpath(os.path.abspath(safe))
        for path in listed:
            if os.path.commonpath([inside, os.path.normpath(os.path.abspath(path))]) != inside:
                raise InputError(f"{path}: band file listed in {mtd[0].name} lies outside the product {safe}")
            token = _band_token(path.name)
            if token is None:
                continue
            if not path.is_file():
                raise InputError(f"{path}: band file listed in {mtd[0].name} is missing from the product")
            res = _res_of(path, img)
            candidates.setdefault(token, {})[res] = path
    else:
        pattern = "R*m/*.jp2" if meta.level == "L2A" else "*.jp2"
        for path in sorted(img.glob(pattern)):
            token = _band_token(path.name)
            if token is not None:
                candidates.setdefault(token, {})[_res_of(path, img)] = path

    bands: dict[str, BandFile] = {}
    for band in S2_BANDS:
        path = _pick_l2a_file(candidates, band)
        if path is not None:
            bands[band] = BandFile(path=path, offset=meta.offsets.get(band, 0.0),
                                   quantification=meta.quantification, nodata=SAFE_SPECIAL_VALUES,
                                   use_file_nodata=False)
    if not bands:
        raise InputError(f"{safe}: no band files found under {img}")
    scl = None
    if meta.level == "L2A":
        scl_candidates = candidates.get("SCL", {})
        scl = scl_candidates.get(20) or (scl_candidates[min(scl_candidates)] if scl_candidates else None)
        if scl is None:
            log.warning("%s: L2A product without SCL; the valid mask ignores scene classes", safe)

    if scene_id:
        product_id = scene_id.removesuffix(".SAFE")
    else:  # from the product's metadata or folder name: made safe to name output folders
        product_id = scene_id_from_name((meta.product_uri or _name_of(safe)).removesuffix(".SAFE"))
    log.info("SAFE %s: %s, baseline %s, %d bands, offsets %s", safe.name, meta.level,
             meta.processing_baseline, len(bands), sorted(set(meta.offsets.values())) or [0])
    manifest = safe / "manifest.safe"
    return SceneInputs(product=f"S2_{meta.level}", scene_id=product_id,
                       acquisition_date=meta.acquisition_date, bands=bands, scl=scl,
                       metadata=meta, origin=safe, manifest=manifest if manifest.is_file() else None)


def _res_of(path: Path, img: Path) -> int:
    """Resolution of a SAFE band file: from its R10m/R20m/R60m folder or name, else native."""
    m = re.search(r"_(10|20|60)m$", path.stem) or re.fullmatch(r"R(10|20|60)m", path.parent.name)
    if m:
        return int(m.group(1))
    token = _band_token(path.name)
    return S2_BANDS.get(token or "", 10)


def read_band_folder(folder: Path, section: SceneSection) -> SceneInputs:
    """Find per-band files in ``folder`` by the band token in their names (B02, b8a, ...).

    Two files naming the same band make the folder ambiguous: an error.
    A file named with ``SCL`` is used as the scene classification layer.
    """
    folder = check_local_path(folder, "scene.bands_dir", "a folder on disk")
    if not folder.is_dir():
        raise InputError(f"{folder}: scene.bands_dir: folder not found")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in RASTER_SUFFIXES:
            continue
        token = _band_token(path.name)
        if token is not None:
            found.setdefault(token, []).append(path)
    clashes = {k: v for k, v in found.items() if len(v) > 1}
    if clashes:
        detail = "; ".join(f"{k}: {', '.join(p.name for p in v)}" for k, v in sorted(clashes.items()))
        raise InputError(
            f"{folder}: scene.bands_dir is ambiguous, several files per band ({detail}); "
            "keep one file per band or list them under scene.bands"
        )
    bands = {k: _band_file(v[0], section) for k, v in found.items() if k != "SCL"}
    if not bands:
        raise InputError(
            f"{folder}: scene.bands_dir holds no band files (expected names containing B01..B12 or B8A "
            f"with one of {', '.join(RASTER_SUFFIXES)})"
        )
    scl = section.scl or (found["SCL"][0] if "SCL" in found else None)
    return SceneInputs(product="bands", scene_id=section.id or scene_id_from_name(_name_of(folder)),
                       acquisition_date=section.acquisition_date, bands=bands, scl=scl, origin=folder)


def read_band_mapping(mapping: Mapping[str, Path], section: SceneSection) -> SceneInputs:
    """Per-band files given explicitly (band name -> file). Files are checked when opened."""
    bands: dict[str, BandFile] = {}
    for name, path in mapping.items():
        try:
            band = canonical(name)
        except ValueError:
            raise ConfigError(f"scene.bands.{name}: unknown band; expected one of {', '.join(S2_BANDS)}") from None
        if band not in S2_BANDS:
            raise ConfigError(f"scene.bands.{name}: not a Sentinel-2 band; expected one of {', '.join(S2_BANDS)}")
        if band in bands:
            raise ConfigError(f"scene.bands: band {band} given twice")
        bands[band] = _band_file(Path(path), section)
    if not bands:
        raise ConfigError("scene.bands: empty mapping; give at least one band file")
    first = next(iter(bands.values())).path
    return SceneInputs(product="bands", scene_id=section.id or scene_id_from_name(_name_of(first.parent)),
                       acquisition_date=section.acquisition_date, bands=bands, scl=section.scl, origin=None)


def _name_of(path: Path) -> str:
    """The last component of ``path`` made absolute (``data/..`` names its real folder, not ``..``)."""
    return Path(os.path.abspath(path)).name


def _band_file(path: Path, section: SceneSection) -> BandFile:
    nodata = () if section.nodata is None else (float(section.nodata),)
    return BandFile(path=path, offset=section.dn_offset, quantification=section.quantification,
                    nodata=nodata, use_file_nodata=True)


def read_scene(section: SceneSection, verify: Sequence[str] | None = None) -> SceneInputs:
    """Find the bands of the scene described by ``section`` (SAFE, folder or mapping).

    ``verify``: the bands about to be read; with ``scene.verify_checksums`` (the default) the
    files that reading them reads are checked against the product's ``manifest.safe``
    (:meth:`SceneInputs.with_verified_checksums`), and the returned scene's ``checksums`` says
    what was verified.
    """
    inputs = _find_scene(section)
    return inputs if verify is None else verify_scene_files(inputs, section, verify)


def verify_scene_files(scene: SceneInputs, section: SceneSection, names: Sequence[str]) -> SceneInputs:
    """``scene`` with its ``checksums`` set: the files that reading bands ``names`` (and the SCL)
    reads checked against the product's ``manifest.safe`` when ``section.verify_checksums`` is on
    (:meth:`SceneInputs.with_verified_checksums`); raises :class:`InputError` on a mismatch."""
    if section.verify_checksums:
        return scene.with_verified_checksums(names)
    return replace(scene, checksums=ChecksumCheck(False, reason="off (scene.verify_checksums: false)"))


def _find_scene(section: SceneSection) -> SceneInputs:
    if section.safe is not None:
        inputs = read_safe(section.safe, section.id)
        if section.scl is not None:
            inputs = replace(inputs, scl=section.scl)
    elif section.bands_dir is not None:
        inputs = read_band_folder(section.bands_dir, section)
    else:
        assert section.bands is not None
        inputs = read_band_mapping(section.bands, section)
    return replace(inputs, allow_vrt=section.allow_vrt) if section.allow_vrt else inputs


# ---------------------------------------------------------------------------
# terrain
# ---------------------------------------------------------------------------
def open_dem(section: DemSection) -> RasterSource:
    """Open the DEM (any CRS); voids are its nodata, ``void_values`` and NaN."""
    return open_raster(section.path, "DEM", nodata=section.void_values, use_file_nodata=True,
                       allow_vrt=section.allow_vrt, vrt_option="dem.allow_vrt")


def open_slope(section: DemSection) -> RasterSource | None:
    """Open the precomputed slope layer (degrees), if one is configured."""
    if section.slope is None:
        return None
    return open_raster(section.slope, "slope layer", use_file_nodata=True,
                       allow_vrt=section.allow_vrt, vrt_option="dem.allow_vrt")
