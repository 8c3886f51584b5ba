"""The stacking stage: every input layer on one lazy 10 m grid.

:func:`stack_scene` turns a scene configuration into a :class:`Stack`: a
dask-backed ``(band, y, x)`` float32 DataArray with the channels in the order
asked for (Landslide4Sense order by default), plus a valid-data mask.

Grid
    The target CRS (default: the UTM zone of the scene centre) at the target
    resolution, with pixel edges on multiples of the resolution (the
    Sentinel-2 pixel grid). Extent: the footprint the requested bands share,
    cut to the area of interest when one is given.

Laziness
    The stack is a :func:`dask.array.from_array` over an array-like
    (:class:`StackLayer`) whose ``__getitem__`` fills one block: for each
    channel it reads only the source window the block needs and resamples it
    (:meth:`pipeline.io.readers.RasterSource.read_onto`). Files are opened inside
    the task, in the thread that runs it (GDAL handles are not shared between
    threads). Memory depends on the block size, never on the scene size.
    Slope is Horn's method on the reprojected DEM, block by block with a
    one-pixel halo; blocks are independent tasks.

Compute ``data`` and ``valid`` in the same dask graph (``dask.compute(data,
valid)`` or one ``map_blocks`` over both): ``valid`` is derived from the same
blocks, so computing them separately reads the inputs twice. The same holds
for ``to_delayed()``, which optimises each array on its own; use
``to_delayed(optimize_graph=False)`` on both.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
from dask.base import tokenize
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError
from rasterio.features import geometry_mask
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.core.channels import DEM, L4S_CHANNELS, S2_BANDS, SLOPE, canonical
from pipeline.core.config import AoiSection, SceneConfig
from pipeline.core.errors import ChannelError, ConfigError, GridError, InputError
from pipeline.core.grid import Bounds, Grid, intersect_bounds, utm_crs_for
from pipeline.io.readers import (
    ChecksumCheck,
    Opener,
    RasterSource,
    SceneInputs,
    open_dem,
    open_slope,
    read_scene,
    verify_scene_files,
)
from pipeline.io.readers import error_detail as _detail
from pipeline.stack.terrain import horn_slope_padded

log = logging.getLogger(__name__)

#: Resampling of continuous layers (reflectance, DEM, precomputed slope).
CONTINUOUS_RESAMPLING = Resampling.bilinear
#: Resampling of class layers (SCL).
CLASS_RESAMPLING = Resampling.nearest

UNITS = {SLOPE: "degree", DEM: "metre"}

#: The smallest grid edge in pixels whatever the configuration (see :func:`minimum_grid_size`).
MIN_GRID_PX = 4


@dataclass(frozen=True)
class Stack:
    """All channels of one scene on one grid, lazily."""

    data: xr.DataArray      # dims ("band","y","x"), float32, dask-backed
    valid: xr.DataArray     # dims ("y","x"), bool, dask-backed, same y/x chunks
    grid: Grid
    scene_id: str
    acquisition_date: dt.date | None
    product: str            # "S2_L2A", "S2_L1C" or "bands"
    #: ``valid`` without the channels' own no-data (SCL classes, AOI, DEM footprint), or
    #: None when nothing else masks the scene: ``valid == mask & all channels finite``.
    #: A consumer that reads ``data`` anyway combines the two itself and saves a second
    #: read of every band just for the mask.
    mask: xr.DataArray | None = None
    #: Reads any window of ``data`` in one call (``reader.read(bands, window)``): for a consumer
    #: whose blocks overlap (:func:`pipeline.inference.tiled.predict`), one read per block instead of
    #: a chunk plus strips of its neighbours.
    reader: StackLayer | None = None
    #: SAFE products: the band files, SCL and metadata this stack reads, checked against the
    #: product's ``manifest.safe`` (``scene.verify_checksums``): whether they were verified, how
    #: many files, bytes and seconds (:meth:`pipeline.io.readers.ChecksumCheck.as_dict` for a report)
    checksums: ChecksumCheck | None = None


# ---------------------------------------------------------------------------
# channels
# ---------------------------------------------------------------------------
def resolve_channels(channels: Sequence[str]) -> tuple[str, ...]:
    """Canonical channel names in the given order; unknown or repeated names are errors."""
    out: list[str] = []
    for name in channels:
        try:
            key = canonical(name)
        except ValueError as exc:
            raise ChannelError(str(exc)) from None
        if key in out:
            raise ChannelError(f"channel {key} asked for twice in {list(channels)}")
        out.append(key)
    if not out:
        raise ChannelError("no channels asked for; give at least one channel")
    return tuple(out)


def available_channels(scene: SceneInputs) -> tuple[str, ...]:
    """Channels the scene's inputs can supply (bands present, plus SLOPE and DEM from the DEM)."""
    return (*[b for b in S2_BANDS if b in scene.bands], SLOPE, DEM)


