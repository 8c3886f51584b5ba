"""Cloud-optimised GeoTIFF writer that streams dask arrays block by block.

:func:`write_cog` never holds the whole raster: blocks are computed by dask
and written as they arrive into a temporary tiled GeoTIFF (window writes
under a lock), which GDAL's COG driver then copies into COG layout with
overviews. Both temporary files live beside the target and the result is
moved into place with :func:`os.replace`, so readers see either the old file
or the complete new one, and a failure leaves no output behind.

Every file is read back before it moves into place (:func:`pipeline.io.raster_check.verify_raster`):
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
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import dask.array as da
import numpy as np
import rasterio
import rasterio.shutil
import xarray as xr
from rasterio.errors import RasterioError

from pipeline.core import fsutil
from pipeline.core.arrays import as_dask
from pipeline.core.errors import OutputError
from pipeline.core.grid import Grid
from pipeline.core.progress import about_to_compute, compute
from pipeline.io.gdal import error_detail
from pipeline.io.raster_check import RasterLayout, verify_written
from pipeline.io.window_writer import WindowWriter, store_lock, tile_for

log = logging.getLogger(__name__)

TILE = 512
#: DEFLATE level of the finished COGs: the fastest level, for files little larger than at the
#: default level (with the predictor).
DEFLATE_LEVEL = 1


def _as_dask(arr: xr.DataArray | da.Array | np.ndarray, grid: Grid) -> da.Array:
    data = as_dask(arr, (-1,) * (np.ndim(getattr(arr, "data", arr)) - 2) + (2048, 2048), rechunk=False)
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
    reads back (compressing float32 elevation costs far more than writing
    it). Tiles are the blocks' own size when they allow it (see
    :func:`pipeline.io.window_writer.tile_for`).
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


class CogOptions(TypedDict, total=False):
    """The optional settings of :func:`write_cog` (defaults: those of :class:`RasterOutput`)."""

    band_names: Sequence[str] | None
    overview: bool
    overview_resampling: str
    compress: str
    tags: dict[str, str] | None


def write_cog(arr: xr.DataArray | da.Array | np.ndarray, grid: Grid, path: str | os.PathLike[str], *,
              dtype: str | np.dtype[Any], nodata: float | None, **options: Unpack[CogOptions]) -> Path:
    """Write ``arr`` ((band, y, x) or (y, x), lazy or not) on ``grid`` as a COG at ``path``.

    Blocks are computed with the active dask scheduler and written as they
    finish; memory is bounded by a few chunks. Float NaN become ``nodata``
    when ``dtype`` is an integer type. ``options`` (:class:`CogOptions`): band
    names, overviews, compression and tags; ``overview_resampling`` is a GDAL
    name: ``average`` for continuous data, ``nearest`` or ``mode`` for
    classes. Returns the path. Raises :class:`OutputError` when the file
    cannot be written; errors raised while computing blocks (for example an
    :class:`~pipeline.core.errors.InputError` for a corrupt input) propagate
    unchanged. Either way no partial file is left.
    """
    return write_rasters([RasterOutput(arr, Path(path), dtype, nodata, **options)], grid)[0]


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
            store = da.store([p["data"] for p in plans],
                             [WindowWriter(p["tmp_tiff"], p["data"].ndim, p["path"]) for p in plans],
                             lock=store_lock(), compute=False)
            names = ", ".join(p["path"].name for p in plans)
            collections = [store, *(also([p["data"] for p in plans]) if also is not None else [])]
            extra = list(compute(collections, f"computing {names} ({plans[0]['data'].npartitions} block(s))")[1:])
        for p in plans:  # every block stored (a block write that failed and said nothing shows here)
            layout = RasterLayout(grid.width, grid.height, p["count"], p["dtype"].name)
            verify_written(p["tmp_tiff"], p["path"], layout, sparse=True, written=[p["tmp_tiff"]])
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
        raise fsutil.folder_failure(exc, path, f"{path}: cannot create the output folder ({error_detail(exc)})") from None
    stem = f".{path.name}.{uuid.uuid4().hex[:8]}"
    tmp_tiff = path.parent / f"{stem}.tiles.tif"
    tmp_cog = path.parent / f"{stem}.cog.tif"
    tile = tile_for(data.chunks[-2:])
    profile = {
        "driver": "GTiff", "width": grid.width, "height": grid.height, "count": count,
        "dtype": np_dtype.name, "crs": grid.crs, "transform": grid.transform, "nodata": out.nodata,
        "tiled": True, "blockxsize": tile, "blockysize": tile, "bigtiff": "IF_SAFER",
        "interleave": "pixel" if count <= 4 and out.cog else "band",
        **({"compress": "ZSTD", "zstd_level": 1} if out.cog else {"compress": "NONE"}),
        # every tile is written by the store: without this GDAL writes every tile of an
        # uncompressed file as zeros first, before the inference can start
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
        failure = fsutil.write_failure(path, error_detail(exc), exc, written=[tmp_tiff],
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
            layout = RasterLayout(src.width, src.height, src.count, src.dtypes[0])
        if band_descriptions or band_tags:
            with _described(source, band_descriptions or (), band_tags or ()) as vrt:
                rasterio.shutil.copy(vrt, dest, driver="COG", **options)
        else:
            rasterio.shutil.copy(source, dest, driver="COG", **options)
    except (RasterioError, OSError) as exc:
        failure = fsutil.write_failure(path, error_detail(exc), exc, needed=_size(source), written=[dest],
                                       what="cannot write the COG")
    if failure is not None:
        raise failure
    # GDAL's COG driver with several threads reports no failed write: read the copy back
    verify_written(dest, path, layout, needed=_size(source), written=[dest])
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
        failure = fsutil.write_failure(path, error_detail(exc), exc, what="cannot move the finished raster into place")
    if failure is not None:
        raise failure
    return path


def _cleanup(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        with contextlib.suppress(FileNotFoundError):
            Path(f"{p}.aux.xml").unlink()


__all__ = ["CogOptions", "RasterOutput", "cog_from_tiff", "write_cog", "write_rasters"]
