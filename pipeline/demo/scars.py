"""Landslide scars of the demo scene: downslope tongues of bare soil traced on steep slopes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from pipeline.demo.arrays import Window, smooth_noise, window_slices

if TYPE_CHECKING:
    from pipeline.demo.scene import DemoScene

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scar:
    """One painted landslide: its downslope centre line (UTM) and summary numbers."""

    scar_id: int
    path: np.ndarray  # (n, 2) x, y from head scarp to toe
    half_width_m: float
    length_m: float


@dataclass
class ScarLayers:
    """The painted scars and their fields on the 10 m grid (what :func:`paint_scars` returns)."""

    fraction: np.ndarray  # cover 0..1, float32
    labels: np.ndarray  # scar_id where the cover is at least 0.5, else 0 (int32)
    brightness: np.ndarray  # soil brightness factor per scar (float32, 1 elsewhere)
    moisture: np.ndarray  # soil moisture per scar (float32, 0 elsewhere)
    scars: list[Scar] = field(default_factory=list)

    @classmethod
    def empty(cls, size: int) -> ScarLayers:
        shape = (size, size)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.int32),
                   np.ones(shape, np.float32), np.zeros(shape, np.float32))

    def add(self, scar: Scar, frac: np.ndarray, window: Window, rng: np.random.Generator) -> None:
        """Paint ``scar``'s cover ``frac`` into ``window`` with a brightness and moisture of its own."""
        ws = window_slices(window)
        self.scars.append(scar)
        self.fraction[ws] = np.maximum(self.fraction[ws], frac)
        self.labels[ws][frac >= 0.5] = scar.scar_id
        self.brightness[ws][frac > 0] = rng.uniform(0.88, 1.12)
        self.moisture[ws][frac > 0] = rng.uniform(0.0, 0.12)


def paint_scars(scene: DemoScene, rng: np.random.Generator) -> ScarLayers:
    """6-12 scars on steep slopes clear of clouds, water and each other (fewer on small scenes).

    Heads are drawn at random among pixels steeper than 32 degrees, at least
    400 m apart; a scar is kept when its tongue covers at least 25 pixels, has
    a mean slope of 27 degrees or more and stays 3 pixels from the others.
    """
    size = scene.size
    spacing = min(400.0, 2.0 * size)  # metres between scar heads
    blocked, idx = _heads(scene)
    n_target = max(1, round(int(rng.integers(6, 13)) * min(1.0, (size / 480.0) ** 2)))
    painted = ScarLayers.empty(size)
    if idx.size == 0:
        log.warning("demo scene: no steep slope free of clouds for landslide scars")
        return painted
    order = rng.permutation(idx)[:600]
    roughness = smooth_noise(rng, (size, size), 2.0)
    for flat in order:
        if len(painted.scars) >= n_target:
            break
        r, c = divmod(int(flat), size)
        head = np.array([scene.x[c], scene.y[r]])
        if any(np.hypot(*(head - s.path[0])) < spacing for s in painted.scars):
            continue
        scar = _trace(scene, rng, head, len(painted.scars) + 1)
        if scar is None:
            continue
        frac, window = _rasterize(scene, scar, roughness)
        if _fits(scene, painted, blocked, frac >= 0.5, window):
            painted.add(scar, frac, window, rng)
    if len(painted.scars) < n_target:
        log.warning("demo scene: painted %d landslide scars (wanted %d); the scene has few steep slopes",
                    len(painted.scars), n_target)
    return painted


