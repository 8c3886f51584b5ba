"""Synthetic terrain of the demo: elevation as a function of UTM coordinates, slope and sun shading."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.demo.sentinel2 import SUN_AZIMUTH, SUN_ZENITH


@dataclass(frozen=True)
class DemoTerrain:
    """Elevation (m) as a function of UTM coordinates: hills, massifs and incised valleys.

    The same function gives the 10 m scene terrain and the DEM sampled at its
    own lon/lat pixel centres, so the two agree wherever they are compared.
    Valley 0 holds the river.
    """

    cx: float
    cy: float
    kx: np.ndarray  # random-phase hills: wave vectors (rad/m), phases, amplitudes (m)
    ky: np.ndarray
    phase: np.ndarray
    amp: np.ndarray
    massifs: np.ndarray  # (M, 5): x, y (relative to cx, cy), sigma_x, sigma_y, amplitude
    valleys: np.ndarray  # (V, 7): angle, offset, meander amplitude, length, phase, width, depth
    base: float = 680.0
    mid: float = 700.0
    half: float = 520.0

    @classmethod
    def random(cls, rng: np.random.Generator, centre: tuple[float, float]) -> DemoTerrain:
        """Draw a terrain around ``centre`` (UTM metres)."""
        n = 40
        wavelength = np.exp(rng.uniform(np.log(300.0), np.log(6000.0), n))
        direction = rng.uniform(0, np.pi, n)
        k = 2 * np.pi / wavelength
        # Amplitude ~ wavelength^0.9: relief grows with scale (hills on hills).
        amp = 0.04 * wavelength ** 0.9 * rng.uniform(0.6, 1.4, n)
        m = 6
        massifs = np.column_stack([
            rng.uniform(-6000, 6000, m), rng.uniform(-6000, 6000, m),
            rng.uniform(1500, 4000, m), rng.uniform(1500, 4000, m),
            rng.uniform(-150, 350, m),
        ])
        v = 7
        valleys = np.column_stack([
            rng.uniform(0, np.pi, v), rng.uniform(-4500, 4500, v),
            rng.uniform(100, 400, v), rng.uniform(1500, 4000, v), rng.uniform(0, 2 * np.pi, v),
            rng.uniform(160, 320, v), rng.uniform(110, 220, v),
        ])
        valleys[0, 1] = rng.uniform(-1500, 1500)  # the river crosses the centre part
        valleys[0, 5:] = (420.0, 260.0)
        return cls(
            cx=centre[0], cy=centre[1], kx=k * np.cos(direction), ky=k * np.sin(direction),
            phase=rng.uniform(0, 2 * np.pi, n), amp=amp, massifs=massifs, valleys=valleys,
        )

    def valley_distance(self, x: np.ndarray, y: np.ndarray, index: int = 0) -> np.ndarray:
        """Signed distance (m, approximately) across the centre line of valley ``index`` (0: river)."""
        dx = np.asarray(x, dtype=np.float64) - self.cx
        dy = np.asarray(y, dtype=np.float64) - self.cy
        angle, offset, m_amp, m_len, m_phase = self.valleys[index, :5]
        c, s = math.cos(angle), math.sin(angle)
        wave = 2 * np.pi / m_len
        across = -dx * s + dy * c - offset
        sin_w, cos_w = _sin_cos_linear(wave * c, wave * s, m_phase, dx, dy)
        tilt = m_amp * wave * cos_w
        return (across - m_amp * sin_w) / np.sqrt(1.0 + tilt ** 2)

    def river_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (m) across the river's meandering centre line."""
        return self.valley_distance(x, y, 0)

    def _hills(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        if _is_grid(dx, dy):
            # Grid: sin(a + b) = sin a cos b + cos a sin b, summed over waves by matrix products.
            a = self.kx[:, np.newaxis] * dx[0][np.newaxis, :]  # (K, W)
            b = self.ky[:, np.newaxis] * dy[:, 0][np.newaxis, :] + self.phase[:, np.newaxis]  # (K, H)
            amp = self.amp[:, np.newaxis]
            out: np.ndarray = (np.cos(b) * amp).T @ np.sin(a) + (np.sin(b) * amp).T @ np.cos(a)
            return out
        shape = np.broadcast_shapes(dx.shape, dy.shape)
        px = np.broadcast_to(dx, shape).ravel()
        py = np.broadcast_to(dy, shape).ravel()
        flat = np.empty(px.size)
        for i in range(0, px.size, 32768):
            sl = slice(i, i + 32768)
            arg = np.outer(self.kx, px[sl]) + np.outer(self.ky, py[sl]) + self.phase[:, np.newaxis]
            flat[sl] = self.amp @ np.sin(arg)
        return flat.reshape(shape)

    def elevation(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Elevation in metres at UTM ``x``, ``y`` (arrays broadcast together), float64."""
        dx = np.asarray(x, dtype=np.float64) - self.cx
        dy = np.asarray(y, dtype=np.float64) - self.cy
        h = self.base + self._hills(dx, dy)
        for mx, my, sx, sy, a in self.massifs:
            # exp(u + v) = exp(u) exp(v): cheap on grids, exact everywhere.
            h = h + a * (np.exp(-0.5 * ((dx - mx) / sx) ** 2) * np.exp(-0.5 * ((dy - my) / sy) ** 2))
        for i in range(len(self.valleys)):
            width, depth = self.valleys[i, 5:]
            d = self.valley_distance(x, y, i)
            h = h - depth * np.exp(-((d / width) ** 2))
        # Soft clamp into [mid - half, mid + half] (about 200-1200 m).
        return self.mid + self.half * np.tanh((h - self.mid) / self.half)


def _is_grid(dx: np.ndarray, dy: np.ndarray) -> bool:
    return dx.ndim == 2 and dy.ndim == 2 and dx.shape[0] == 1 and dy.shape[1] == 1


def _sin_cos_linear(ax: float, ay: float, const: float, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of ``ax * dx + ay * dy + const``, separably on (1, W) x (H, 1) grids."""
    if _is_grid(dx, dy):
        a = ax * dx
        b = ay * dy + const
        sa, ca, sb, cb = np.sin(a), np.cos(a), np.sin(b), np.cos(b)
        return sa * cb + ca * sb, ca * cb - sa * sb
    arg = ax * dx + ay * dy + const
    return np.sin(arg), np.cos(arg)


def slope_degrees(elevation: np.ndarray, res: float) -> np.ndarray:
    """Slope in degrees by Horn's method, float64, edges by replication.

    Unlike :func:`pipeline.stack.terrain.horn_slope` (NaN at the edges), every
    pixel of the scene gets a slope, so scars may be placed up to the border.
    """
    z = np.pad(np.asarray(elevation, dtype=np.float64), 1, mode="edge")
    a, b, c = z[:-2, :-2], z[:-2, 1:-1], z[:-2, 2:]
    d, f = z[1:-1, :-2], z[1:-1, 2:]
    g, h, i = z[2:, :-2], z[2:, 1:-1], z[2:, 2:]
    dzdx = ((c + 2 * f + i) - (a + 2 * d + g)) / (8 * res)
    dzdy = ((g + 2 * h + i) - (a + 2 * b + c)) / (8 * res)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy)))


