"""The demo scene in memory: every field on its 10 m grid, and its reflectance per band."""

from __future__ import annotations

import numpy as np
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS

from pipeline.core.channels import S2_BANDS
from pipeline.core.errors import ConfigError
from pipeline.demo.arrays import block_mean, smooth_noise
from pipeline.demo.clouds import clouds_and_shadows
from pipeline.demo.landcover import land_cover
from pipeline.demo.lookalikes import paint_lookalikes
from pipeline.demo.scars import paint_scars
from pipeline.demo.sentinel2 import BAND_IDS, DEFAULT_CRS, DEFAULT_ORIGIN, Product
from pipeline.demo.spectra import ATMOSPHERE, SPECTRA, SPECTRA_CLASSES
from pipeline.demo.terrain import DemoTerrain, shading, slope_degrees

#: How much vegetation vigour (NIR plateau) drives each band (exponent).
_VIGOUR_WEIGHT: dict[str, float] = {
    "B01": -0.4, "B02": -0.4, "B03": -0.3, "B04": -0.5, "B05": 0.3, "B06": 0.9, "B07": 1.0,
    "B08": 1.0, "B8A": 1.0, "B09": 1.0, "B10": 0.0, "B11": -0.3, "B12": -0.3,
}
_NOISE_SIGMA = 0.004  # sensor noise, reflectance units, per native pixel
#: SCL class -> tie-break bonus when aggregating to 20/60 m (clouds win ties).
_SCL_PRIORITY = np.array([0, 0, 1, 5, 2, 3, 4, 0, 6, 7, 0, 0]) * 1e-3


