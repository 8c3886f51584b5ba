"""Look-alikes in the demo scene: bare ground that is not a landslide (rock, gravel bars, clear-cuts, roads).

None is in the truth and none comes within 3 pixels of a scar. Counts are a
handful per kind on the default 1020 px scene, scaled with the area (at least
one each). No snow: the patches gave no snow spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from pipeline.demo.arrays import Window, smooth_noise, window_slices

if TYPE_CHECKING:
    from pipeline.demo.scene import DemoScene

#: Draws one shape at a centre pixel: its cover in a window (``None`` where it does not fit there).
Draw = Callable[[int, int], tuple[np.ndarray | None, Window]]

_EDGE = 0.5 / 10.0  # fraction per metre across a soft 10 m edge


@dataclass
class _Canvas:
    """What the look-alike painters share: the scene, the random stream, where not to paint, what is painted."""

    scene: DemoScene
    rng: np.random.Generator
    keep_out: np.ndarray  # within 3 pixels of a scar
    roughness: np.ndarray
    painted: dict[str, np.ndarray] = field(default_factory=dict)

    def count(self, lo: int, hi: int) -> int:
        """A count in ``lo..hi`` on the default scene, scaled with the area, at least 1."""
        area = (self.scene.size / 1020.0) ** 2
        return max(1, round(int(self.rng.integers(lo, hi + 1)) * area))

    def window(self, r: int, c: int, radius_px: int) -> Window:
        size = self.scene.size
        return (max(r - radius_px, 0), min(r + radius_px + 1, size),
                max(c - radius_px, 0), min(c + radius_px + 1, size))

    def total(self) -> np.ndarray:
        """Sum of the look-alikes painted so far."""
        shape = (self.scene.size, self.scene.size)
        return sum(self.painted.values(), np.zeros(shape, np.float32))

    def place(self, name: str, n: int, centres: np.ndarray, draw: Draw) -> None:
        """Draw shapes at random ``centres`` until ``n`` fit clear of scars and each other."""
        size = self.scene.size
        frac = np.zeros((size, size), np.float32)
        taken = self.total() > 0
        placed = 0
        for flat in self.rng.permutation(np.flatnonzero(centres))[:400]:
            if placed >= n:
                break
            r, c = divmod(int(flat), size)
            shape_frac, window = draw(r, c)
            if shape_frac is None:
                continue
            ws = window_slices(window)
            inside = shape_frac > 0
            if (self.keep_out[ws] & inside).any() or (taken[ws] & inside).any() or (frac[ws] > 0)[inside].any():
                continue
            if int((shape_frac >= 0.5).sum()) < 6:
                continue
            frac[ws] = np.maximum(frac[ws], shape_frac)
            placed += 1
        self.painted[name] = frac


def paint_lookalikes(scene: DemoScene, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Cover fractions (float32) of ``rock``, ``gravel``, ``clearcut`` and ``road``, each 0 near scars.

    Shapes go only where the sky is clear and the swath valid; each kind keeps
    clear of the kinds painted before it.
    """
    keep_out = ndimage.binary_dilation(scene.scar_fraction > 0, iterations=3)
    clear = scene.valid10 & (scene.cloud < 0.01) & (scene.shadow < 0.01)
    canvas = _Canvas(scene, rng, keep_out, smooth_noise(rng, (scene.size, scene.size), 2.0))
    canvas.place("rock", canvas.count(6, 10), (scene.slope >= 35.0) & clear, lambda r, c: _outcrop(canvas, r, c))
    river = scene.terrain.river_distance(scene.x[np.newaxis, :], scene.y[:, np.newaxis])
    canvas.place("gravel", canvas.count(4, 6), (np.abs(river) < 5.0) & clear,
                 lambda r, c: _gravel_bar(canvas, river, r, c))
    forest = (scene.fractions["forest"] >= 1.0) & (scene.slope < 35.0)
    canvas.place("clearcut", canvas.count(4, 8), forest & clear, lambda r, c: _clearcut(canvas, forest, r, c))
    roads = np.minimum(_roads(canvas, river), 1.0 - canvas.total())
    roads[keep_out | (scene.fractions["water"] > 0)] = 0.0
    canvas.painted["road"] = roads.astype(np.float32)
    return canvas.painted


