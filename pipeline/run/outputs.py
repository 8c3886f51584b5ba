"""Output writers that run beside the postprocessing: low-priority threads, the quicklook's inputs.

The probability and mask COGs and the quicklook's background are made in threads of the main
process at the lowest CPU priority, so that they take the CPU the postprocessing's passes leave
idle instead of slowing them down.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import SceneConfig
from pipeline.core.probability import PROB_NODATA

log = logging.getLogger(__name__)


#: Niceness of the output threads (probability and mask COGs, quicklook background).
BACKGROUND_NICE = 19


def _lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to every other runnable thread (Linux: a thread's own
    nice value; elsewhere nothing). The output threads run beside the postprocessing, whose passes
    follow one another: at the lowest priority they take the CPU the passes leave idle (this
    process's resolving and merging, the workers' waits) instead of slowing the passes down."""
    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        with suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), BACKGROUND_NICE))


def _in_background(fn: Any, graph_first: bool = False) -> Any:
    from pipeline.io.cog import BEFORE_CONVERT, GDAL_THREADS

    if graph_first:
        # the Dask graph is built and sent at normal priority (a fraction of a second): the workers
        # start on it at once instead of when this process's other threads leave the CPU idle
        BEFORE_CONVERT.set(_lower_thread_priority)
    else:
        _lower_thread_priority()  # the pool's threads serve only this run's outputs and end with it
    # no GDAL worker threads from here: they would inherit the low priority and outlive the pool
    GDAL_THREADS.set(1)  # (in this job's own copy of the context)
    return fn()


def submit(pool: ThreadPoolExecutor, fn: Any, *args: Any, graph_first: bool = False, **kwargs: Any) -> Any:
    """``pool.submit`` at the lowest CPU priority (:func:`_lower_thread_priority`), in a copy of this
    thread's context (a Dask client made current with ``Client.as_current()`` stays the one that
    computes). ``graph_first``: ``fn`` writes rasters from a Dask computation
    (:func:`pipeline.io.cog.write_rasters`), and the thread keeps its priority until that computation
    is sent and done; only the COG copies run at the lowest priority."""
    return pool.submit(contextvars.copy_context().run, _in_background, functools.partial(fn, *args, **kwargs),
                       graph_first)


def submit_now(pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
    """``pool.submit`` at normal priority, in a copy of this thread's context."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


@contextmanager
def mask_in_graphs(grid: Any) -> Iterator[None]:
    """Postprocessing and the mask raster send the bit-packed cleaned mask to the workers inside
    their graphs, on purpose (:func:`postprocess.packed_mask.persist_mask`: one bit per pixel).
    Distributed warns about every graph above 10 MB; that warning says nothing useful here and
    would appear four times per scene in every nightly log. The threshold is raised by twice the
    packed mask while these graphs are sent (a setting of Dask's, not a warnings filter: other
    threads' warnings are not touched)."""
    import dask
    from dask.utils import parse_bytes

    key = "distributed.admin.large-graph-warning-threshold"
    packed = grid.height * ((grid.width + 7) // 8)
    current = parse_bytes(str(dask.config.get(key, "10MB")))
    with dask.config.set({key: max(current, parse_bytes("10MB") + 2 * packed)}):
        yield


def write_quicklook(background: Any, grid: Any, gdf: Any, path: Path) -> None:
    """The quicklook from its background (a future of :func:`quicklook_background`) and the polygons."""
    from postprocess.quicklook import write_quicklook_coarse

    coarse = background.result()
    if coarse is not None:
        small, factor, shown = coarse
        write_quicklook_coarse(small, factor, grid, gdf, path, valid=shown)


def quicklook_coarse(grid: Any) -> tuple[tuple[str, ...], int]:
    """The quicklook's true-colour channels and its coarsening factor on ``grid``."""
    from postprocess.quicklook import TRUE_COLOUR, downsample_factor

    return tuple(TRUE_COLOUR), downsample_factor(grid.shape, QUICKLOOK_SIZE)


#: Longest edge of the quicklook, in pixels (at most).
QUICKLOOK_SIZE = 2048


def quicklook_background(cfg: SceneConfig, grid: Any, prob_path: Path,
                          true_colour: Any = None) -> tuple[Any, int, Any] | None:
    """The quicklook's true colour averaged straight onto its coarse grid, the coarsening factor and
    where something was analysed (elsewhere the quicklook is black); None without true-colour bands.

    ``true_colour`` holds the means when the inference averaged the bands already as it read them
    (:func:`pipeline.inference.tiled.predict`'s ``coarse``, asked for with :func:`quicklook_coarse`);
    else they are read here, decimated.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from pipeline.core.errors import ChannelError
    from pipeline.stack.coarse import read_coarse

    channels, factor = quicklook_coarse(grid)
    if true_colour is not None:
        small = np.asarray(true_colour, np.float32)
    else:
        try:
            small = read_coarse(cfg, channels, grid, factor)
        except ChannelError as exc:
            log.info("no quicklook: %s", exc)
            return None
    rows, cols = small.shape[1:]
    with rasterio.open(prob_path) as src:  # uncompressed uint8: cheap to read even without overviews
        prob = src.read(1, window=Window(0, 0, cols * factor, rows * factor), out_shape=(rows, cols),
                        resampling=Resampling.nearest)
    return small, factor, prob != np.uint8(PROB_NODATA)