def check_channels(channels: Sequence[str], scene: SceneInputs) -> None:
    """Raise :class:`ChannelError` naming every channel the scene cannot supply."""
    have = available_channels(scene)
    missing = [c for c in channels if c not in have]
    if not missing:
        return
    note = " (L2A products have no B10)" if "B10" in missing and scene.product == "S2_L2A" else ""
    raise ChannelError(
        f"{scene.describe()} cannot supply channel(s) {', '.join(missing)}{note}; "
        f"it has {', '.join(have)}. Ask for a subset of these channels (channels: in the scene "
        "config) or use a model trained on them."
    )


# ---------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------
def _fmt_bounds(b: Bounds, digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in b) + "]"


def _lonlat_bounds(bounds: Bounds, crs: CRS) -> Bounds:
    return transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)


def target_crs(setting: str, sources: Sequence[RasterSource]) -> CRS:
    """The CRS asked for, or for ``'auto'`` the UTM zone of the centre of the sources' common footprint."""
    if setting.strip().lower() != "auto":
        try:
            return CRS.from_user_input(setting)
        except CRSError as exc:
            raise ConfigError(f"grid.crs: not a valid CRS: {setting!r} ({_detail(exc)})") from None
    boxes = [_lonlat_bounds(s.bounds, s.crs) for s in sources]
    common = boxes[0]
    for box in boxes[1:]:
        common = intersect_bounds(common, box) or common
    return utm_crs_for((common[0] + common[2]) / 2, (common[1] + common[3]) / 2)


def scene_footprint(sources: Sequence[RasterSource], crs: CRS) -> Bounds:
    """Bounds in ``crs`` covered by every source."""
    footprint: Bounds | None = None
    for src in sources:
        b = src.bounds_in(crs)
        footprint = b if footprint is None else intersect_bounds(footprint, b)
        if footprint is None:
            names = ", ".join(f"{s.path.name} {_fmt_bounds(_lonlat_bounds(s.bounds, s.crs))}" for s in sources)
            raise GridError(f"the scene's band files do not overlap each other (lon/lat bounds: {names})")
    assert footprint is not None
    return footprint


def aoi_bounds(aoi: AoiSection, crs: CRS) -> tuple[Bounds, list[Any] | None, str]:
    """AOI bounds in ``crs``, its geometries (vector AOIs) and a description for messages."""
    if aoi.bbox is not None:
        try:
            bounds = transform_bounds(aoi.crs, crs, *aoi.bbox, densify_pts=21)
        except (CRSError, ValueError) as exc:
            raise ConfigError(f"aoi.crs: cannot use {aoi.crs!r} ({_detail(exc)})") from None
        return bounds, None, f"aoi.bbox {list(aoi.bbox)} ({aoi.crs})"
    assert aoi.path is not None
    path = Path(aoi.path)
    if not path.exists():
        raise InputError(f"{path}: aoi.path: file not found")
    import geopandas as gpd

    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several unrelated types
        raise InputError(f"{path}: aoi.path cannot be read as a vector file ({_detail(exc)})") from None
    if gdf.empty:
        raise InputError(f"{path}: aoi.path holds no features")
    if gdf.crs is None:
        raise InputError(f"{path}: aoi.path has no CRS; save it with one (EPSG:4326 for lon/lat)")
    gdf = gdf.to_crs(crs)
    geoms = [g for g in gdf.geometry if g is not None and not g.is_empty]
    if not geoms:
        raise InputError(f"{path}: aoi.path holds only empty geometries")
    return tuple(gdf.total_bounds), geoms, f"aoi.path {path}"


def check_overlap(source: RasterSource, grid: Grid, what: str) -> float:
    """Fraction of ``grid`` covered by ``source``; :class:`GridError` when they do not overlap."""
    scene = grid.bounds_in(source.crs)
    common = intersect_bounds(scene, source.bounds)
    if common is None:
        raise GridError(
            f"{source.path}: {what} does not overlap the scene: it covers lon/lat "
            f"{_fmt_bounds(_lonlat_bounds(source.bounds, source.crs))}, the scene covers "
            f"{_fmt_bounds(grid.bounds_in('EPSG:4326'))}; give a {what} that covers the scene"
        )
    area = (scene[2] - scene[0]) * (scene[3] - scene[1])
    frac = (common[2] - common[0]) * (common[3] - common[1]) / area if area > 0 else 1.0
    if frac < 0.999:
        log.warning("%s covers only %.0f %% of the scene; uncovered pixels are invalid", source.path, 100 * frac)
    return frac


