"""Cloud-optimised GeoTIFF writer that streams dask arrays block by block.

:func:`write_cog` never holds the whole raster: blocks are computed by dask
and written as they arrive into a temporary tiled GeoTIFF (window writes
under a lock), which GDAL's COG driver then copies into COG layout with
overviews. Both temporary files live beside the target and the result is
moved into place with :func:`os.replace`, so readers see either the old file
or the complete new one, and a failure leaves no output behind.

Every file is read back before it moves into place (:func:`verify_raster`):
GDAL's COG driver with more than one thread does not report a failed write
(a full disk gives a truncated file and no error). A write that failed,
reported or found, raises :class:`~pipeline.core.errors.DiskFull` (or
:class:`~pipeline.core.errors.FileSizeLimit`) when the disk is full, else
:class:`~pipeline.core.errors.OutputError` (:func:`pipeline.core.fsutil.write_failure`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rasterio
import rasterio.shutil
import xarray as xr
from rasterio.enums import Interleaving
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline.core import fsutil
from pipeline.core.errors import DiskFull, OutputError
from pipeline.core.fsutil import WriteCheckFailed
from pipeline.core.grid import Grid
from pipeline.core.progress import about_to_compute, compute
from pipeline.io.readers import error_detail as _detail

log = logging.getLogger(__name__)

TILE = 512
#: DEFLATE level of the finished COGs. Level 1 writes the uint8 probability of a full tile in
#: 2.2 s against 4.9 s at level 6, for a file 4 % larger (76 against 73 MB, with the predictor).
DEFLATE_LEVEL = 1


class _WindowWriter:
    """``da.store`` target: ``target[region] = block`` writes a window of a GeoTIFF.

    Holds only the path, so it can be sent to distributed workers on the same
    file system; each write reopens the file in update mode under the lock.
    ``final`` is the path the file becomes, named in errors.
    """

    def __init__(self, path: Path, ndim: int, final: Path | None = None) -> None:
        self.path = str(path)
        self.ndim = ndim
        self.final = str(final or path)

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        rows, cols = key[-2], key[-1]
        window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        failure: OutputError | None = None
        try:
            with rasterio.open(self.path, "r+") as dst:
                if self.ndim == 2:
                    dst.write(value, 1, window=window)
                else:
                    bands = key[0]
                    indexes = list(range(bands.start + 1, bands.stop + 1))
                    dst.write(value, indexes, window=window)
        except (RasterioError, OSError) as exc:
            failure = fsutil.write_failure(self.final, _detail(exc), exc, written=[self.path],
                                           what=f"cannot write block {window} of {self.path}")
        if failure is not None:  # raised outside the except block so it pickles from workers
            if isinstance(failure, DiskFull):
                _quiet_worker_report()
            raise failure


_QUIET = False


class _DropDiskFullReports:
    """Logging filter for a Dask worker's ``Compute Failed`` report (with the task's traceback)
    of a :class:`DiskFull`: the error itself reaches the client, which says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Compute Failed")
                    and any(isinstance(a, str) and a.startswith(("DiskFull(", "FileSizeLimit(")) for a in args))


def _quiet_worker_report() -> None:
    global _QUIET  # noqa: PLW0603 - once per process
    if not _QUIET:
        _QUIET = True
        logging.getLogger("distributed.worker").addFilter(_DropDiskFullReports())


def _tile_for(chunks: tuple[tuple[int, ...], ...]) -> int:
    """Tile edge of the temporary GeoTIFF: every chunk border falls on a tile border, so no tile
    is written twice. The chunk size itself when all chunks share one that is a multiple of 16
    (one tile per block: small tiles cost 10 times more to write, 32 px tiles under 2016 px
    blocks 0.12 against 0.013 s per block), else the largest such edge <= 512."""
    inner = [c for axis in chunks for c in axis[:-1]]
    sizes = set(inner)
    if len(sizes) == 1 and (size := sizes.pop()) % 16 == 0 and size <= 4096:
        return size
    for size in (512, 256, 128, 64, 32, 16):
        if all(c % size == 0 for c in inner):
            return size
    return 16


def _lock() -> Any:
    """A lock valid for the active scheduler (distributed lock when a client is running)."""
    try:
        from distributed import Lock, get_client

        get_client()
        return Lock(f"cog-writer-{uuid.uuid4().hex}")
    except (ImportError, ValueError):
        return threading.Lock()


