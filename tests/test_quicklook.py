"""Quicklook PNG: true-colour background with polygon outlines, written atomically."""

from __future__ import annotations

import dask.array as da
import geopandas as gpd
import numpy as np
import pytest
import shapely
import xarray as xr
from affine import Affine
from PIL import Image
from rasterio.crs import CRS

import postprocess.quicklook as quicklook
from pipeline.core.errors import ChannelError
from pipeline.core.grid import Grid
from postprocess.quicklook import QuicklookStyle, downsample_factor, write_quicklook

GRID = Grid(CRS.from_epsg(32633), Affine(10.0, 0, 500000.0, 0, -10.0, 4000000.0), 300, 200)


def stack(bands=("B02", "B03", "B04", "B08")) -> xr.DataArray:
    rng = np.random.default_rng(0)
    data = rng.uniform(0.02, 0.3, size=(len(bands), *GRID.shape)).astype(np.float32)
    data[list(bands).index("B04") if "B04" in bands else 0, :, 150:] += 0.3  # a red east half
    return xr.DataArray(da.from_array(data, chunks=(len(bands), 64, 64)), dims=("band", "y", "x"),
                        coords={"band": list(bands)})


def square(col0: int, row0: int, size: int) -> shapely.Polygon:
    t = GRID.transform
    return shapely.box(t.c + col0 * t.a, t.f + (row0 + size) * t.e, t.c + (col0 + size) * t.a, t.f + row0 * t.e)


def test_downsample_factor_bounds_the_longest_edge():
    assert downsample_factor((10980, 10980), 2048) == 6
    assert downsample_factor((100, 300), 2048) == 1
    assert downsample_factor((4097, 10), 2048) == 3


def test_quicklook_has_true_colour_and_outlines(tmp_path):
    polygons = gpd.GeoDataFrame(geometry=[square(20, 20, 40), square(200, 100, 30)], crs=GRID.crs)
    path = write_quicklook(stack(), GRID, polygons, tmp_path / "ql.png", max_size=100,
                           style=QuicklookStyle(colour=(0, 255, 255)))
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (200 // 3, 300 // 3, 3)
    # outline pixels along the first square's west edge (col 20 / 3)
    assert (image[8:18, 6] == [0, 255, 255]).all(axis=-1).sum() >= 8
    # red dominates in the east half, away from outlines
    east, west = image[:, 55:60].astype(int), image[:, 20:25].astype(int)
    assert east[..., 0].mean() > west[..., 0].mean() + 50
    assert list(tmp_path.iterdir()) == [path]


def test_quicklook_refuses_stacks_without_true_colour_bands(tmp_path):
    with pytest.raises(ChannelError, match="B04"):
        write_quicklook(stack(("B02", "B03", "B08")), GRID, None, tmp_path / "ql.png")


def test_failed_quicklook_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(quicklook.Image.Image, "save", broken)
    with pytest.raises(RuntimeError):
        write_quicklook(stack(), GRID, None, tmp_path / "ql.png")
    assert list(tmp_path.iterdir()) == []