def build_grid(cfg: SceneConfig, sources: Sequence[RasterSource]) -> tuple[Grid, list[Any] | None]:
    """The output grid for ``cfg`` given the band sources that define the footprint."""
    crs = target_crs(cfg.grid.crs, sources)
    extent = scene_footprint(sources, crs)
    geoms = None
    if cfg.aoi is not None:
        aoi, geoms, desc = aoi_bounds(cfg.aoi, crs)
        inside = intersect_bounds(extent, aoi)
        if inside is None:
            raise GridError(
                f"{desc} lies outside the scene: the scene covers lon/lat "
                f"{_fmt_bounds(_lonlat_bounds(extent, crs))}; give an AOI inside the scene"
            )
        if inside != tuple(aoi):
            log.warning("%s extends beyond the scene; cut to the scene footprint", desc)
        extent = inside
    grid = Grid.from_bounds(extent, crs, cfg.grid.resolution)
    smallest, why = minimum_grid_size(cfg)
    if min(grid.width, grid.height) < smallest:
        what = desc if cfg.aoi is not None else "the scene's band files"
        raise GridError(
            f"{what} gives a grid of {grid.width} x {grid.height} px at {cfg.grid.resolution:g} "
            f"({grid.width * grid.res[0]:g} x {grid.height * grid.res[1]:g} in {crs.to_string()} units), smaller "
            f"than the minimum of {smallest} x {smallest} px that {why} needs; "
            + ("give a larger area of interest" if cfg.aoi is not None else "give a larger scene")
        )
    log.info("grid: %s, %d x %d px at %g", crs.to_string(), grid.width, grid.height, cfg.grid.resolution)
    return grid, geoms


def minimum_grid_size(cfg: SceneConfig) -> tuple[int, str]:
    """The smallest grid edge (pixels) a run of ``cfg`` can process, and what sets it.

    The opening and closing of the postprocessing run block by block with a halo of all four
    erosion and dilation radii (:func:`postprocess.morphology.open_close`), and Dask cannot give
    a halo wider than the array: an area of interest a few pixels across failed there, after the
    inference, with ``ValueError: The overlapping depth 4 is larger than your array 1``.
    """
    from postprocess.morphology import disk

    res = cfg.grid.resolution
    pp = cfg.postprocess
    halo = sum(2 * (fp.shape[0] // 2) for fp in (disk(pp.opening_radius_m / res), disk(pp.closing_radius_m / res))
               if fp is not None)
    if halo < MIN_GRID_PX:
        return MIN_GRID_PX, "the pipeline"
    return halo, (f"the postprocessing (opening and closing of postprocess.opening_radius_m "
                  f"{pp.opening_radius_m:g} and closing_radius_m {pp.closing_radius_m:g} at {res:g} per pixel)")


# ---------------------------------------------------------------------------
# lazy layers
# ---------------------------------------------------------------------------
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

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opener": None}  # open files stay in the process that opened them

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
        dem = self.dem.read(grown, self._opener)
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

    def read(self, bands: Sequence[int], window: Window) -> np.ndarray:
        sub = self.grid.window(window)
        out = np.empty((len(bands), sub.height, sub.width), np.float32)
        names = [self.names[b] for b in bands]
        padded = None
        if SLOPE in names and SLOPE not in self.layers:
            padded = self._dem_with_halo(window)
        for i, name in enumerate(names):
            if name in self.layers:
                self.layers[name].read(sub, self._opener, out=out[i])
            elif name == SLOPE:
                assert padded is not None
                out[i] = horn_slope_padded(padded, *self.grid.res)
            elif name == DEM and padded is not None:
                out[i] = padded[1:-1, 1:-1]
            else:
                self.dem.read(sub, self._opener, out=out[i])
        return out

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


def _file_token(path: Path) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
        return (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path), 0, 0)


def lazy_layer(source: RasterSource, grid: Grid, block: int, resampling: Resampling, label: str) -> da.Array:
    """A dask array of ``source`` on ``grid`` in ``block`` x ``block`` chunks."""
    layer = WarpedLayer(source, grid, resampling)
    token = tokenize(_file_token(source.path), source.band, source.nodata, source.offset, source.scale,
                     grid.to_dict(), block, resampling.name)
    return da.from_array(layer, chunks=(block, block), name=f"{label.lower()}-{token}", asarray=False,
                         lock=False, meta=np.empty((0, 0), np.float32))