def _as_dask(arr: xr.DataArray | da.Array | np.ndarray, grid: Grid) -> da.Array:
    data = arr.data if isinstance(arr, xr.DataArray) else arr
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(-1,) * (np.ndim(data) - 2) + (2048, 2048))
    if data.ndim not in (2, 3):
        raise OutputError(f"write_cog expects (band, y, x) or (y, x), got {data.ndim} dimensions")
    if tuple(data.shape[-2:]) != grid.shape:
        raise OutputError(f"array shape {data.shape[-2:]} does not match grid shape {grid.shape}")
    return data


def _prepare(data: da.Array, dtype: np.dtype[Any], nodata: float | None) -> da.Array:
    if np.issubdtype(dtype, np.integer):
        if data.dtype.kind == "f":
            fill = nodata if nodata is not None else 0
            data = da.where(da.isnan(data), fill, data)
            info = np.iinfo(dtype)
            data = da.clip(da.round(data), info.min, info.max)
        elif data.dtype == bool:
            data = data.astype(np.uint8)
    return data.astype(dtype)


@dataclass
class RasterOutput:
    """One raster for :func:`write_rasters`: what to write, where and how.

    ``cog=False`` writes a plain tiled GeoTIFF, uncompressed and without
    overviews: the cheap form for intermediate layers that only this run
    reads back (compressing float32 elevation costs 40 times more than
    writing it: 0.9 against 0.02 s per 2016 px block of two bands). Tiles
    are the blocks' own size when they allow it (see :func:`_tile_for`).
    """

    arr: Any
    path: Path
    dtype: str | np.dtype[Any]
    nodata: float | None
    band_names: Sequence[str] | None = None
    overview: bool = True
    overview_resampling: str = "average"
    compress: str = "DEFLATE"
    tags: dict[str, str] | None = None
    cog: bool = True


def write_cog(
    arr: xr.DataArray | da.Array | np.ndarray,
    grid: Grid,
    path: str | os.PathLike[str],
    *,
    dtype: str | np.dtype[Any],
    nodata: float | None,
    band_names: Sequence[str] | None = None,
    overview: bool = True,
    overview_resampling: str = "average",
    compress: str = "DEFLATE",
    tags: dict[str, str] | None = None,
) -> Path:
    """Write ``arr`` ((band, y, x) or (y, x), lazy or not) on ``grid`` as a COG at ``path``.

    Blocks are computed with the active dask scheduler and written as they
    finish; memory is bounded by a few chunks. Float NaN become ``nodata``
    when ``dtype`` is an integer type. ``overview_resampling`` is a GDAL
    name: ``average`` for continuous data, ``nearest`` or ``mode`` for
    classes. Returns the path. Raises :class:`OutputError` when the file
    cannot be written; errors raised while computing blocks (for example an
    :class:`~pipeline.core.errors.InputError` for a corrupt input) propagate
    unchanged. Either way no partial file is left.
    """
    out = RasterOutput(arr, Path(path), dtype, nodata, band_names, overview, overview_resampling, compress, tags)
    return write_rasters([out], grid)[0]


