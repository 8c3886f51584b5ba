"""Array-likes that read a grid's pixels window by window, for :func:`dask.array.from_array`.

Each block of the dask array is one read: for each channel only the source
window the block needs is read and resampled
(:meth:`pipeline.io.raster_source.RasterSource.read_onto`). Files are opened
inside the task, in the thread that runs it (GDAL handles are not shared
between threads), so memory depends on the block size, never on the scene
size.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rasterio
from dask.base import tokenize
from rasterio.enums import Resampling
from rasterio.features import geometry_mask
from rasterio.windows import Window

from pipeline.core.channels import DEM, SLOPE
from pipeline.core.grid import Grid
from pipeline.io.allow_list import JP2_DRIVERS
from pipeline.io.raster_source import Opener, RasterSource
from pipeline.stack.terrain import horn_slope_padded

#: Resampling of continuous layers (reflectance, DEM, precomputed slope).
CONTINUOUS_RESAMPLING = Resampling.bilinear
#: Resampling of class layers (SCL).
CLASS_RESAMPLING = Resampling.nearest
#: Rows of slope computed at a time (the temporaries of Horn's method are a few times this many rows).
SLOPE_ROWS = 256


def _axis_index(key: Any, n: int) -> tuple[int, int, Any]:
    """(start, stop, index relative to start) covering ``key`` on an axis of length ``n``."""
    if isinstance(key, slice):
        start, stop, step = key.indices(n)
        if step == 1:
            return start, max(start, stop), slice(None)
        idx = np.arange(start, stop, step)
    elif isinstance(key, (int, np.integer)):
        i = int(key) + (n if key < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {key} out of range for axis of length {n}")
        return i, i + 1, 0
    else:
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + n, idx)
    if idx.size == 0:
        return 0, 0, slice(None)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    return lo, hi, idx - lo


def _split_key(key: Any, shape: tuple[int, int]) -> tuple[tuple[int, int, Any], tuple[int, int, Any]]:
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (2 - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (2 - len(key))
    if len(key) != 2:
        raise IndexError(f"too many indices for a 2-D layer: {key}")
    return _axis_index(key[0], shape[0]), _axis_index(key[1], shape[1])


class _GridLayer:
    """Array-like (rows, cols) view of something computed per window of a grid."""

    ndim = 2

    def __init__(self, grid: Grid, dtype: np.dtype[Any]) -> None:
        self.grid = grid
        self.shape = grid.shape
        self.dtype = dtype

    def read(self, window: Grid) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_window(self, window: Window) -> np.ndarray:
        """The pixels of ``window`` (inside the grid): :meth:`read` of its sub-grid."""
        return self.read(self.grid.window(window))

    def __getitem__(self, key: Any) -> np.ndarray:
        (r0, r1, ri), (c0, c1, ci) = _split_key(key, self.shape)
        if r1 <= r0 or c1 <= c0:
            block = np.empty((max(r1 - r0, 0), max(c1 - c0, 0)), self.dtype)
        else:
            block = self.read_window(Window(c0, r0, c1 - c0, r1 - r0))
        if isinstance(ri, int) or isinstance(ci, int):
            return block[ri, ci]
        return block[ri][:, ci]


class WarpedLayer(_GridLayer):
    """One raster source resampled onto a grid, read window by window."""

    def __init__(self, source: RasterSource, grid: Grid, resampling: Resampling) -> None:
        super().__init__(grid, np.dtype(np.float32))
        self.source = source
        self.resampling = resampling
        self.scale = source.warp_scale(grid.crs, grid.res)

    def read(self, window: Grid, opener: Opener | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return self.source.read_onto(window, self.resampling, self.scale, opener=opener, out=out)


class StoredBand(_GridLayer):
    """One band of a GeoTIFF already on ``grid`` (written by the run), read window by window as
    float32. ``codes`` maps stored uint8 values to floats (a lookup table); without it the values
    are returned as stored."""

    def __init__(self, path: Path, band: int, grid: Grid, codes: np.ndarray | None = None) -> None:
        super().__init__(grid, np.dtype(np.float32))
        self.path, self.band, self.codes = path, band, codes

    def read_window(self, window: Window) -> np.ndarray:
        with rasterio.open(self.path) as ds:
            raw = ds.read(self.band, window=window)
        return self.codes[raw] if self.codes is not None else raw.astype(np.float32, copy=False)


class GeometryLayer(_GridLayer):
    """True inside the given geometries (pixel centres), rasterised window by window."""

    def __init__(self, geoms: Sequence[Any], grid: Grid) -> None:
        super().__init__(grid, np.dtype(bool))
        self.geoms = list(geoms)

    def read(self, window: Grid) -> np.ndarray:
        return geometry_mask(self.geoms, out_shape=window.shape, transform=window.transform, invert=True)


class StackLayer:
    """Array-like (channel, rows, cols) view of all channels; one read fills one block.

    Each channel of a window is resampled straight into the output array, so
    a block costs its own size plus one channel in memory. SLOPE (unless a
    slope layer is given) is Horn's method on the DEM resampled onto the
    window grown by one pixel: the halo holds exactly the values the
    neighbouring blocks compute (the warp is exact and its kernel scale fixed),
    and halo pixels outside the grid are treated as missing, so the result
    equals the whole-grid computation (:func:`pipeline.stack.terrain.horn_slope`) and
    blocks do not depend on each other.
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, names: Sequence[str], sources: dict[str, RasterSource], dem: RasterSource,
                 grid: Grid) -> None:
        self.names = tuple(names)
        self.sources = sources            # band (and given slope layer) -> source; DEM/SLOPE come from ``dem``
        self.dem = WarpedLayer(dem, grid, CONTINUOUS_RESAMPLING)
        self.layers = {n: WarpedLayer(src, grid, CONTINUOUS_RESAMPLING) for n, src in sources.items()}
        self.grid = grid
        self.shape = (len(self.names), grid.height, grid.width)
        self._opener: Opener | None = None
        self._thread = threading.local()  # ``opener``: this thread's own (:meth:`files_open_in_thread`)

    def __getstate__(self) -> dict[str, Any]:
        # open files stay in the process that opened them
        return {**self.__dict__, "_opener": None, "_thread": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread = threading.local()

    def _opener_for(self, source: RasterSource) -> Opener | None:
        """How reads of ``source`` open its file: :meth:`files_kept_open`'s, this thread's for a JPEG
        2000 file in :meth:`files_open_in_thread`, else None (each read opens it)."""
        if self._opener is not None:
            return self._opener
        opener = getattr(self._thread, "opener", None)
        return opener if source.driver in JP2_DRIVERS else None

    @contextmanager
    def files_open_in_thread(self) -> Iterator[None]:
        """Reads of this layer in this thread (only) reuse one open dataset per JPEG 2000 file until
        the block ends, then the files are closed: for a block read in strips, whose JPEG 2000 tiles
        (slow to decode, and taller than a strip) GDAL then decodes once and keeps in its cache until
        the end; other files are opened for each read, their tiles decoded again (cheaply) and not kept."""
        drivers = {src.path: src.driver for src in [*self.sources.values(), self.dem.source]}
        files: dict[Path, Any] = {}

        def opener(path: Path) -> Any:
            if path not in files:
                files[path] = rasterio.open(path, driver=drivers.get(path))
            return files[path]

        self._thread.opener = opener
        try:
            yield
        finally:
            self._thread.opener = None
            for ds in files.values():
                ds.close()

    @contextmanager
    def files_kept_open(self) -> Iterator[None]:
        """Reads of this layer (in any thread of this process) reuse one open dataset per file and
        thread until the block ends, then the files are closed: for many small windows (the scene
        statistics' sample), where opening the files would cost as much as reading them."""
        local = threading.local()
        opened: list[Any] = []
        lock = threading.Lock()

        def opener(path: Path) -> Any:
            files = local.__dict__.setdefault("files", {})
            if path not in files:
                files[path] = rasterio.open(path)
                with lock:
                    opened.append(files[path])
            return files[path]

        self._opener = opener
        try:
            yield
        finally:
            self._opener = None
            with lock:
                for ds in opened:
                    ds.close()

    def _dem_with_halo(self, window: Window) -> np.ndarray:
        grown = self.grid.window(Window(window.col_off - 1, window.row_off - 1,
                                        window.width + 2, window.height + 2))
        dem = self.dem.read(grown, self._opener_for(self.dem.source))
        r0, c0 = int(window.row_off), int(window.col_off)
        if r0 == 0:
            dem[0, :] = np.nan
        if c0 == 0:
            dem[:, 0] = np.nan
        if r0 + window.height == self.grid.height:
            dem[-1, :] = np.nan
        if c0 + window.width == self.grid.width:
            dem[:, -1] = np.nan
        return dem

    def read(self, bands: Sequence[int], window: Window, out: np.ndarray | None = None) -> np.ndarray:
        """(len(bands), rows, cols) float32 values of ``bands`` in ``window`` (into ``out`` when given)."""
        sub = self.grid.window(window)
        if out is None:
            out = np.empty((len(bands), sub.height, sub.width), np.float32)
        elif out.shape != (len(bands), sub.height, sub.width) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {(len(bands), sub.height, sub.width)}, got {out.dtype} {out.shape}")
        names = [self.names[b] for b in bands]
        padded = None
        if SLOPE in names and SLOPE not in self.layers:
            padded = self._dem_with_halo(window)
        for i, name in enumerate(names):
            if name in self.layers:
                self.layers[name].read(sub, self._opener_for(self.layers[name].source), out=out[i])
            elif name == SLOPE:
                assert padded is not None
                for r in range(0, sub.height, SLOPE_ROWS):  # each pixel's slope depends on its neighbours alone
                    out[i, r : r + SLOPE_ROWS] = horn_slope_padded(padded[r : r + SLOPE_ROWS + 2], *self.grid.res)
            elif name == DEM and padded is not None:
                out[i] = padded[1:-1, 1:-1]
            else:
                self.dem.read(sub, self._opener_for(self.dem.source), out=out[i])
        return out

    def to_dask(self, block: int) -> da.Array:
        """All channels as one lazy ``(channel, rows, cols)`` array in ``block`` x ``block`` chunks,
        named after the files read (their paths, sizes and modification times)."""
        sources = {n: (file_token(s.path), s.band, s.nodata, s.offset, s.scale)
                   for n, s in self.sources.items()}
        dem = self.dem.source
        token = tokenize(self.names, sources, file_token(dem.path), dem.nodata, self.grid.to_dict(), block)
        return da.from_array(self, chunks=(len(self.names), block, block), name=f"stack-{token}",
                             asarray=False, lock=False, meta=np.empty((0, 0, 0), np.float32))

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        b0, b1, bi = _axis_index(key[0], self.shape[0])
        (r0, r1, ri), (c0, c1, ci) = _split_key(key[1:], self.shape[1:])
        if b1 <= b0 or r1 <= r0 or c1 <= c0:
            block = np.empty((max(b1 - b0, 0), max(r1 - r0, 0), max(c1 - c0, 0)), self.dtype)
        else:
            block = self.read(range(b0, b1), Window(c0, r0, c1 - c0, r1 - r0))
        if isinstance(bi, int):
            block = block[bi]
            return block[ri, ci] if isinstance(ri, int) or isinstance(ci, int) else block[ri][:, ci]
        block = block[bi]
        if isinstance(ri, int) or isinstance(ci, int):
            return block[:, ri, ci]
        return block[:, ri][:, :, ci]


def file_token(path: Path) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
        return (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path), 0, 0)


def lazy_layer(source: RasterSource, grid: Grid, block: int, resampling: Resampling, label: str) -> da.Array:
    """A dask array of ``source`` on ``grid`` in ``block`` x ``block`` chunks."""
    layer = WarpedLayer(source, grid, resampling)
    token = tokenize(file_token(source.path), source.band, source.nodata, source.offset, source.scale,
                     grid.to_dict(), block, resampling.name)
    return da.from_array(layer, chunks=(block, block), name=f"{label.lower()}-{token}", asarray=False,
                         lock=False, meta=np.empty((0, 0), np.float32))
