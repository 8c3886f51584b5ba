"""Quicklook PNG: true-colour background with the landslide outlines.

The background is B04/B03/B02 averaged by an integer factor so that the
longest edge is at most ``max_size`` pixels, then stretched per band between
two percentiles of the valid pixels. :func:`write_quicklook_coarse` takes
bands already averaged on the coarse grid (the run reads them that way with
GDAL, :func:`pipeline.stack.coarse.read_coarse`); :func:`write_quicklook` averages
a stack block-wise (:func:`dask.array.coarsen`; only the small result is
loaded). Polygon outlines are drawn with :class:`PIL.ImageDraw.ImageDraw`.
The PNG is written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import geopandas as gpd
import numpy as np
import shapely
import xarray as xr
from PIL import Image, ImageDraw

from pipeline.core import fsutil
from pipeline.core.errors import ChannelError, OutputError
from pipeline.core.fsutil import WriteCheckFailed
from pipeline.core.grid import Grid

log = logging.getLogger(__name__)

#: zlib level of the quicklook PNG: faster than Pillow's default (6), for a slightly larger file.
PNG_LEVEL = 3

TRUE_COLOUR: tuple[str, str, str] = ("B04", "B03", "B02")


@dataclass(frozen=True)
class QuicklookStyle:
    """How the quicklook looks: each band stretched between two ``percentiles`` of its valid
    pixels; polygon outlines drawn in ``colour`` (RGB), ``width`` pixels wide."""

    percentiles: tuple[float, float] = (2.0, 98.0)
    colour: tuple[int, int, int] = (255, 255, 0)
    width: int = 1


DEFAULT_STYLE = QuicklookStyle()


def downsample_factor(shape: tuple[int, int], max_size: int) -> int:
    """Smallest integer factor that brings the longest edge to at most ``max_size``."""
    return max(1, math.ceil(max(shape) / max_size))


def _block_mean(block: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(block)
        total = np.where(finite, block, 0).sum(axis=axis)
        count = finite.sum(axis=axis)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def true_colour(
    data: xr.DataArray,
    *,
    valid: xr.DataArray | None = None,
    bands: Sequence[str] = TRUE_COLOUR,
    max_size: int = 2048,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> tuple[np.ndarray, int]:
    """Stretched uint8 RGB array (rows, cols, 3) and the downsampling factor."""
    names = [str(b) for b in data["band"].values] if "band" in data.coords else []
    missing = [b for b in bands if b not in names]
    if missing:
        raise ChannelError(
            f"quicklook needs bands {', '.join(bands)}; missing {', '.join(missing)} "
            f"(stack has {', '.join(names) or 'no band names'})"
        )
    rgb = data.sel(band=list(bands)).data
    if not isinstance(rgb, da.Array):
        rgb = da.from_array(np.asarray(rgb), chunks=(len(bands), 2048, 2048))
    rgb = rgb.astype(np.float32)
    if valid is not None:
        v = getattr(valid, "data", valid)
        v = v if isinstance(v, da.Array) else da.from_array(np.asarray(v), chunks=rgb.chunks[1:])
        rgb = da.where(v.rechunk(rgb.chunks[1:])[None, :, :], rgb, np.nan)
    factor = downsample_factor(rgb.shape[1:], max_size)
    rows, cols = rgb.shape[1] // factor * factor, rgb.shape[2] // factor * factor
    if rows == 0 or cols == 0:
        rows, cols, factor = rgb.shape[1], rgb.shape[2], 1
    rgb = rgb[:, :rows, :cols]
    if factor > 1:
        # blocks must be multiples of the factor for a block-wise coarsen
        def aligned(chunks: tuple[int, ...]) -> tuple[int, ...]:
            size = max(factor, (max(chunks) // factor) * factor)
            n_full, rest = divmod(sum(chunks), size)
            return (size,) * n_full + ((rest,) if rest else ())

        rgb = rgb.rechunk((len(bands), aligned(rgb.chunks[1]), aligned(rgb.chunks[2])))
        small = da.coarsen(_block_mean, rgb, {1: factor, 2: factor}).compute()
    else:
        small = rgb.compute()
    return stretch(small, percentiles), factor


def stretch(small: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
    """(3, rows, cols) float reflectance -> (rows, cols, 3) uint8, each band stretched between two
    percentiles of its finite pixels; NaN pixels are black."""
    out = np.zeros(small.shape[1:] + (3,), dtype=np.uint8)
    for k in range(3):
        band = small[k]
        finite = np.isfinite(band)
        if not finite.any():
            continue
        lo, hi = np.percentile(band[finite], percentiles)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        stretched = np.clip((band - lo) * scale, 0, 255)
        out[..., k] = np.where(finite, stretched, 0).astype(np.uint8)
    return out


def draw_outlines(
    image: Image.Image,
    polygons: gpd.GeoDataFrame,
    grid: Grid,
    factor: int,
    *,
    colour: tuple[int, int, int] = (255, 255, 0),
    width: int = 1,
) -> None:
    """Draw polygon rings (exterior and holes) on ``image`` in place."""
    if polygons is None or len(polygons) == 0:
        return
    geoms = polygons.to_crs(grid.crs).geometry.values if polygons.crs != grid.crs else polygons.geometry.values
    t = grid.transform
    draw = ImageDraw.Draw(image)
    rings = shapely.get_rings(shapely.get_parts(np.asarray(geoms, dtype=object)))
    for ring in rings:
        xy = shapely.get_coordinates(ring)
        cols = (xy[:, 0] - t.c) / t.a / factor
        rows = (xy[:, 1] - t.f) / t.e / factor
        pts = list(zip(cols.tolist(), rows.tolist(), strict=True))
        if len(pts) >= 2:
            draw.line(pts, fill=colour, width=width)


def write_quicklook(
    data: xr.DataArray,
    grid: Grid,
    polygons: gpd.GeoDataFrame | None,
    path: Path | str,
    *,
    valid: xr.DataArray | None = None,
    bands: Sequence[str] = TRUE_COLOUR,
    max_size: int = 2048,
    style: QuicklookStyle = DEFAULT_STYLE,
) -> Path:
    """Write the quicklook PNG of a stack ``data`` (band, y, x) with polygon outlines.

    Raises :class:`ChannelError` when the stack lacks a true-colour band and
    :class:`OutputError` when the file cannot be written.
    """
    pixels, factor = true_colour(data, valid=valid, bands=bands, max_size=max_size,
                                 percentiles=style.percentiles)
    return _render(pixels, factor, grid, polygons, Path(path), style)


def write_quicklook_coarse(
    small: np.ndarray,
    factor: int,
    grid: Grid,
    polygons: gpd.GeoDataFrame | None,
    path: Path | str,
    *,
    valid: np.ndarray | None = None,
    style: QuicklookStyle = DEFAULT_STYLE,
) -> Path:
    """Write the quicklook from true colour already averaged by ``factor``: ``small`` is
    (3, rows, cols) B04/B03/B02 on ``grid`` coarsened ``factor`` times
    (:func:`pipeline.stack.coarse.read_coarse`), ``valid`` an optional (rows, cols)
    mask of the analysed pixels (others are black and do not set the stretch)."""
    if small.ndim != 3 or small.shape[0] != 3:
        raise ValueError(f"expected (3, rows, cols) true colour, got shape {small.shape}")
    if valid is not None:
        small = np.where(valid[None], small, np.float32(np.nan))
    return _render(stretch(small, style.percentiles), factor, grid, polygons, Path(path), style)


def _render(pixels: np.ndarray, factor: int, grid: Grid, polygons: gpd.GeoDataFrame | None, path: Path,
            style: QuicklookStyle) -> Path:
    image = Image.fromarray(pixels, mode="RGB")
    draw_outlines(image, polygons, grid, factor, colour=style.colour, width=style.width)  # type: ignore[arg-type]
    save_png_atomic(image, path, compress_level=PNG_LEVEL)
    log.info("quicklook %s (%d x %d, factor %d)", path, image.width, image.height, factor)
    return path


def save_png_atomic(image: Image.Image, path: Path, **kwargs: Any) -> None:
    """Save a PNG to a temporary file beside ``path``, check it (:func:`verify_png`), then
    rename it into place. A failed write raises :class:`~pipeline.core.errors.DiskFull` when the disk
    is full, else :class:`~pipeline.core.errors.OutputError`; the temporary file is removed."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = fsutil.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise fsutil.folder_failure(
            exc, path, f"output directory {directory} is not writable: {exc.strerror or exc}") from exc
    failure: OutputError | None = None
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                image.save(fh, format="PNG", **kwargs)
                fh.flush()
                written = fh.tell()
            verify_png(tmp, written, image.size)
            os.replace(tmp, path)
        except (OSError, WriteCheckFailed) as exc:
            failure = fsutil.write_failure(path, str(exc), exc, written=[tmp])
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if failure is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise failure


def verify_png(path: str | os.PathLike[str], size: int | None = None,
               dimensions: tuple[int, int] | None = None) -> None:
    """Read back a PNG just written: its size on disk (``size`` bytes written), its width and
    height, and Pillow's ``verify`` (every chunk's CRC, up to the end chunk; a truncated file
    fails). Raises :class:`~pipeline.core.fsutil.WriteCheckFailed`."""
    on_disk = os.stat(path).st_size
    if size is not None and on_disk != size:
        raise WriteCheckFailed(f"the file holds {on_disk} of the {size} bytes written")
    try:
        with Image.open(path) as im:
            if dimensions is not None and im.size != tuple(dimensions):
                raise WriteCheckFailed(f"{im.size[0]} x {im.size[1]} px read back, expected "
                                       f"{dimensions[0]} x {dimensions[1]}")
            im.verify()
    except WriteCheckFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises SyntaxError, OSError, struct.error ...
        raise WriteCheckFailed(f"not a readable PNG ({type(exc).__name__}: {exc})") from None