class DemoScene:
    """All fields of the synthetic scene on its 10 m grid (built by :func:`make_scene`).

    The fields are drawn in a fixed order from one random stream per seed
    (look-alikes from a stream of their own), so a seed gives the same scene.
    """

    def __init__(self, size: int, seed: int, origin: tuple[float, float] = DEFAULT_ORIGIN,
                 crs: str = DEFAULT_CRS) -> None:
        if size % 6 != 0 or size < 120:
            raise ConfigError(
                f"demo size {size}: expected a multiple of 6, at least 120, so that the 10, 20 and 60 m "
                "bands cover the same extent as in real tiles (10980 = 6 x 1830); try 1020 or 510"
            )
        if origin[0] % 60 or origin[1] % 60:
            raise ConfigError(f"demo origin {origin}: expected multiples of 60 m (Sentinel-2 tile grid)")
        self.size = size
        self.seed = seed
        self.crs = CRS.from_user_input(crs)
        self.transform = Affine(10.0, 0.0, origin[0], 0.0, -10.0, origin[1])
        rng = np.random.default_rng([seed, 0])
        shape = (size, size)
        self.x = origin[0] + 10.0 * (np.arange(size) + 0.5)  # column centres
        self.y = origin[1] - 10.0 * (np.arange(size) + 0.5)  # row centres
        self.terrain = DemoTerrain.random(rng, (origin[0] + 5.0 * size, origin[1] - 5.0 * size))
        self.elevation = self.terrain.elevation(self.x[np.newaxis, :], self.y[:, np.newaxis]).astype(np.float32)
        self.slope = slope_degrees(self.elevation, 10.0).astype(np.float32)
        self.valid10 = self.swath_valid(10)
        # No terrain correction in L2A by default: full topographic shading.
        self.shading = shading(self.elevation, 10.0)
        self.fractions = land_cover(self, rng)
        self.canopy = (1.0 + 0.07 * smooth_noise(rng, shape, 1.5)).astype(np.float32)
        self.vigour = (1.0 + 0.08 * smooth_noise(rng, shape, 40)).astype(np.float32)
        self.soil_texture = (1.0 + 0.05 * smooth_noise(rng, shape, 2)).astype(np.float32)
        self.cloud, self.shadow = clouds_and_shadows(rng, size)
        scars = paint_scars(self, rng)
        self.scars = scars.scars
        self.scar_fraction, self.scar_labels = scars.fraction, scars.labels
        self.scar_brightness, self.scar_moisture = scars.brightness, scars.moisture
        self.revegetation = np.clip(0.06 + 0.06 * smooth_noise(rng, shape, 3), 0.0, 0.18).astype(np.float32)
        self.aot = (0.12 + 0.015 * smooth_noise(rng, shape, 60)).astype(np.float32)
        self.wvp = (2.2 - 0.0008 * (self.elevation - 700.0) + 0.1 * smooth_noise(rng, shape, 60)).astype(np.float32)
        # Look-alikes (not landslides, not in the truth): own random stream, so the rest is unchanged.
        self.lookalikes = paint_lookalikes(self, np.random.default_rng([seed, 3]))
        self._make_room_for_lookalikes()

    def _make_room_for_lookalikes(self) -> None:
        """Reduce the land cover fractions by the look-alikes' cover."""
        total = self.lookalike_fraction()
        for name in ("forest", "meadow", "field", "water"):
            self.fractions[name] = (self.fractions[name] * (1.0 - total)).astype(np.float32)
        assert not (total > 0)[self.scar_fraction > 0].any()

    # -- geometry -----------------------------------------------------------
    def grid(self, res: int) -> tuple[Affine, int]:
        """Transform and side length of the ``res`` m grid (same extent at 10, 20, 60 m)."""
        return Affine(float(res), 0.0, self.transform.c, 0.0, -float(res), self.transform.f), self.size * 10 // res

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return (left, top - 10.0 * self.size, left + 10.0 * self.size, top)

    def _swath_edge(self, y: np.ndarray) -> np.ndarray:
        """Easting of the swath's eastern edge at northing ``y`` (outside: east of it)."""
        left, bottom, right, top = self.bounds
        width = right - left
        frac = (top - y) / (top - bottom)
        return left + width * (0.80 + 0.17 * frac)

    def swath_valid(self, res: int) -> np.ndarray:
        """True inside the imaged swath, at the centres of the ``res`` m pixels."""
        transform, n = self.grid(res)
        xc = transform.c + res * (np.arange(n) + 0.5)
        yc = transform.f - res * (np.arange(n) + 0.5)
        return xc[np.newaxis, :] < self._swath_edge(yc)[:, np.newaxis]

    def footprint_lonlat(self) -> list[tuple[float, float]]:
        """(lon, lat) corners of the imaged swath."""
        left, bottom, right, top = self.bounds
        xs = [left, float(self._swath_edge(np.array(top))), float(self._swath_edge(np.array(bottom))), left]
        ys = [top, top, bottom, bottom]
        lon, lat = Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
        return list(zip(lon, lat, strict=True))

    # -- radiometry ---------------------------------------------------------
    def classes_scl(self) -> np.ndarray:
        """Scene classification at 10 m (before aggregation to 20/60 m)."""
        f = self.fractions
        scl = np.full((self.size, self.size), 4, np.uint8)
        scl[(f["field"] > 0.5) | (self.scar_fraction >= 0.5) | (self.lookalike_fraction() > 0.5)] = 5
        scl[f["water"] >= 0.5] = 6
        scl[self.shading.cos_incidence < 0.12] = 2
        scl[self.shadow > 0.3] = 3
        scl[self.cloud > 0.2] = 8
        scl[self.cloud > 0.6] = 9
        return scl

    def scl(self, res: int) -> np.ndarray:
        """SCL at ``res`` m: majority of the 10 m classes (clouds win ties), 0 outside the swath."""
        classes = self.classes_scl()
        factor = res // 10
        best = None
        best_score = None
        for code in range(12):
            if not (classes == code).any():
                continue
            score = block_mean((classes == code).astype(np.float32), factor) + _SCL_PRIORITY[code]
            if best is None:
                best, best_score = np.full(score.shape, code, np.uint8), score
            else:
                better = score > best_score
                best[better] = code
                best_score = np.where(better, score, best_score)
        assert best is not None
        best[~self.swath_valid(res)] = 0
        return best

    def reflectance(self, band: str, product: Product = "L2A", res: int | None = None) -> np.ndarray:
        """Reflectance of ``band`` at its native (or given) resolution, as written (noise included).

        L2A: surface reflectance; L1C: top of atmosphere. NaN outside the swath.
        """
        col = {name: i for i, name in enumerate(SPECTRA_CLASSES)}
        spec = SPECTRA[band]
        f = self.fractions
        la = self.lookalikes  # zero wherever a scar is
        vig = self.vigour ** _VIGOUR_WEIGHT[band]
        swir = band in ("B11", "B12")
        scar = self.scar_fraction
        reveg = self.revegetation * scar
        soil = scar - reveg
        ground = (
            (f["forest"] * (1 - scar) + reveg) * spec[col["forest"]] * self.canopy * vig
            + f["meadow"] * (1 - scar) * spec[col["meadow"]] * vig
            + f["field"] * (1 - scar) * spec[col["bare"]] * self.soil_texture
            + (la["gravel"] + la["road"] + la["clearcut"]) * spec[col["bare"]] * self.soil_texture
            + la["rock"] * spec[col["rock"]] * self.soil_texture
            + soil * spec[col["scar"]] * self.scar_brightness * self.soil_texture
            * (1 - self.scar_moisture * (2.0 if swir else 0.5))
        ) * self.shading.illumination + f["water"] * (1 - scar) * spec[col["water"]]
        ground = ground * (1.0 - 0.7 * self.shadow)
        if product == "L1C":
            path, trans = ATMOSPHERE[band]
            ground = path + trans * ground
        value = (1.0 - self.cloud) * ground + self.cloud * spec[col["cloud"]]
        native = S2_BANDS[band] if res is None else res
        out = block_mean(value.astype(np.float32), native // 10)
        noise_rng = np.random.default_rng([self.seed, 1, BAND_IDS[band], native])
        out = out + noise_rng.normal(0.0, _NOISE_SIGMA, out.shape).astype(np.float32)
        out[~self.swath_valid(native)] = np.nan
        return out

    def lookalike_fraction(self) -> np.ndarray:
        """Cover of all look-alikes (rock, gravel, road, clear-cut) per 10 m pixel, 0..1."""
        total = sum(self.lookalikes.values(), np.zeros((self.size, self.size), np.float32))
        return np.clip(total, 0.0, 1.0).astype(np.float32)

    def truth_mask(self) -> np.ndarray:
        """1 where a scar covers at least half of the 10 m pixel."""
        return (self.scar_labels > 0).astype(np.uint8)


def make_scene(size: int = 1020, seed: int = 0) -> DemoScene:
    """Build the synthetic scene in memory (deterministic for ``seed``)."""
    return DemoScene(size, seed)
