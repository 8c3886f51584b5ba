"""Array helpers of the demo scene: smooth random fields, block means and pixel windows."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Row and column bounds of a part of the scene: (row0, row1, col0, col1), ends exclusive.
Window = tuple[int, int, int, int]


def window_slices(window: Window) -> tuple[slice, slice]:
    """Index of ``window`` into a (rows, cols) array."""
    return slice(window[0], window[1]), slice(window[2], window[3])


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise (float32) with features of about ``scale_px`` pixels."""
    rows, cols = shape
    if scale_px <= 4:
        noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), scale_px / 2.0)
    else:
        step = scale_px / 2.0
        coarse = rng.standard_normal((int(rows / step) + 3, int(cols / step) + 3), dtype=np.float32)
        coarse = ndimage.gaussian_filter(coarse, 1.0, mode="wrap")
        noise = ndimage.zoom(coarse, step, order=1, prefilter=False, grid_mode=False)[:rows, :cols]
        if noise.shape != shape:
            noise = np.pad(noise, ((0, rows - noise.shape[0]), (0, cols - noise.shape[1])), mode="edge")
    noise -= noise.mean()
    noise /= noise.std() + 1e-12
    return noise.astype(np.float32, copy=False)


def block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (the side must be a multiple of ``factor``)."""
    if factor == 1:
        return a
    r, c = a.shape
    return a.reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))
