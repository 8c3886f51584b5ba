"""Per-band statistics of a whole scene, for the ``scene_robust`` normalization.

A model trained with ``scene_robust`` sees every window standardized by the
median and IQR of its band over the *scene* (see
:mod:`pipeline.normalization`). Reading a whole Sentinel-2 tile once more
just for two numbers per band would cost as much as stacking it, so the
statistics come from a spatially stratified sample: ``windows`` square
windows of ``size`` pixels on a regular lattice over the grid (a 10980 px
tile: 64 windows of 256 px, 3.5 % of the pixels, spread over the whole
tile). The windows are chunks of a stack graph built with ``size`` blocks,
so only they are read. The sample depends only on the grid, never on the
processing block size or the cluster, so a scene is normalized the same way
in every run.

When the sampled windows hold fewer than ``min_pixels`` valid pixels (a
mostly cloudy scene), every window of the lattice over the whole grid is
read instead and every ``stride``-th pixel of it is kept. A scene without
any valid pixel gets neutral statistics (nothing is predicted on it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import SceneConfig
from .normalization import BandStats, band_stats

log = logging.getLogger(__name__)

#: Default sample: windows on the lattice, edge in pixels, minimum valid pixels.
SAMPLE_WINDOWS = 64
SAMPLE_SIZE = 256
MIN_PIXELS = 65536


def sample_origins(height: int, width: int, windows: int = SAMPLE_WINDOWS, size: int = SAMPLE_SIZE) -> list[tuple[int, int]]:
    """Chunk-aligned origins (row, col) of about ``windows`` windows of ``size`` px spread over the grid.

    Origins are multiples of ``size`` (so each window is one chunk of a
    stack built with ``size`` blocks), on a lattice of about
    ``sqrt(windows)`` rows and columns, one per equal strip, symmetric about
    the middle of the grid (so a trend across the scene does not shift the
    sample). A grid with no more than ``windows`` chunks is sampled whole.
    """
    n_r, n_c = math.ceil(height / size), math.ceil(width / size)
    if n_r * n_c <= windows:
        return [(i * size, j * size) for i in range(n_r) for j in range(n_c)]
    k_r = max(1, min(n_r, round(math.sqrt(windows * n_r / n_c))))
    k_c = max(1, min(n_c, windows // k_r))
    rows = _spread(n_r, k_r)
    cols = _spread(n_c, k_c)
    return [(r * size, c * size) for r in rows for c in cols]


def _spread(n: int, k: int) -> list[int]:
    """``k`` of the ``n`` chunk indices, one per equal strip, placed symmetrically about the middle.

    The chunk holding each strip's centre, mirrored from the first half to
    the second so that the sample is not shifted towards one side.
    """
    first = [min(n - 1, math.floor((i + 0.5) * n / k)) for i in range(k // 2)]
    middle = [(n - 1) // 2] if k % 2 else []
    return sorted({*first, *middle, *(n - 1 - i for i in first)})


def _sample(data: Any, valid: Any, origins: Sequence[tuple[int, int]], size: int, stride: int,
            scheduler: str | None = None, threads: int | None = None) -> np.ndarray:
    """Valid pixels (C, N) of the windows at ``origins``, every ``stride``-th row and column.

    ``data`` (C, H, W) and ``valid`` (H, W) are numpy or dask arrays.
    """
    import dask

    h, w = valid.shape
    parts = []
    for r, c in origins:
        win = (slice(r, min(r + size, h), stride), slice(c, min(c + size, w), stride))
        parts.append((data[(slice(None), *win)], valid[win]))
    extra = {"num_workers": threads} if threads and scheduler == "threads" else {}
    values = dask.compute(*parts, scheduler=scheduler, **extra)
    n_c = data.shape[0]
    out = [np.asarray(d, np.float32).reshape(n_c, -1)[:, np.asarray(v, bool).ravel()] for d, v in values]
    return np.concatenate(out, axis=1) if out else np.empty((n_c, 0), np.float32)


def _stats(data: Any, valid: Any, channels: Sequence[str], windows: int, size: int, min_pixels: int,
           scheduler: str | None = None, threads: int | None = None) -> BandStats:
    height, width = valid.shape
    origins = sample_origins(height, width, windows, size)
    values = _sample(data, valid, origins, size, 1, scheduler, threads)
    how = "the whole scene" if size >= max(height, width) else f"{len(origins)} windows of {size} px"
    n_r, n_c = math.ceil(height / size), math.ceil(width / size)
    if values.shape[1] < min_pixels and len(origins) < n_r * n_c:
        # mostly cloudy or outside the footprint: look everywhere, thinned
        stride = max(1, int(math.sqrt(height * width / (windows * size * size))))
        log.info("scene statistics: %d valid pixels in the sample; reading the whole scene (every %d-th pixel)",
                 values.shape[1], stride)
        everywhere = [(i * size, j * size) for i in range(n_r) for j in range(n_c)]
        values = _sample(data, valid, everywhere, size, stride, scheduler, threads)
        how = f"the whole scene, every {stride}-th pixel"
    stats = band_stats(values, list(channels))
    log.info("scene statistics of %d channels from %d valid pixels (%s)", len(channels), stats.n_pixels, how)
    if stats.n_pixels == 0:
        log.warning("scene statistics: no valid pixel in the scene; neutral statistics used")
    return stats


def array_band_stats(
    data: Any,
    valid: Any,
    *,
    windows: int = SAMPLE_WINDOWS,
    size: int = SAMPLE_SIZE,
    min_pixels: int = MIN_PIXELS,
) -> BandStats:
    """The statistics of a stacked scene given as arrays: ``data`` (band, y, x) and ``valid`` (y, x).

    Takes xarray DataArrays (channel names from the ``band`` coordinate),
    numpy or dask arrays. The same lattice sample as :func:`scene_band_stats`;
    with large dask chunks each sampled window reads its whole chunk, so for
    a lazy stack prefer :func:`scene_band_stats`.
    """
    channels = [str(b) for b in data.coords["band"].values] if hasattr(data, "coords") else [
        str(i) for i in range(data.shape[0])]
    raw = getattr(data, "data", data)
    mask = getattr(valid, "data", valid)
    return _stats(raw, mask, channels, windows, size, min_pixels)


def scene_band_stats(
    cfg: SceneConfig,
    channels: Sequence[str],
    *,
    windows: int = SAMPLE_WINDOWS,
    size: int = SAMPLE_SIZE,
    min_pixels: int = MIN_PIXELS,
    scheduler: str | None = None,
    threads: int | None = None,
) -> BandStats:
    """Median and robust scale of ``channels`` over the scene of ``cfg`` (a sample, see the module doc).

    Computes on the current Dask client when there is one, or with the given
    Dask ``scheduler`` (``"threads"``: in this process, for example while a
    local cluster is still starting; ``threads`` of them, default one per core).
    """
    from .stack import stack_scene

    t0 = time.perf_counter()
    fine_cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"block_size": size})})
    stack = stack_scene(fine_cfg, channels)
    height, width = stack.valid.shape
    if math.ceil(height / size) * math.ceil(width / size) <= windows:
        # The sample is the whole scene: read it in the run's blocks instead. Same pixels, same
        # statistics, far fewer reads: a JPEG 2000 band stored as one block is decoded whole for
        # every window read from it (a 1020 px demo scene: 11.4 s in 256 px windows, 1.6 s at once).
        stack = stack_scene(cfg, channels)
        size = max(height, width)
    # in this process (threads): each thread opens each file once for all its windows
    kept_open = stack.reader.files_kept_open() if stack.reader is not None else contextlib.nullcontext()
    with kept_open:
        stats = _stats(stack.data.data, stack.valid.data, [str(c) for c in stack.data.band.values],
                       windows, size, min_pixels, scheduler, threads)
    log.debug("scene statistics in %.1f s", time.perf_counter() - t0)
    return stats
