"""Land cover of the demo scene: the river, farm parcels (meadow or bare field) and forest."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from pipeline.demo.arrays import smooth_noise

if TYPE_CHECKING:
    from pipeline.demo.scene import DemoScene


def land_cover(scene: DemoScene, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Cover fractions per 10 m pixel (float32): ``forest``, ``meadow``, ``field`` and ``water``.

    Farmland lies on broad gentle ground in the lower half of the elevations
    (valley floors, terraces), cut into parcels of about 150 x 80 m on a
    rotated grid; each parcel is meadow, bare field or woodland. The rest of
    the land is forest.
    """
    X, Y = scene.x[np.newaxis, :], scene.y[:, np.newaxis]
    river = np.abs(scene.terrain.river_distance(X, Y))
    water = np.clip(0.5 - (river - 12.0) / 10.0, 0.0, 1.0).astype(np.float32)
    # Farmland on broad gentle ground (valley floors, terraces), not on slivers.
    gentle = (ndimage.gaussian_filter(scene.slope, 4.0) < 10.0) & (scene.elevation < np.quantile(scene.elevation, 0.5))
    gentle &= smooth_noise(rng, (scene.size, scene.size), 25) > -0.3
    farmland = ndimage.binary_opening(gentle, iterations=4) & (water == 0)
    parcel_draw = _parcel_draw(scene, rng)
    field = farmland & (parcel_draw < 0.15)
    meadow = farmland & (parcel_draw >= 0.15) & (parcel_draw < 0.85)
    forest = ~(field | meadow)
    land = 1.0 - water
    return {
        "forest": (forest * land).astype(np.float32),
        "meadow": (meadow * land).astype(np.float32),
        "field": (field * land).astype(np.float32),
        "water": water,
    }


def _parcel_draw(scene: DemoScene, rng: np.random.Generator) -> np.ndarray:
    """A value in [0, 1) per pixel, the same over each ~150 x 80 m parcel of a rotated grid."""
    X, Y = scene.x[np.newaxis, :], scene.y[:, np.newaxis]
    left, top = scene.transform.c, scene.transform.f
    theta = rng.uniform(0, np.pi / 2)
    u = (X - left) * math.cos(theta) + (Y - top) * math.sin(theta)
    v = -(X - left) * math.sin(theta) + (Y - top) * math.cos(theta)
    parcel = (np.floor(u / 150.0) * 7919 + np.floor(v / 80.0) * 104729).astype(np.int64)
    draw: np.ndarray = (np.sin(parcel * 12.9898 + scene.seed * 78.233) * 43758.5453) % 1.0
    return draw
