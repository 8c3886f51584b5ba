"""Cloud mask of L1C scenes: s2cloudless's cloud probability on 60 m cells, averaged and thresholded
there, then brought back to the grid and grown, block by block.

L2A products carry the scene classification (SCL, :mod:`pipeline.stack.masks`);
L1C products carry nothing, so their clouds come from s2cloudless (Sentinel
Hub's LightGBM pixel classifier, whose model ships inside its wheel) run on
the top-of-atmosphere reflectance of :data:`CLOUD_BANDS` on the stack's grid.

s2cloudless was made for coarse pixels (its authors run it at 160 m; B01, B09
and B10 are 60 m bands), so it runs on cells of :data:`COARSE_M` (6 x 6 pixels
of 10 m, aligned to the grid's origin; the last row and column of cells may be
partial). Steps, as s2cloudless's own ``get_cloud_masks`` but in metres and
exact per block:

1. each cell's reflectance: the mean of its pixels where every band has data
   (bands read as the stack reads them, 20/60 m bands upsampled bilinearly
   onto the grid), then its probability, quantised to 1/1000; cells without
   such a pixel are *unknown*;
2. the mean probability over a disk of :data:`AVERAGE_RADIUS_M` of cells
   (unknown cells and the outside of the grid do not count), above
   ``mask.cloud_probability``: cloud;
3. each pixel takes its cell's value, and clouds are grown on the grid by a
   disk of :data:`DILATION_RADIUS_M` plus ``mask.cloud_buffer_m``.

The detector's chunks are whole cells from the grid's origin, and steps 2 and
3 run with a halo of their radius (:func:`dask.array.map_overlap`) on integer
sums, so the mask is the whole-array mask (:func:`cloud_mask`) whatever the
block layout.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np

from pipeline.core.config import MaskSection
from pipeline.core.errors import ConfigError
from pipeline.core.grid import Grid
from pipeline.io.raster_source import RasterSource
from pipeline.io.sentinel2 import SceneInputs
from pipeline.stack.lazy_arrays import StackLayer
from postprocess.morphology import dilate, disk

log = logging.getLogger(__name__)

#: The bands s2cloudless's model reads, in its order (``s2cloudless.utils.MODEL_BANDS``).
CLOUD_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")
#: Radius of the averaging disk. s2cloudless works at 160 m with ``average_over=4`` px; Sentinel
#: Hub's recommendation for 10 m pixels is ``average_over=22`` px, i.e. 220 m (scaling 4 px at
#: 160 m would give 640 m and erase every cloud under about 800 m across).
AVERAGE_RADIUS_M = 220.0
#: Radius of s2cloudless's own dilation: ``dilation_size=2`` px at 160 m, Sentinel Hub's
#: recommendation for 10 m pixels ``dilation_size=11`` px, i.e. 110 m. ``mask.cloud_buffer_m``
#: is added to it: clouds are grown by one disk of the sum.
DILATION_RADIUS_M = 110.0
#: Probabilities are kept as integers in 1/SCALE (unknown: -1), so that the disk sums are exact.
SCALE = 1000
#: Edge of the cells the detector classifies (s2cloudless's coarsest input bands are 60 m).
COARSE_M = 60.0
#: Largest edge of the grid chunks the detector reads (the block size when smaller), rounded down to
#: whole cells: smaller tasks spread one block over all threads.
DETECTOR_CHUNK = 512

_local = threading.local()


def scene_level(scene: SceneInputs, configured: str | None) -> str | None:
    """The scene's processing level: from the SAFE metadata, else ``scene.level`` (None: unknown)."""
    return scene.product[3:] if scene.product.startswith("S2_") else configured


def _installed() -> bool:
    return importlib.util.find_spec("s2cloudless") is not None


def use_detector(mask: MaskSection, scene: SceneInputs, level: str | None, where: str = "") -> bool:
    """Whether s2cloudless masks this scene's clouds (``mask.cloud_detector``).

    ``auto``: for L1C scenes that have :data:`CLOUD_BANDS` (a warning and no cloud mask when
    bands are missing); L2A scenes use their SCL. ``s2cloudless``: always, and an error when the
    scene lacks bands or is L2A (the model was trained on top-of-atmosphere reflectance).
    ``where``: the config file, for messages.
    """
    choice = mask.cloud_detector
    if choice == "none":
        return False
    missing = [b for b in CLOUD_BANDS if b not in scene.bands]
    field = f"{where}: mask.cloud_detector" if where else "mask.cloud_detector"
    if choice == "s2cloudless":
        if missing:
            raise ConfigError(
                f"{field}: s2cloudless needs bands {', '.join(CLOUD_BANDS)}; {scene.describe()} lacks "
                f"{', '.join(missing)}. Give those bands, or set mask.cloud_detector: none")
        if level == "L2A":
            raise ConfigError(
                f"{field}: s2cloudless reads top-of-atmosphere (L1C) reflectance, but {scene.describe()} "
                "is L2A; use mask.cloud_detector: auto (its SCL masks the clouds) or none")
    elif level != "L1C":
        if level is None and scene.scl is None:
            log.warning("%s: processing level unknown and no SCL: clouds are not masked; set scene.level: "
                        "L1C to have s2cloudless mask them", scene.describe())
        return False
    elif missing:
        log.warning("%s: L1C without band(s) %s that the cloud detector (s2cloudless) needs: clouds are "
                    "NOT masked", scene.describe(), ", ".join(missing))
        return False
    if not _installed():
        raise ConfigError(f"{field}: {choice} needs the s2cloudless package (pip install s2cloudless), "
                          "or set mask.cloud_detector: none")
    return True