def write_rasters(outputs: Sequence[RasterOutput], grid: Grid,
                  also: Callable[[list[da.Array]], Sequence[Any]] | None = None) -> Any:
    """Write several rasters on ``grid`` from one dask computation (see :func:`write_cog`).

    Arrays that share a graph (the probability, the uncertainty and the
    layers kept from the same inference blocks) are computed once: every
    block is written to each of its files as it finishes. Every file is
    converted before the first one is moved into place, so a failure while
    computing or converting leaves no new file at any final path (and no
    temporary file behind). Returns the paths written.

    ``also`` is called with the arrays exactly as they are stored (cast to
    their file's type, no-data filled, one per output) and returns more dask
    collections to compute in the same computation, from the same blocks.
    With ``also`` the result is ``(paths, their values)``.
    """
    plans = []
    created: list[Path] = []
    try:
        for out in outputs:
            plan = _start(out, grid)
            created += [plan["tmp_tiff"], plan["tmp_cog"]]
            plans.append(plan)
        extra: list[Any] = []
        if plans:
            about_to_compute()  # the lock depends on the scheduler that will compute
            store = da.store([p["data"] for p in plans], [_WindowWriter(p["tmp_tiff"], p["data"].ndim, p["path"]) for p in plans],
                             lock=_lock(), compute=False)
            names = ", ".join(p["path"].name for p in plans)
            collections = [store, *(also([p["data"] for p in plans]) if also is not None else [])]
            extra = list(compute(collections, f"computing {names} ({plans[0]['data'].npartitions} block(s))")[1:])
        for p in plans:  # every block stored (a block write that failed and said nothing shows here)
            _verify_or_raise(p["tmp_tiff"], p["path"], width=grid.width, height=grid.height, count=p["count"],
                             dtype=p["dtype"].name, sparse=True, written=[p["tmp_tiff"]])
        hook = BEFORE_CONVERT.get()
        if hook is not None:
            hook()
        sources = [_convert(p) for p in plans]  # every conversion before any file moves into place
        done = [_move(src, p["path"]) for src, p in zip(sources, plans, strict=True)]
    except BaseException:
        _cleanup(*created)
        raise
    for plan in plans:
        _cleanup(plan["tmp_tiff"])
        log.info("wrote %s (%d band(s), %s, %d x %d)", plan["path"], plan["count"], plan["dtype"].name,
                 grid.width, grid.height)
    return done if also is None else (done, extra)


def _start(out: RasterOutput, grid: Grid) -> dict[str, Any]:
    """Check one output, create its temporary tiled GeoTIFF and return what storing and finishing need."""
    path = Path(out.path)
    np_dtype = np.dtype(out.dtype)
    data = _prepare(_as_dask(out.arr, grid), np_dtype, out.nodata)
    count = 1 if data.ndim == 2 else data.shape[0]
    if out.band_names is not None and len(out.band_names) != count:
        raise OutputError(f"{path}: {len(out.band_names)} band names for {count} bands")
    if data.ndim == 3:
        data = data.rechunk({0: -1})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fsutil.folder_failure(exc, path, f"{path}: cannot create the output folder ({_detail(exc)})") from None
    stem = f".{path.name}.{uuid.uuid4().hex[:8]}"
    tmp_tiff = path.parent / f"{stem}.tiles.tif"
    tmp_cog = path.parent / f"{stem}.cog.tif"
    tile = _tile_for(data.chunks[-2:])
    profile = {
        "driver": "GTiff", "width": grid.width, "height": grid.height, "count": count,
        "dtype": np_dtype.name, "crs": grid.crs, "transform": grid.transform, "nodata": out.nodata,
        "tiled": True, "blockxsize": tile, "blockysize": tile, "bigtiff": "IF_SAFER",
        "interleave": "pixel" if count <= 4 and out.cog else "band",
        **({"compress": "ZSTD", "zstd_level": 1} if out.cog else {"compress": "NONE"}),
        # every tile is written by the store: without this GDAL writes every tile of an
        # uncompressed file as zeros first (about 2 s for a full tile's stored layers, before the
        # inference can start)
        "sparse_ok": True,
    }
    try:
        with rasterio.open(tmp_tiff, "w", **profile) as dst:
            names = out.band_names if out.band_names is not None else _long_name(out.arr, count)
            if names is not None:
                for i, name in enumerate(names, start=1):
                    dst.set_band_description(i, str(name))
            if out.tags:
                dst.update_tags(**out.tags)
    except (RasterioError, OSError) as exc:
        failure = fsutil.write_failure(path, _detail(exc), exc, written=[tmp_tiff],
                                       what="cannot create a temporary GeoTIFF beside it")
        _cleanup(tmp_tiff)
        raise failure from None
    return {"out": out, "path": path, "data": data, "count": count, "dtype": np_dtype,
            "tmp_tiff": tmp_tiff, "tmp_cog": tmp_cog}


def _long_name(arr: Any, count: int) -> list[str] | None:
    """The band description of a one-band DataArray without band names: its ``long_name``
    attribute (the uncertainty's "landslide probability standard deviation"), if any."""
    name = getattr(arr, "attrs", {}).get("long_name") if isinstance(arr, xr.DataArray) else None
    return [str(name)] if name and count == 1 else None


