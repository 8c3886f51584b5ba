"""Bilinear upsampling across CRSs (pipeline.io.reproject): GDAL's values, the same in every window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from pipeline.core.grid import Grid
from pipeline.io import reproject, warp
from pipeline.io.raster_source import open_raster
from pipeline.io.warp import warp_array

UTM33 = CRS.from_epsg(32633)
LONLAT = CRS.from_epsg(4326)
# a 1 arc-second DEM (about 31 m x 22 m here, at 46.5 N) west of the grid's central meridian
DEM_TRANSFORM = Affine(1 / 3600, 0, 14.50, 0, -1 / 3600, 46.52)
DEM_SHAPE = (120, 150)


def terrain(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    hills = 800 + 300 * np.sin(rows / 9.0) * np.cos(cols / 13.0) + 4 * cols
    return (hills + rng.normal(0, 20, shape)).astype(np.float32)


def write_dem(path: Path, values: np.ndarray, transform: Affine = DEM_TRANSFORM, crs: CRS = LONLAT) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype="float32", crs=crs, transform=transform, nodata=-9999) as ds:
        ds.write(np.nan_to_num(values, nan=-9999), 1)
    return path


def utm_grid_over(dem_bounds: tuple[float, float, float, float], *, margin_m: float, res: float = 10.0,
                  crs: CRS = UTM33) -> Grid:
    """A 10 m UTM grid over the DEM's footprint, ``margin_m`` beyond it (negative: inside)."""
    left, bottom, right, top = rasterio.warp.transform_bounds(LONLAT, crs, *dem_bounds)
    x0 = np.floor((left - margin_m) / res) * res
    y0 = np.ceil((top + margin_m) / res) * res
    width = int((right + margin_m - x0) // res)
    height = int((y0 - bottom + margin_m) // res)
    return Grid(crs, Affine(res, 0, x0, 0, -res, y0), width, height)


def atol_for(values: np.ndarray) -> float:
    """What positions within 2 x 1e-4 source pixels (GDAL's transformer's tolerance and ours) can
    change a bilinear value by: the steepest step between neighbouring source pixels times that."""
    steps = [np.nanmax(np.abs(np.diff(values, axis=a))) for a in (0, 1)]
    return 2 * reproject.TOLERANCE * float(max(steps)) + 1e-4


def gdal_reference(path: Path, grid: Grid) -> np.ndarray:
    """GDAL's warper on the whole source (the path used before, and for what this one does not do)."""
    raster = open_raster(path, "DEM")
    with rasterio.open(path) as ds:
        src = raster.to_physical(ds.read(1))
    return warp_array(src, raster.transform, raster.crs, grid, Resampling.bilinear, raster.warp_scale(grid.crs, grid.res))


def no_gdal_warp(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("GDAL's warper was used")

    monkeypatch.setattr(warp, "warp_array", fail)


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("margin_m", [-400.0, 300.0])
def test_upsampling_matches_gdal_bilinear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holes: bool,
                                          margin_m: float) -> None:
    """Same no-data pixels as GDAL's warper and the same values: inside the DEM (margin < 0), and on
    a grid reaching past it (its edges: taps outside dropped, centres outside no data), with and
    without voids (taps on voids dropped, centres on voids no data)."""
    dem = terrain(DEM_SHAPE)
    if holes:
        dem[40:47, 60:66] = np.nan
        dem[90, 20] = np.nan
    path = write_dem(tmp_path / "dem.tif", dem)
    raster = open_raster(path, "DEM")
    grid = utm_grid_over(raster.bounds, margin_m=margin_m)
    ref = gdal_reference(path, grid)
    no_gdal_warp(monkeypatch)
    got = raster.read_onto(grid, Resampling.bilinear, raster.warp_scale(grid.crs, grid.res))
    assert got.dtype == np.float32 and got.shape == grid.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    # GDAL's own transformer is approximate to 1e-4 source pixels, so is ours
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol_for(dem), equal_nan=True)
    assert atol_for(dem) < 0.05
    if margin_m > 0:
        assert np.isnan(got[0]).all() and np.isfinite(got).mean() > 0.7
    else:
        assert np.isfinite(got).mean() == (1.0 if not holes else pytest.approx(1.0, abs=0.03))


@pytest.mark.parametrize("shift", [0.0, 3.3])
def test_every_window_of_a_grid_gets_the_same_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     shift: float) -> None:
    """Windows (blocks, blocks grown by a halo) get bit-for-bit the values of the whole grid, also
    on a grid whose pixels are not on whole multiples of their size."""
    dem = terrain(DEM_SHAPE, seed=3)
    dem[50:55, 70:80] = np.nan
    path = write_dem(tmp_path / "dem.tif", dem)
    raster = open_raster(path, "DEM")
    grid = utm_grid_over(raster.bounds, margin_m=200.0)
    grid = Grid(grid.crs, grid.transform * Affine.translation(shift / 10, -shift / 10), grid.width, grid.height)
    scale = raster.warp_scale(grid.crs, grid.res)
    no_gdal_warp(monkeypatch)
    whole = raster.read_onto(grid, Resampling.bilinear, scale)
    rng = np.random.default_rng(0)
    for _ in range(12):
        r0, c0 = int(rng.integers(0, grid.height - 5)), int(rng.integers(0, grid.width - 5))
        h, w = int(rng.integers(1, grid.height - r0 + 1)), int(rng.integers(1, grid.width - c0 + 1))
        part = raster.read_onto(grid.window(Window(c0, r0, w, h)), Resampling.bilinear, scale)
        np.testing.assert_array_equal(part, whole[r0 : r0 + h, c0 : c0 + w])