def _detector() -> Any:
    """This thread's s2cloudless detector (its LightGBM model loads once per thread)."""
    det = getattr(_local, "detector", None)
    if det is None:
        from s2cloudless import S2PixelCloudDetector

        det = _local.detector = S2PixelCloudDetector(all_bands=False)
    return det


def probability_codes(bands: np.ndarray) -> np.ndarray:
    """s2cloudless's cloud probability of a ``(band, y, x)`` block of :data:`CLOUD_BANDS` reflectance,
    in 1/:data:`SCALE` as int16; -1 where a band has no data."""
    out = np.full(bands.shape[1:], -1, np.int16)
    known = np.isfinite(bands).all(axis=0)
    if known.any():
        pixels = np.ascontiguousarray(bands[:, known].T, dtype=np.float32)  # (n, band)
        # one thread per call: the workers run one task per thread already
        prob = _detector().get_cloud_probability_maps(pixels[None, :, None, :], num_threads=1)[0, :, 0]
        out[known] = np.rint(np.clip(prob, 0.0, 1.0) * SCALE).astype(np.int16)
    return out


def coarse_factor(res: float) -> int:
    """Grid pixels along a cell's edge: :data:`COARSE_M` over the pixel size, rounded (at least 1)."""
    return max(1, int(round(COARSE_M / res)))


def cell_means(bands: np.ndarray, factor: int) -> np.ndarray:
    """Mean of a ``(band, y, x)`` block over ``factor`` x ``factor`` cells from its origin (the last
    row and column of cells partial when the block is not whole cells), over the pixels where every
    band has data; NaN in cells without such a pixel."""
    nb, h, w = bands.shape
    ch, cw = -(-h // factor), -(-w // factor)
    known = np.isfinite(bands).all(axis=0)
    sums = np.zeros((nb, ch * factor, cw * factor), np.float64)
    sums[:, :h, :w] = np.where(known, bands, 0.0)
    count = np.zeros((ch * factor, cw * factor), np.float64)
    count[:h, :w] = known
    total = sums.reshape(nb, ch, factor, cw, factor).sum(axis=(2, 4))
    n = count.reshape(ch, factor, cw, factor).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / n).astype(np.float32)


def coarse_codes(bands: np.ndarray, factor: int) -> np.ndarray:
    """:func:`probability_codes` of a ``(band, y, x)`` block's ``factor`` x ``factor`` cells."""
    return probability_codes(cell_means(bands, factor))