class Shading(NamedTuple):
    """Terrain under the default sun: gradients, incidence and the illumination factor (float32)."""

    dzdx: np.ndarray  # dz/dx towards east
    dzdn: np.ndarray  # dz/dy towards north
    cos_incidence: np.ndarray
    illumination: np.ndarray


def shading(elevation: np.ndarray, res: float) -> Shading:
    """Shading of ``elevation`` (rows run south) with full topographic effect, as L2A has by default."""
    d_row, d_col = np.gradient(elevation.astype(np.float64), res)
    dzdx, dzdn = d_col, -d_row  # rows run south
    slope_rad = np.arctan(np.hypot(dzdx, dzdn))
    aspect = np.arctan2(-dzdx, -dzdn)  # downslope azimuth, clockwise from north
    z, az = math.radians(SUN_ZENITH), math.radians(SUN_AZIMUTH)
    cos_i = math.cos(z) * np.cos(slope_rad) + math.sin(z) * np.sin(slope_rad) * np.cos(az - aspect)
    illumination = 0.45 + 0.55 * np.clip(cos_i / math.cos(z), 0.0, 1.6)
    return Shading(
        dzdx.astype(np.float32), dzdn.astype(np.float32),
        cos_i.astype(np.float32), illumination.astype(np.float32),
    )
