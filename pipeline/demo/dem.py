"""The demo DEM: the scene's terrain sampled in EPSG:4326 at 1 arc-second, with a few voids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer

from pipeline.demo.scene import DemoScene

_ARCSEC = 1.0 / 3600.0
_NODATA = -32768


def write_dem(scene: DemoScene, path: Path, rng: np.random.Generator) -> None:
    """DEM covering the scene plus a margin: EPSG:4326, 1 arc-second, int16, nodata -32768, a few voids."""
    transform, rows, cols = _dem_grid(scene)
    lon = transform.c + _ARCSEC * (np.arange(cols) + 0.5)
    lat = transform.f - _ARCSEC * (np.arange(rows) + 0.5)
    lon2, lat2 = np.meshgrid(lon, lat)
    to_utm = Transformer.from_crs("EPSG:4326", scene.crs, always_xy=True)
    x, y = to_utm.transform(lon2, lat2)
    dem = np.rint(scene.terrain.elevation(x, y)).astype(np.int16)
    left, bottom, right, top = scene.bounds
    _punch_voids(dem, (x > left) & (x < right) & (y > bottom) & (y < top), rng)
    with rasterio.open(
        path, "w", driver="GTiff", width=cols, height=rows, count=1, dtype="int16",
        crs="EPSG:4326", transform=transform, nodata=_NODATA, compress="deflate",
        tiled=True, blockxsize=256, blockysize=256,
    ) as dst:
        dst.write(dem, 1)
        # The SOURCE text is part of the demo's fixed output (same bytes for the same seed).
        dst.update_tags(AREA_OR_POINT="Area", SOURCE="synthetic demo terrain (pipeline.demo.synthetic)")
        dst.set_band_description(1, "elevation (m)")


def _dem_grid(scene: DemoScene) -> tuple[Affine, int, int]:
    """Transform, rows and columns of the arc-second grid around the scene with a 0.01 degree margin."""
    to_ll = Transformer.from_crs(scene.crs, "EPSG:4326", always_xy=True)
    west, south, east, north = to_ll.transform_bounds(*scene.bounds, densify_pts=21)
    margin = 0.01
    west = math.floor((west - margin) / _ARCSEC) * _ARCSEC
    south = math.floor((south - margin) / _ARCSEC) * _ARCSEC
    east = math.ceil((east + margin) / _ARCSEC) * _ARCSEC
    north = math.ceil((north + margin) / _ARCSEC) * _ARCSEC
    cols = round((east - west) / _ARCSEC)
    rows = round((north - south) / _ARCSEC)
    return Affine(_ARCSEC, 0.0, west, 0.0, -_ARCSEC, north), rows, cols


def _punch_voids(dem: np.ndarray, inside: np.ndarray, rng: np.random.Generator) -> None:
    """Five small void clusters inside the scene, as radar DEMs have on steep slopes."""
    rows, cols = dem.shape
    rr, cc = np.nonzero(inside)
    for k in rng.choice(rr.size, size=5, replace=False):
        radius = rng.uniform(0.8, 2.5)
        r0, c0 = rr[k], cc[k]
        yy, xx = np.ogrid[:rows, :cols]
        dem[(yy - r0) ** 2 + (xx - c0) ** 2 <= radius ** 2] = _NODATA