def _convert(plan: dict[str, Any]) -> Path:
    """The stored temporary GeoTIFF in its final form (a COG copy, or itself)."""
    out: RasterOutput = plan["out"]
    if not out.cog:
        return plan["tmp_tiff"]
    return _copy_as_cog(plan["tmp_tiff"], plan["tmp_cog"], plan["path"], compress=out.compress,
                        overview=out.overview, overview_resampling=out.overview_resampling)


#: GDAL threads for the COG copies made in this context (None: up to 4, one per core). Set to 1
#: by threads running at a lowered CPU priority: GDAL's worker threads are created by the first
#: thread that needs them and inherit its priority for the rest of the process.
GDAL_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("cog_gdal_threads", default=None)


#: Called by :func:`write_rasters` in the writing thread once the blocks are computed, before the
#: COG copies: a thread whose waiting is harmless but whose own CPU work (the copies) should yield
#: to other work lowers its priority there (its graph was built and sent at normal priority).
BEFORE_CONVERT: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "cog_before_convert", default=None)


def gdal_threads() -> int:
    """Threads GDAL may use for a COG copy in the current context (see :data:`GDAL_THREADS`)."""
    return GDAL_THREADS.get() or max(1, min(4, os.cpu_count() or 1))


def _copy_as_cog(source: Path, dest: Path, path: Path, *, compress: str, overview: bool,
                 overview_resampling: str, band_descriptions: Sequence[str] | None = None,
                 band_tags: Sequence[dict[str, str]] | None = None) -> Path:
    """GDAL's COG copy of ``source`` at ``dest`` (errors name ``path``, the file it becomes)."""
    options = {
        "COMPRESS": compress, "PREDICTOR": "YES", "BLOCKSIZE": str(TILE), "BIGTIFF": "IF_SAFER",
        "OVERVIEWS": "AUTO" if overview else "NONE", "RESAMPLING": overview_resampling.upper(),
        "NUM_THREADS": str(gdal_threads()),
    }
    if compress.upper() == "DEFLATE":
        options["LEVEL"] = str(DEFLATE_LEVEL)
    failure: OutputError | None = None
    try:
        with rasterio.open(source) as src:
            expected = {"width": src.width, "height": src.height, "count": src.count, "dtype": src.dtypes[0]}
        if band_descriptions or band_tags:
            with _described(source, band_descriptions or (), band_tags or ()) as vrt:
                rasterio.shutil.copy(vrt, dest, driver="COG", **options)
        else:
            rasterio.shutil.copy(source, dest, driver="COG", **options)
    except (RasterioError, OSError) as exc:
        failure = fsutil.write_failure(path, _detail(exc), exc, needed=_size(source), written=[dest],
                                       what="cannot write the COG")
    if failure is not None:
        raise failure
    # GDAL's COG driver with several threads reports no failed write: read the copy back
    _verify_or_raise(dest, path, **expected, needed=_size(source), written=[dest])
    return dest


@contextlib.contextmanager
def _described(source: Path, descriptions: Sequence[str], tags: Sequence[dict[str, str]]) -> Any:
    """An in-memory VRT of ``source`` with these band descriptions and band tags (its path)."""
    with rasterio.MemoryFile(ext=".vrt") as mem:  # removed on exit (VSIUnlink of the VRT alone)
        rasterio.shutil.copy(source, mem.name, driver="VRT")
        with rasterio.open(mem.name, "r+") as dst:
            for i, text in enumerate(descriptions, start=1):
                dst.set_band_description(i, str(text))
            for i, items in enumerate(tags, start=1):
                dst.update_tags(i, **{k: str(v) for k, v in items.items()})
        yield mem.name


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _verify_or_raise(tmp: Path, path: Path, *, width: int, height: int, count: int, dtype: str,
                     sparse: bool = False, needed: int = 0, written: Sequence[Path] = ()) -> None:
    """:func:`verify_raster` of the temporary ``tmp`` that becomes ``path``; a failure raises the
    error :func:`pipeline.core.fsutil.write_failure` gives (a full disk, else a damaged file)."""
    try:
        verify_raster(tmp, width=width, height=height, count=count, dtype=dtype, sparse=sparse)
    except WriteCheckFailed as exc:
        failure = fsutil.write_failure(path, f"{tmp.name} read back: {exc}", needed=needed, written=written,
                                       what="the file written is incomplete")
    else:
        return
    raise failure