def _heads(scene: DemoScene) -> tuple[np.ndarray, np.ndarray]:
    """Where no scar may go (near clouds, shadows, water, outside the swath) and the flat indices of head candidates."""
    size = scene.size
    margin = min(25, size // 12)
    blocked = (scene.cloud > 0.01) | (scene.shadow > 0.01) | ~scene.valid10
    blocked |= scene.fractions["water"] > 0
    blocked = ndimage.maximum_filter(blocked, size=min(41, size // 6 * 2 + 1))
    candidates = (scene.slope >= 32.0) & ~blocked
    candidates[:margin] = candidates[-margin:] = False
    candidates[:, :margin] = candidates[:, -margin:] = False
    return blocked, np.flatnonzero(candidates)


def _fits(scene: DemoScene, painted: ScarLayers, blocked: np.ndarray, mask: np.ndarray, window: Window) -> bool:
    """True when a tongue ``mask`` in ``window`` is big, steep, unblocked and 3 pixels clear of other scars."""
    if int(mask.sum()) < 25:
        return False
    ws = window_slices(window)
    if blocked[ws][mask].any() or scene.slope[ws][mask].mean() < 27.0:
        return False
    others = painted.labels[ws] > 0
    return not (others.any() and ndimage.binary_dilation(mask, iterations=3)[others].any())


def _gradient_at(scene: DemoScene, x: float, y: float) -> tuple[float, float]:
    """Terrain gradient (east, north) at a point, bilinear between 10 m pixel centres."""
    col = (x - scene.transform.c) / 10.0 - 0.5
    row = (scene.transform.f - y) / 10.0 - 0.5
    c0 = min(max(int(math.floor(col)), 0), scene.size - 2)
    r0 = min(max(int(math.floor(row)), 0), scene.size - 2)
    fc, fr = min(max(col - c0, 0.0), 1.0), min(max(row - r0, 0.0), 1.0)
    out = []
    for grid in (scene.shading.dzdx, scene.shading.dzdn):
        top = grid[r0, c0] * (1 - fc) + grid[r0, c0 + 1] * fc
        bottom = grid[r0 + 1, c0] * (1 - fc) + grid[r0 + 1, c0 + 1] * fc
        out.append(float(top * (1 - fr) + bottom * fr))
    return out[0], out[1]


def _trace(scene: DemoScene, rng: np.random.Generator, head: np.ndarray, scar_id: int) -> Scar | None:
    """Follow the steepest descent from ``head`` for 200-600 m while the slope stays steep."""
    length = rng.uniform(200.0, 600.0)
    step = 5.0
    points = [head]
    p = head.astype(np.float64)
    left, bottom, right, top = scene.bounds
    inset = min(200.0, 1.5 * scene.size)
    travelled = 0.0
    while travelled < length:
        gx, gy = _gradient_at(scene, float(p[0]), float(p[1]))
        g = math.hypot(gx, gy)
        if math.degrees(math.atan(g)) < 18.0 and travelled > 60.0:
            break
        if g == 0:
            break
        p = p - step * np.array([gx, gy]) / g
        if not (left + inset < p[0] < right - inset and bottom + inset < p[1] < top - inset):
            break
        points.append(p)
        travelled += step
    if travelled < 100.0:
        return None
    return Scar(scar_id, np.array(points), float(rng.uniform(25.0, 55.0)), travelled)


def _rasterize(scene: DemoScene, scar: Scar, roughness: np.ndarray) -> tuple[np.ndarray, Window]:
    """Fractional cover of a tongue around the path (narrow head, widest mid-way, fanned toe)."""
    n = len(scar.path)
    s = np.linspace(0.0, 1.0, n)
    radius = scar.half_width_m * (0.55 + 0.45 * np.sin(np.pi * np.minimum(s * 1.25, 1.0)) + 0.25 * s ** 3)
    pad = radius.max() + 30.0
    xmin, ymin = scar.path.min(axis=0) - pad
    xmax, ymax = scar.path.max(axis=0) + pad
    c0 = max(int((xmin - scene.transform.c) // 10), 0)
    c1 = min(int((xmax - scene.transform.c) // 10) + 1, scene.size)
    r0 = max(int((scene.transform.f - ymax) // 10), 0)
    r1 = min(int((scene.transform.f - ymin) // 10) + 1, scene.size)
    xs = scene.x[c0:c1][np.newaxis, :, np.newaxis]
    ys = scene.y[r0:r1][:, np.newaxis, np.newaxis]
    dist = np.hypot(xs - scar.path[:, 0], ys - scar.path[:, 1]) - radius
    signed = dist.min(axis=2) + 5.0 * roughness[r0:r1, c0:c1]
    frac = np.clip(0.5 - signed / 10.0, 0.0, 1.0).astype(np.float32)
    return frac, (r0, r1, c0, c1)