def _disk(radius_px: float) -> np.ndarray:
    r = int(np.floor(radius_px))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= radius_px * radius_px


def _dilate(block: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(block, structure=footprint)


def scl_exclusion(scl: da.Array, excluded: Sequence[int], buffered: Sequence[int], buffer_px: float) -> da.Array:
    """Pixels the SCL excludes: no SCL value, an excluded class, or within ``buffer_px`` of a buffered class.

    The buffer is a disk dilation computed per block with a halo of its radius,
    so it is the same as on the whole array.
    """
    unbuffered = [c for c in excluded if c not in buffered]
    out = da.isnan(scl) | da.isin(scl, np.asarray(unbuffered, np.float32))
    cloud = da.isin(scl, np.asarray(list(buffered), np.float32))
    radius = int(np.floor(buffer_px))
    if buffered and radius >= 1:
        # a halo wider than the array (an area of interest a few pixels across) reaches nothing more:
        # clipped to the array's size, which dask requires and which gives the same result
        depth = {axis: min(radius, size) for axis, size in enumerate(cloud.shape)}
        cloud = cloud.map_overlap(_dilate, depth=depth, boundary=False, footprint=_disk(buffer_px),
                                  dtype=bool, meta=np.empty((0, 0), bool))
    return out | cloud


def _coords(grid: Grid) -> dict[str, np.ndarray]:
    t = grid.transform
    return {
        "y": t.f + (np.arange(grid.height) + 0.5) * t.e,
        "x": t.c + (np.arange(grid.width) + 0.5) * t.a,
    }


def _georeference(arr: xr.DataArray, grid: Grid) -> xr.DataArray:
    arr = arr.rio.write_crs(grid.crs)
    return arr.rio.write_transform(grid.transform)


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------
def stack_scene(cfg: SceneConfig, channels: Sequence[str] | None = None) -> Stack:
    """Stack the scene of ``cfg`` onto one grid, lazily.

    ``channels`` defaults to ``cfg.channels``, then to the Landslide4Sense
    order. Raises :class:`ChannelError` when the inputs cannot supply a
    channel, :class:`InputError` for missing or unusable files and
    :class:`GridError` when layers or the AOI do not overlap the scene. No
    pixel is read here.
    """
    names = resolve_channels(channels if channels is not None else (cfg.channels or L4S_CHANNELS))
    scene = read_scene(cfg.scene)
    check_channels(names, scene)
    # the files whose pixels are read, against the product's manifest.safe (a bit flip inside a JPEG
    # 2000 codestream decodes to wrong pixels without an error)
    scene = verify_scene_files(scene, cfg.scene, [n for n in names if n in S2_BANDS])

    bands = {n: scene.open_band(n) for n in names if n in S2_BANDS}
    dem = open_dem(cfg.dem)
    slope_src = open_slope(cfg.dem) if SLOPE in names else None
    scl = scene.open_scl()

    footprint_sources = list(bands.values())
    if not footprint_sources:  # only terrain asked for: the finest band defines the footprint
        finest = min(scene.bands, key=lambda b: (S2_BANDS[b], b))
        footprint_sources = [scene.open_band(finest)]
    grid, aoi_geoms = build_grid(cfg, footprint_sources)
    check_overlap(dem, grid, "DEM")
    if slope_src is not None:
        check_overlap(slope_src, grid, "slope layer")
    if scl is not None:
        check_overlap(scl, grid, "scene classification layer")

    block = cfg.grid.block_size
    sources = {n: bands[n] for n in names if n in bands}  # DEM comes from StackLayer.dem
    if slope_src is not None:
        sources[SLOPE] = slope_src
    layer = StackLayer(names, sources, dem, grid)
    token = tokenize(names, {n: (_file_token(s.path), s.band, s.nodata, s.offset, s.scale)
                             for n, s in sources.items()}, _file_token(dem.path), dem.nodata,
                     grid.to_dict(), block)
    data = da.from_array(layer, chunks=(len(names), block, block), name=f"stack-{token}", asarray=False,
                         lock=False, meta=np.empty((0, 0, 0), np.float32))

    masks = []
    if DEM not in names and not (SLOPE in names and slope_src is None):
        masks.append(~da.isnan(lazy_layer(dem, grid, block, CONTINUOUS_RESAMPLING, "dem")))
    if scl is not None:
        excluded = cfg.mask.excluded_scl_classes()
        scl_arr = lazy_layer(scl, grid, block, CLASS_RESAMPLING, "scl")
        masks.append(~scl_exclusion(scl_arr, excluded, cfg.mask.buffered_scl_classes(),
                                    cfg.mask.cloud_buffer_m / grid.res[0]))
        log.info("valid mask excludes SCL classes %s (clouds grown by %g m)", excluded, cfg.mask.cloud_buffer_m)
    if aoi_geoms is not None:
        inside = GeometryLayer(aoi_geoms, grid)
        masks.append(da.from_array(inside, chunks=(block, block), asarray=False, lock=False,
                                   name=f"aoi-{tokenize(grid.to_dict(), block, [g.wkb for g in aoi_geoms])}",
                                   meta=np.empty((0, 0), bool)))
    mask = None
    for m in masks:
        mask = m if mask is None else mask & m
    valid = ~da.isnan(data).any(axis=0)
    if mask is not None:
        valid = valid & mask

    coords = _coords(grid)
    data_xr = xr.DataArray(
        data,
        dims=("band", "y", "x"),
        coords={"band": list(names), **coords},
        name="stack",
        attrs={"units": [UNITS.get(n, "reflectance") for n in names], "long_name": list(names)},
    )
    data_xr = _georeference(data_xr, grid).rio.write_nodata(np.nan, encoded=False)
    valid_xr = _georeference(xr.DataArray(valid, dims=("y", "x"), coords=coords, name="valid"), grid)
    mask_xr = None
    if mask is not None:
        mask_xr = _georeference(xr.DataArray(mask, dims=("y", "x"), coords=coords, name="mask"), grid)
    log.info("stack %s: %s, %d channels (%s), blocks of %d px", scene.scene_id, scene.product,
             len(names), ", ".join(names), block)
    return Stack(data=data_xr, valid=valid_xr, grid=grid, scene_id=scene.scene_id,
                 acquisition_date=scene.acquisition_date, product=scene.product, mask=mask_xr,
                 reader=layer, checksums=scene.checksums)


def read_coarse(cfg: SceneConfig, names: Sequence[str], grid: Grid, factor: int, *,
                strip_rows: int = 256, threads: int = 2) -> np.ndarray:
    """Bands ``names`` averaged over ``factor`` x ``factor`` pixels of ``grid``, as (band, rows, cols) float32.

    For overview products (the quicklook): each band is resampled straight
    onto the coarse grid (``grid`` cropped to whole multiples of ``factor``,
    pixels ``factor`` times larger) with GDAL's average, which skips no-data
    pixels, in strips of ``strip_rows`` coarse rows, so memory stays at a
    strip whatever the scene size and nothing goes through the Dask graph.
    On a grid aligned with the band (the usual case) a coarse pixel is
    the mean of the valid pixels under it, read by GDAL's decimating reader
    (:meth:`pipeline.io.readers.RasterSource.read_decimated`: from the file's
    overviews or JPEG 2000 resolution levels when it has them, so the
    quicklook costs a fraction of a full read). Bands are read in
    ``threads`` threads (GDAL releases the GIL). Raises
    :class:`ChannelError` when the scene lacks a band.
    """
    from concurrent.futures import ThreadPoolExecutor

    scene = read_scene(cfg.scene)
    missing = [n for n in names if n not in scene.bands]
    if missing:
        raise ChannelError(f"{scene.describe()} has no band {', '.join(missing)}")
    # checked against manifest.safe like the stack's bands (files verified already are not hashed again)
    verify_scene_files(scene, cfg.scene, names)
    rows, cols = grid.height // factor, grid.width // factor
    coarse = Grid(grid.crs, grid.transform * Affine.scale(factor), cols, rows)
    sources = [scene.open_band(n) for n in names]
    out = np.full((len(names), rows, cols), np.nan, np.float32)
    if rows == 0 or cols == 0:
        return out

    def band(k: int) -> None:
        src = sources[k]
        if src.read_decimated(grid, factor, out[k]):
            return
        scale = src.warp_scale(coarse.crs, coarse.res)
        for r0 in range(0, rows, strip_rows):
            n = min(strip_rows, rows - r0)
            strip = coarse.window(Window(0, r0, cols, n))
            out[k, r0:r0 + n] = src.read_onto(strip, Resampling.average, scale)

    with ThreadPoolExecutor(max(1, min(threads, len(names)))) as pool:
        list(pool.map(band, range(len(names))))
    return out


def save_stack(stack: Stack, path: Path, *, overview: bool = True) -> Path:
    """Write the stack as a float32 COG (NaN where invalid), block by block and atomically."""
    from pipeline.io.cog import write_cog

    masked = stack.data.where(stack.valid)
    return write_cog(masked, stack.grid, path, dtype="float32", nodata=math.nan,
                     band_names=[str(b) for b in stack.data["band"].values], overview=overview)