def verify_raster(path: str | os.PathLike[str], *, width: int, height: int, count: int, dtype: str,
                  sparse: bool = False) -> None:
    """Read back the structure of a GeoTIFF (or COG) just written, before it moves into place.

    Checks that it opens with the expected size, band count and data type; that every block of
    the full resolution and of each overview lies within the file (offset plus size at most the
    file's size; ``sparse=False``: every block present); and reads the last block in the file of
    each level and band (decompressing it), the one a truncated file loses first. Costs one
    metadata lookup per block and one block read per level: milliseconds for the demo, about
    0.1 s for a 14-band full tile. Raises :class:`~pipeline.core.fsutil.WriteCheckFailed`.
    """
    path = os.fspath(path)
    try:
        file_size = os.stat(path).st_size
        with rasterio.open(path) as src:
            found = (src.width, src.height, src.count, tuple(src.dtypes))
            if found != (width, height, count, (str(dtype),) * count):
                raise WriteCheckFailed(f"{src.width} x {src.height}, {src.count} band(s) of "
                                       f"{'/'.join(sorted(set(src.dtypes)))} read back, expected {width} x "
                                       f"{height}, {count} of {dtype}")
            levels = len(src.overviews(1))
            _verify_level(src, file_size, sparse, "full resolution")
        for level in range(levels):
            with rasterio.open(path, overview_level=level) as ovr:
                _verify_level(ovr, file_size, sparse, f"overview {level + 1}")
    except (RasterioError, OSError) as exc:
        raise WriteCheckFailed(f"cannot read it back ({_detail(exc)})") from None


def _verify_level(src: Any, file_size: int, sparse: bool, label: str) -> None:
    separate = src.count > 1 and src.interleaving != Interleaving.pixel  # one tile per band and block
    for band in (range(1, src.count + 1) if separate else [1]):
        last: tuple[int, Window] | None = None
        for (row, col), window in src.block_windows(band):
            offset = src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
            size = src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band)
            if offset is None or size is None:
                if sparse:
                    continue  # never written: all no-data (SPARSE_OK), or a write that failed
                raise WriteCheckFailed(f"{label}: block ({row}, {col}) of band {band} is missing")
            end = int(offset) + int(size)
            if end > file_size:
                raise WriteCheckFailed(f"{label}: block ({row}, {col}) of band {band} ends at byte {end}, "
                                       f"after the end of the file ({file_size} bytes)")
            if last is None or int(offset) > last[0]:
                last = (int(offset), window)
        if last is not None:
            src.read(band if separate else None, window=last[1])


def cog_from_tiff(source: str | os.PathLike[str], path: str | os.PathLike[str], *, overview: bool = True,
                  overview_resampling: str = "average", compress: str = "DEFLATE",
                  band_descriptions: Sequence[str] | None = None,
                  band_tags: Sequence[dict[str, str]] | None = None) -> Path:
    """Copy a GeoTIFF (for example the plain tiled one that :func:`write_rasters` writes with
    ``cog=False``) into a COG at ``path``, with overviews, atomically. Tags, band descriptions and
    no-data carry over; ``source`` is left as it is. ``band_descriptions`` and ``band_tags`` (one
    per band, from the first) are set on the copy instead (through an in-memory VRT of
    ``source``: the COG layout is written once, never updated). Raises :class:`OutputError`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.cog.tif"
    try:
        _move(_copy_as_cog(Path(source), tmp, path, compress=compress, overview=overview,
                           overview_resampling=overview_resampling,
                           band_descriptions=band_descriptions, band_tags=band_tags), path)
    except BaseException:
        _cleanup(tmp)
        raise
    log.info("wrote %s (COG of %s)", path, Path(source).name)
    return path


def _move(source: Path, path: Path) -> Path:
    failure: OutputError | None = None
    try:
        os.replace(source, path)
    except OSError as exc:
        failure = fsutil.write_failure(path, _detail(exc), exc, what="cannot move the finished raster into place")
    if failure is not None:
        raise failure
    return path


def _cleanup(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        with contextlib.suppress(FileNotFoundError):
            Path(f"{p}.aux.xml").unlink()


__all__ = ["RasterOutput", "cog_from_tiff", "verify_raster", "write_cog", "write_rasters"]
