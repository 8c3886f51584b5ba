"""Cloud mask of L1C scenes: s2cloudless's cloud probability per pixel, averaged, thresholded and grown block by block.

L2A products carry the scene classification (SCL, :mod:`pipeline.stack.masks`);
L1C products carry nothing, so their clouds come from s2cloudless (Sentinel
Hub's LightGBM pixel classifier, whose model ships inside its wheel) run on
the top-of-atmosphere reflectance of :data:`CLOUD_BANDS` on the stack's grid.

Steps, as s2cloudless's own ``get_cloud_masks`` but in metres and exact per block:

1. probability per pixel (bands read as the stack reads them, 20/60 m bands
   upsampled bilinearly onto the 10 m grid), quantised to 1/1000;
   pixels where a band has no data are *unknown*;
2. the mean probability over a disk of :data:`AVERAGE_RADIUS_M` (unknown
   pixels and the outside of the grid do not count), above
   ``mask.cloud_probability``: cloud;
3. clouds grown by a disk of :data:`DILATION_RADIUS_M` plus ``mask.cloud_buffer_m``.

Steps 2 and 3 run with a halo of both radii (:func:`dask.array.map_overlap`)
on integer sums, so the mask is the whole-array mask whatever the block layout.
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
#: Edge of the chunks the detector runs on (at most the block size): the classifier costs far more
#: than reading, and smaller tasks spread one block over all threads.
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
    if grow is not None:
        cloud = dilate(cloud, np.ones_like(cloud), grow)
    return cloud


def footprints(res: float, buffer_m: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The averaging disk and the growing disk (None: no growth) in pixels of size ``res``."""
    average = disk(AVERAGE_RADIUS_M / res)
    assert average is not None  # 220 m is at least one pixel up to 220 m pixels
    return average, disk((DILATION_RADIUS_M + buffer_m) / res)


def mask_from_codes_lazy(codes: da.Array, res: float, threshold: float, buffer_m: float) -> da.Array:
    """:func:`mask_from_codes` of a lazy array of quantised probabilities, block by block with a
    halo of both disks' radii, in ``codes``' chunks (dask enlarges chunks smaller than the halo)."""
    average, grow = footprints(res, buffer_m)
    halo = average.shape[0] // 2 + (0 if grow is None else grow.shape[0] // 2)
    # boundary "none": blocks at the grid's edge get no padding; outside the grid counts as unknown
    depth = {axis: min(halo, size) for axis, size in enumerate(codes.shape)}
    return codes.map_overlap(mask_from_codes, depth=depth, boundary="none", dtype=bool,
                             meta=np.empty((0, 0), bool), average=average, grow=grow, threshold=threshold)


def cloud_exclusion(bands: da.Array, res: float, threshold: float, buffer_m: float,
                    block: int) -> da.Array:
    """Lazy cloud mask (True: cloud or within its buffer) of a ``(band, y, x)`` array of
    :data:`CLOUD_BANDS` reflectance, in ``block`` x ``block`` chunks."""
    codes = bands.map_blocks(probability_codes, drop_axis=0, dtype=np.int16, meta=np.empty((0, 0), np.int16))
    return mask_from_codes_lazy(codes, res, threshold, buffer_m).rechunk((block, block))


def cloud_layer(mask: MaskSection, grid: Grid, bands: Mapping[str, RasterSource], dem: RasterSource,
                block: int) -> da.Array:
    """Lazy s2cloudless cloud mask of a scene on ``grid`` from its opened :data:`CLOUD_BANDS`
    (``dem``: any source, never read), in ``block`` x ``block`` chunks."""
    layer = StackLayer(CLOUD_BANDS, {b: bands[b] for b in CLOUD_BANDS}, dem, grid)
    reflectance = layer.to_dask(min(block, DETECTOR_CHUNK))
    log.info("cloud mask: s2cloudless, probability above %g averaged over %g m, grown by %g + %g m",
             mask.cloud_probability, AVERAGE_RADIUS_M, DILATION_RADIUS_M, mask.cloud_buffer_m)
    return cloud_exclusion(reflectance, grid.res[0], mask.cloud_probability, mask.cloud_buffer_m, block)
