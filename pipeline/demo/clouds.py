"""Clouds of the demo scene and the shadows they cast under the default sun."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from pipeline.demo.arrays import smooth_noise
from pipeline.demo.sentinel2 import SUN_AZIMUTH, SUN_ZENITH

#: Cloud height above the ground (m); sets how far the shadows fall from their clouds.
CLOUD_HEIGHT = 1500.0


def clouds_and_shadows(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cloud cover and shadow, 0..1 per 10 m pixel (float32), on a ``size`` x ``size`` scene.

    A few lumpy blobs with thin edges, a few percent of the scene; each
    shadow is its cloud shifted away from the sun, and none lies under a cloud.
    """
    shape = (size, size)
    blobs = np.zeros(shape, np.float32)
    idx = np.arange(size, dtype=np.float32)
    for _ in range(int(rng.integers(2, 4))):
        r0, c0 = rng.uniform(0.1, 0.9, 2) * size
        sr = rng.uniform(0.035, 0.06) * size
        sc = sr * rng.uniform(0.6, 1.6)
        blobs += np.exp(-0.5 * ((idx - r0) / sr) ** 2)[:, np.newaxis] * np.exp(-0.5 * ((idx - c0) / sc) ** 2)
    lumpy = blobs * (1.0 + 0.45 * smooth_noise(rng, shape, 10))
    cloud = np.clip((lumpy - 0.5) / 0.35, 0.0, 1.0).astype(np.float32)
    z, az = math.radians(SUN_ZENITH), math.radians(SUN_AZIMUTH)
    disp = CLOUD_HEIGHT * math.tan(z)  # shadow away from the sun
    d_east = disp * math.sin(az + math.pi)
    d_north = disp * math.cos(az + math.pi)
    shadow = ndimage.shift(cloud, (-d_north / 10.0, d_east / 10.0), order=0, cval=0.0)
    shadow = np.where(cloud > 0.05, 0.0, shadow).astype(np.float32)
    return cloud, shadow