@pytest.mark.parametrize("epsg, origin", [(32633, (400000.0, 5150000.0)), (32633, (560000.0, 7900000.0)),
                                          (3031, (-250000.0, 1500000.0))])
def test_interpolated_positions_are_exact_within_the_tolerance(epsg: int, origin: tuple[float, float]) -> None:
    """Positions from the lattice against PROJ for every 5th pixel: mid-latitude and arctic UTM, and
    polar stereographic (Antarctica) to geographic coordinates."""
    grid = Grid(CRS.from_epsg(epsg), Affine(10, 0, origin[0], 0, -10, origin[1]), 2080, 2080)
    src = Affine(1 / 3600, 0, -180, 0, -1 / 3600, 90)  # a global 1 arc-second raster
    positions = reproject.source_positions(grid, LONLAT, src)
    assert positions is not None
    rows, cols = np.mgrid[0 : grid.height : 5, 0 : grid.width : 5]
    xs = grid.transform.c + (cols + 0.5) * grid.transform.a
    ys = grid.transform.f + (rows + 0.5) * grid.transform.e
    lon, lat = transform_points(grid.crs, LONLAT, xs.ravel(), ys.ravel())
    exact_c = (np.asarray(lon) - src.c) / src.a
    exact_r = (np.asarray(lat) - src.f) / src.e
    got_c, got_r = positions.strip(0, grid.height)
    assert np.abs(got_c[rows, cols].ravel() - exact_c).max() < reproject.TOLERANCE
    assert np.abs(got_r[rows, cols].ravel() - exact_r).max() < reproject.TOLERANCE


def test_a_lattice_too_coarse_for_the_curvature_is_refused() -> None:
    """The check at the cell centres sees interpolation errors above the tolerance."""
    grid = Grid(UTM33, Affine(10, 0, 300000, 0, -10, 5200000), 20000, 20000)
    src = Affine(1 / 3600, 0, 0, 0, -1 / 3600, 60)
    assert reproject.source_positions(grid, LONLAT, src, step=16) is not None
    assert reproject.source_positions(grid, LONLAT, src, step=10000) is None


def test_what_it_does_not_do_goes_to_gdal(tmp_path: Path) -> None:
    """Downsampling (GDAL widens its kernel) and other resamplings take GDAL's warper, with GDAL's
    result; a rotated source is refused."""
    dem = terrain(DEM_SHAPE)
    path = write_dem(tmp_path / "dem.tif", dem)
    raster = open_raster(path, "DEM")
    coarse = utm_grid_over(raster.bounds, margin_m=-300, res=60.0)
    np.testing.assert_array_equal(raster.read_onto(coarse), gdal_reference(path, coarse))
    fine = utm_grid_over(raster.bounds, margin_m=-300)
    with rasterio.open(path) as ds:
        src = raster.to_physical(ds.read(1))
    nearest = warp_array(src, raster.transform, raster.crs, fine, Resampling.nearest,
                         raster.warp_scale(fine.crs, fine.res))
    np.testing.assert_array_equal(raster.read_onto(fine, Resampling.nearest), nearest)
    rotated = raster.transform * Affine.rotation(1.0)
    assert reproject.source_positions(fine, LONLAT, rotated) is None


def test_a_grid_beside_the_source_is_all_no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dem(tmp_path / "dem.tif", terrain(DEM_SHAPE))
    raster = open_raster(path, "DEM")
    grid = utm_grid_over(raster.bounds, margin_m=-300)
    beside = Grid(UTM33, grid.transform * Affine.translation(grid.width + 400, 0), 60, 40)
    no_gdal_warp(monkeypatch)
    assert np.isnan(raster.read_onto(beside, Resampling.bilinear, raster.warp_scale(UTM33, (10.0, 10.0)))).all()


def test_iburi_dem_equals_gdal(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real AW3D30 tile of the Iburi scene onto its 10 m UTM 54N grid."""
    path = shared_data / "scenes" / "iburi_2018" / "dem" / "aw3d30_dsm.tif"
    raster = open_raster(path, "DEM")
    grid = utm_grid_over(raster.bounds, margin_m=-200, crs=CRS.from_epsg(32654))
    assert grid.width > 1000 and grid.height > 800
    ref = gdal_reference(path, grid)
    no_gdal_warp(monkeypatch)
    got = raster.read_onto(grid, Resampling.bilinear, raster.warp_scale(grid.crs, grid.res))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isfinite(got).mean() > 0.9
    with rasterio.open(path) as ds:
        atol = atol_for(raster.to_physical(ds.read(1)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol, equal_nan=True)
    assert atol < 0.05