def _rotated_offsets(
    scene: DemoScene, win: Window, centre: tuple[int, int], angle: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (m) of the pixels of ``win`` from pixel ``centre`` along and across the direction ``angle``."""
    rs, cs = window_slices(win)
    dx = scene.x[cs][np.newaxis, :] - scene.x[centre[1]]
    dy = scene.y[rs][:, np.newaxis] - scene.y[centre[0]]
    return dx * math.cos(angle) + dy * math.sin(angle), -dx * math.sin(angle) + dy * math.cos(angle)


def _outcrop(canvas: _Canvas, r: int, c: int) -> tuple[np.ndarray | None, Window]:
    """Rock outcrop: an irregular blob 60-300 m across, only where the slope is 28 degrees or more."""
    scene, rng = canvas.scene, canvas.rng
    a, b = rng.uniform(30.0, 150.0), rng.uniform(25.0, 80.0)
    angle = rng.uniform(0, np.pi)
    win = canvas.window(r, c, int(a / 10) + 3)
    rs, cs = window_slices(win)
    u, v = _rotated_offsets(scene, win, (r, c), angle)
    signed = (np.hypot(u / a, v / b) - 1.0) * b + 8.0 * canvas.roughness[rs, cs]
    frac = np.clip(0.5 - signed * _EDGE, 0.0, 1.0) * (scene.slope[rs, cs] >= 28.0)
    parts, _ = ndimage.label(frac > 0, structure=np.ones((3, 3), bool))
    centre = parts[r - win[0], c - win[2]]
    if centre == 0:
        return None, win
    return np.where(parts == centre, frac, 0.0).astype(np.float32), win  # one piece


def _gravel_bar(canvas: _Canvas, river: np.ndarray, r: int, c: int) -> tuple[np.ndarray | None, Window]:
    """Gravel bar: a lens 150-400 m long, 20-60 m wide, on one bank of the river, half in the channel."""
    scene, rng = canvas.scene, canvas.rng
    length, width = rng.uniform(150.0, 400.0), rng.uniform(20.0, 60.0)
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    win = canvas.window(r, c, int(length / 20) + 8)
    rs, cs = window_slices(win)
    d = side * river[rs, cs]
    along = np.hypot(scene.x[cs][np.newaxis, :] - scene.x[c],
                     scene.y[rs][:, np.newaxis] - scene.y[r]) / (length / 2)
    w = width * np.sqrt(np.clip(1.0 - along ** 2, 0.0, 1.0))
    frac = np.clip(np.minimum(d - 2.0, 2.0 + w - d) * _EDGE + 0.5, 0.0, 1.0) * (along < 1.0)
    return frac.astype(np.float32), win


def _clearcut(canvas: _Canvas, forest: np.ndarray, r: int, c: int) -> tuple[np.ndarray | None, Window]:
    """Clear-cut: a rotated rectangle 60-250 x 50-150 m, wholly in ``forest``."""
    scene, rng = canvas.scene, canvas.rng
    half_a, half_b = rng.uniform(30.0, 125.0), rng.uniform(25.0, 75.0)
    angle = rng.uniform(0, np.pi / 2)
    win = canvas.window(r, c, int(math.hypot(half_a, half_b) / 10) + 2)
    rs, cs = window_slices(win)
    u, v = (np.abs(offset) for offset in _rotated_offsets(scene, win, (r, c), angle))
    frac = np.clip(0.5 - np.maximum(u - half_a, v - half_b) * _EDGE, 0.0, 1.0)
    if not forest[rs, cs][frac > 0].all():
        return None, win
    return frac.astype(np.float32), win


def _roads(canvas: _Canvas, river: np.ndarray) -> np.ndarray:
    """1-2 roads, 12-20 m wide with their cleared verges: one along the valley floor beside the river,
    one winding across the scene."""
    scene, rng = canvas.scene, canvas.rng
    X, Y = scene.x[np.newaxis, :], scene.y[:, np.newaxis]
    roads = np.zeros((scene.size, scene.size), np.float32)
    for i in range(int(rng.integers(1, 3))):
        width = rng.uniform(12.0, 20.0)
        if i == 0:
            offset = (1.0 if rng.uniform() < 0.5 else -1.0) * rng.uniform(60.0, 120.0)
            across = river - offset
        else:
            angle = rng.uniform(0, np.pi)
            ca, sa = math.cos(angle), math.sin(angle)
            dx, dy = X - scene.terrain.cx, Y - scene.terrain.cy
            wave, phase = 2 * np.pi / rng.uniform(800.0, 2000.0), rng.uniform(0, 2 * np.pi)
            along = dx * ca + dy * sa
            across = -dx * sa + dy * ca - rng.uniform(-0.3, 0.3) * 10.0 * scene.size \
                - rng.uniform(40.0, 120.0) * np.sin(wave * along + phase)
        line = np.clip(0.5 - (np.abs(across) - width / 2) * _EDGE, 0.0, 1.0)
        roads = np.maximum(roads, line.astype(np.float32))
    return roads
