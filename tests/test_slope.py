"""Horn slope: exact on planes, block-wise equals whole-array, agrees with gdaldem."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.stack.terrain import horn_slope, horn_slope_dask, horn_slope_padded


def _plane(rows: int, cols: int, gx: float, gy: float, xres: float, yres: float) -> np.ndarray:
    """Elevation rising by gx per metre eastwards and gy per metre southwards."""
    r, c = np.mgrid[0:rows, 0:cols]
    return (c * xres * gx + r * yres * gy).astype(np.float64)


def _terrain(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:rows, 0:cols]
    z = 300 + 80 * np.sin(r / 17.0) * np.cos(c / 23.0) + 0.8 * c + rng.normal(0, 2, (rows, cols))
    return z.astype(np.float32)


@pytest.mark.parametrize(("gx", "gy", "xres", "yres"), [(0.3, 0.0, 10, 10), (0.2, -0.5, 10, 10),
                                                       (1.0, 1.0, 12.5, 30.0), (0.0, 0.0, 10, 10)])
def test_plane_slope_is_exact_inside(gx: float, gy: float, xres: float, yres: float) -> None:
    z = _plane(20, 25, gx, gy, xres, yres)
    s = horn_slope(z, xres, yres)
    expected = math.degrees(math.atan(math.hypot(gx, gy)))
    np.testing.assert_allclose(s[1:-1, 1:-1], expected, atol=1e-4)
    assert s.dtype == np.float32 and s.shape == z.shape


def test_edges_and_void_neighbours_get_a_slope_voids_stay_nan() -> None:
    z = _plane(12, 12, 0.5, 0.0, 10, 10)
    z[5, 5] = np.nan
    s = horn_slope(z, 10, 10)
    assert np.isnan(s[5, 5])
    assert np.isfinite(np.delete(s.ravel(), 5 * 12 + 5)).all()
    # missing neighbours take the centre value: at the west edge only half the gradient is seen
    assert s[6, 0] < s[6, 6]


def test_padded_input_must_have_a_halo() -> None:
    with pytest.raises(ValueError, match="halo"):
        horn_slope_padded(np.zeros((2, 5)), 10, 10)
    with pytest.raises(ValueError, match="positive"):
        horn_slope(np.zeros((5, 5)), 0, 10)


@pytest.mark.parametrize("chunks", [(37, 53), (64, 64), (200, 11), (300, 300)])
def test_blockwise_slope_equals_whole_array(chunks: tuple[int, int]) -> None:
    z = _terrain(150, 170)
    z[40:55, 60:90] = np.nan  # a void across block borders
    z[0, :] = np.nan
    whole = horn_slope(z, 10, 10)
    blocks = horn_slope_dask(da.from_array(z, chunks=chunks), 10, 10)
    assert blocks.chunks == da.from_array(z, chunks=chunks).chunks
    got = blocks.compute(scheduler="threads")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(whole))
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5, equal_nan=True)


def gdaldem_slope(dem_path: Path, out_path: Path) -> np.ndarray:
    """Run ``gdaldem slope`` (degrees, Horn) and return the result with NaN for its nodata."""
    exe = shutil.which("gdaldem")
    if exe is None:
        pytest.skip("gdaldem (Debian package gdal-bin) is not installed")
    subprocess.run([exe, "slope", "-q", str(dem_path), str(out_path)], check=True)
    with rasterio.open(out_path) as ds:
        return ds.read(1, masked=True).astype(np.float32).filled(np.nan)


def test_matches_gdaldem_on_synthetic_terrain(tmp_path: Path) -> None:
    z = _terrain(120, 140, seed=3)
    xres, yres = 10.0, 12.5
    path = tmp_path / "dem.tif"
    with rasterio.open(path, "w", driver="GTiff", width=140, height=120, count=1, dtype="float32",
                       crs="EPSG:32633", transform=Affine(xres, 0, 500000, 0, -yres, 5000000)) as ds:
        ds.write(z, 1)
    ref = gdaldem_slope(path, tmp_path / "slope.tif")
    ours = horn_slope_dask(da.from_array(z, chunks=50), xres, yres).compute()
    interior = np.s_[1:-1, 1:-1]
    diff = np.abs(ref[interior] - ours[interior])
    assert np.isfinite(diff).all()
    assert diff.mean() < 0.01 and diff.max() < 0.05


def test_long_blocks_computed_in_strips_equal_short_blocks() -> None:
    z = _terrain(700, 60, seed=5)
    z[250:262, 10:20] = np.nan  # a void across a strip border
    one_block = horn_slope(z, 10, 10)
    small_blocks = horn_slope_dask(da.from_array(z, chunks=(100, 60)), 10, 10).compute()
    np.testing.assert_array_equal(np.isnan(one_block), np.isnan(small_blocks))
    np.testing.assert_allclose(one_block, small_blocks, atol=1e-5, equal_nan=True)