def _disk_sum(values: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Sum of integer ``values`` over ``footprint`` around each pixel (outside = 0), exactly: the
    FFT's rounding error is far below one half for these magnitudes, so rounding restores the sum."""
    from scipy.signal import fftconvolve

    return np.rint(fftconvolve(values.astype(np.float64), footprint.astype(np.float64), mode="same"))


def mask_from_codes(codes: np.ndarray, average: np.ndarray, grow: np.ndarray | None,
                    threshold: float) -> np.ndarray:
    """Cloud mask of quantised probabilities (a whole array, or a block with its halo): mean over the
    ``average`` disk of the known pixels above ``threshold``, grown by the ``grow`` disk."""
    known = codes >= 0
    total = _disk_sum(np.where(known, codes, 0), average)
    count = _disk_sum(known, average)
    cloud = (count > 0) & (total > threshold * SCALE * count)
    return grow_clouds(cloud, grow)


def grow_clouds(cloud: np.ndarray, grow: np.ndarray | None) -> np.ndarray:
    """``cloud`` dilated by the ``grow`` disk (None: unchanged); the outside counts as clear."""
    return cloud if grow is None else dilate(cloud, np.ones_like(cloud), grow)


def to_grid(cells: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """A ``shape`` array whose pixels take the value of their ``factor`` x ``factor`` cell (cells
    from the array's origin, the last ones cut by its edge)."""
    return np.repeat(np.repeat(cells, factor, axis=0), factor, axis=1)[: shape[0], : shape[1]]


def footprints(res: float, buffer_m: float, factor: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """The averaging disk in cells of ``factor`` pixels of size ``res``, and the growing disk (None:
    no growth) in pixels."""
    average = disk(AVERAGE_RADIUS_M / (res * factor))
    if average is None:  # cells wider than the disk: each cell on its own
        average = np.ones((1, 1), bool)
    return average, disk((DILATION_RADIUS_M + buffer_m) / res)


def cloud_mask(bands: np.ndarray, res: float, threshold: float, buffer_m: float) -> np.ndarray:
    """Cloud mask (True: cloud or within its buffer) of a whole ``(band, y, x)`` array of
    :data:`CLOUD_BANDS` reflectance with pixels of ``res``: what :func:`cloud_exclusion` gives
    block by block."""
    factor = coarse_factor(res)
    average, grow = footprints(res, buffer_m, factor)
    cells = mask_from_codes(coarse_codes(bands, factor), average, None, threshold)
    return grow_clouds(to_grid(cells, factor, bands.shape[1:]), grow)


def _with_halo(arr: da.Array, func: Any, halo: int, **kwargs: Any) -> da.Array:
    """``func`` of each block of a 2-D array with a halo of ``halo`` pixels, none beyond the array's
    edge (there the whole-array function sees no pixel either)."""
    if halo == 0:
        return arr.map_blocks(func, dtype=bool, meta=np.empty((0, 0), bool), **kwargs)
    depth = {axis: min(halo, size) for axis, size in enumerate(arr.shape)}
    return arr.map_overlap(func, depth=depth, boundary="none", dtype=bool, meta=np.empty((0, 0), bool),
                           **kwargs)


def _to_grid_block(cells: np.ndarray, factor: int, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    assert block_info is not None
    return to_grid(cells, factor, block_info[None]["chunk-shape"])


def whole_cells(bands: da.Array, factor: int) -> da.Array:
    """``bands`` rechunked, where needed, so that every chunk but the last along each axis holds
    whole cells: the cells then start at the grid's origin whatever the chunks."""
    if all(c % factor == 0 for axis in bands.chunks[1:] for c in axis[:-1]):
        return bands
    edge = factor * max(1, max(bands.chunksize[1:]) // factor)
    return bands.rechunk({1: edge, 2: edge})


def cloud_exclusion(bands: da.Array, res: float, threshold: float, buffer_m: float,
                    block: int) -> da.Array:
    """Lazy :func:`cloud_mask` of a ``(band, y, x)`` array of :data:`CLOUD_BANDS` reflectance, in
    ``block`` x ``block`` chunks: the same for every chunk layout of ``bands``."""
    factor = coarse_factor(res)
    bands = whole_cells(bands, factor)
    average, grow = footprints(res, buffer_m, factor)
    cell_chunks = tuple(tuple(-(-c // factor) for c in axis) for axis in bands.chunks[1:])
    codes = bands.map_blocks(coarse_codes, factor, drop_axis=0, chunks=cell_chunks, dtype=np.int16,
                             meta=np.empty((0, 0), np.int16))
    cells = _with_halo(codes, mask_from_codes, average.shape[0] // 2, average=average, grow=None,
                       threshold=threshold)
    # map_overlap may have merged chunks smaller than the halo: the grid's chunks follow the cells'
    grid_chunks = tuple(tuple(min(c * factor, size - factor * sum(axis[:i])) for i, c in enumerate(axis))
                        for axis, size in zip(cells.chunks, bands.shape[1:], strict=True))
    cloud = cells.map_blocks(_to_grid_block, factor, chunks=grid_chunks, dtype=bool,
                             meta=np.empty((0, 0), bool))
    if grow is not None:
        cloud = _with_halo(cloud, grow_clouds, grow.shape[0] // 2, grow=grow)
    return cloud.rechunk((block, block))


def cloud_layer(mask: MaskSection, grid: Grid, bands: Mapping[str, RasterSource], dem: RasterSource,
                block: int) -> da.Array:
    """Lazy s2cloudless cloud mask of a scene on ``grid`` from its opened :data:`CLOUD_BANDS`
    (``dem``: any source, never read), in ``block`` x ``block`` chunks."""
    layer = StackLayer(CLOUD_BANDS, {b: bands[b] for b in CLOUD_BANDS}, dem, grid)
    factor = coarse_factor(grid.res[0])
    reflectance = layer.to_dask(factor * max(1, min(block, DETECTOR_CHUNK) // factor))
    log.info("cloud mask: s2cloudless on %g m cells, probability above %g averaged over %g m, grown by "
             "%g + %g m", factor * grid.res[0], mask.cloud_probability, AVERAGE_RADIUS_M, DILATION_RADIUS_M,
             mask.cloud_buffer_m)
    return cloud_exclusion(reflectance, grid.res[0], mask.cloud_probability, mask.cloud_buffer_m, block)
