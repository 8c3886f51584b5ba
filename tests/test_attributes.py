"""Attributes of landslide polygons on a case small enough to compute by hand."""

from __future__ import annotations

import datetime as dt
import hashlib

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS

from pipeline.core.config import PostprocessSection
from pipeline.core.grid import Grid
from postprocess.attributes import COLUMNS, object_statistics, stable_id
from postprocess.objects import ObjectLayers
from postprocess.polygons import polygons_from_probability

GRID = Grid(CRS.from_epsg(32633), Affine(10.0, 0, 500000.0, 0, -10.0, 4000000.0), 20, 20)
PLAIN = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=0)
CONTEXT = {
    "scene_id": "S2A_TEST",
    "acq_date": dt.date(2021, 7, 4),
    "model_name": "unet-r34",
    "model_sha256": "ab" * 32,
    "run_id": "run-1",
}


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def layers() -> dict[str, np.ndarray]:
    prob = np.zeros((20, 20), np.float32)
    prob[6:9, 5:9] = 0.6  # object A: 3 x 4 px, first pixel (6, 5)
    prob[7, 6] = 0.96
    prob[2:4, 12:14] = 0.8  # object B: 2 x 2 px, first pixel (2, 12): comes first
    slope = np.zeros((20, 20), np.float32)
    slope[6], slope[7], slope[8] = 10.0, 20.0, 30.0
    slope[2:4] = 40.0
    dem = np.full((20, 20), 1000.0, np.float32)
    dem[8, 8] = np.nan  # a DEM void inside A
    dem[2:4, 12:14] = [[500.0, 501.0], [502.0, 503.0]]
    unc = np.full((20, 20), 0.1, np.float32)
    return {"prob": prob, "slope": slope, "dem": dem, "uncertainty": unc}


def run(block: int, context=CONTEXT, with_terrain: bool = True, prob=None):
    arrays = layers()
    if prob is not None:
        arrays["prob"] = prob

    def lazy(a):
        return xr.DataArray(da.from_array(a, chunks=block), dims=("y", "x"))

    extra = {k: lazy(arrays[k]) for k in ("slope", "dem", "uncertainty")} if with_terrain else {}
    return polygons_from_probability(
        lazy(arrays["prob"]), lazy(np.ones((20, 20), bool)), GRID, PLAIN, threshold=0.5, context=context,
        layers=ObjectLayers(**extra),
    )


def test_attributes_of_a_hand_computed_case():
    gdf, mask = run(block=7)  # both objects cross block edges
    assert list(gdf.columns) == [*COLUMNS, "geometry"]
    assert len(gdf) == 2
    b, a = gdf.iloc[0], gdf.iloc[1]
    assert (b["label"], a["label"]) == (1, 2)
    assert a["n_pixels"] == 12 and a["area_m2"] == pytest.approx(1200.0)
    assert a["perimeter_m"] == pytest.approx(2 * (40 + 30))
    assert a["mean_prob"] == pytest.approx((11 * 0.6 + 0.96) / 12, rel=1e-6)
    assert a["max_prob"] == pytest.approx(0.96, rel=1e-6)
    assert a["mean_slope"] == pytest.approx(20.0) and a["max_slope"] == pytest.approx(30.0)
    assert a["mean_elev"] == pytest.approx(1000.0)  # the void is ignored
    assert a["mean_uncertainty"] == pytest.approx(0.1, rel=1e-6)
    assert b["mean_elev"] == pytest.approx(501.5) and b["area_m2"] == pytest.approx(400.0)
    lon, lat = Transformer.from_crs(GRID.crs, "EPSG:4326", always_xy=True).transform(500070.0, 3999925.0)
    assert a["centroid_lon"] == pytest.approx(lon, abs=1e-9) and a["centroid_lat"] == pytest.approx(lat, abs=1e-9)
    assert a["scene_id"] == "S2A_TEST" and a["acq_date"] == "2021-07-04"
    assert a["model_name"] == "unet-r34" and a["model_sha256"] == "ab" * 32 and a["run_id"] == "run-1"
    assert int(mask.sum()) == 16
    assert mask.rio.crs == GRID.crs


def test_ids_are_stable_across_block_layouts_and_reruns_and_depend_on_scene_and_place():
    ids = [tuple(run(block)[0]["landslide_id"]) for block in (20, 7, 5)]
    assert ids[0] == ids[1] == ids[2]
    assert len(set(ids[0])) == 2
    other = run(20, context={**CONTEXT, "scene_id": "S2B_OTHER"})[0]
    assert not set(other["landslide_id"]) & set(ids[0])
    # the id of A hashes the scene and its first pixel's centre
    expected = hashlib.sha256(b"S2A_TEST|EPSG:32633|500055.00|3999935.00").hexdigest()[:16]
    assert ids[0][1] == expected == stable_id("S2A_TEST", GRID.crs, 500055.0, 3999935.0)


def test_missing_layers_give_null_attributes_not_missing_columns():
    gdf, _ = run(block=10, with_terrain=False, context={"scene_id": "x"})
    assert list(gdf.columns) == [*COLUMNS, "geometry"]
    for column in ("mean_slope", "max_slope", "mean_elev", "mean_uncertainty"):
        assert gdf[column].isna().all()
    assert gdf["run_id"].isna().all()
    assert gdf["mean_prob"].notna().all()


def test_empty_result_has_the_schema():
    gdf, mask = run(block=8, prob=np.zeros((20, 20), np.float32))
    assert len(gdf) == 0
    assert list(gdf.columns) == [*COLUMNS, "geometry"]
    assert gdf.crs == GRID.crs
    assert not bool(mask.any())


def test_statistics_of_a_global_label_raster_are_reduced_block_by_block():
    arrays = layers()
    labels = np.zeros((20, 20), np.int32)
    labels[6:9, 5:9] = 7
    labels[2:4, 12:14] = 3
    present, stats = object_statistics(
        da.from_array(labels, chunks=6), {"dem": da.from_array(arrays["dem"], chunks=6), "slope": arrays["slope"]}
    )
    np.testing.assert_array_equal(present, [3, 7])
    np.testing.assert_array_equal(stats["count"], [4, 12])
    np.testing.assert_array_equal(stats["first"], [2 * 20 + 12, 6 * 20 + 5])
    np.testing.assert_allclose(stats["dem_sum"] / stats["dem_n"], [501.5, 1000.0])
    np.testing.assert_allclose(stats["slope_max"], [40.0, 30.0])


@pytest.mark.parametrize("origin", [(0, 0), (37, 120)])
def test_block_pixel_statistics_match_a_label_by_label_computation(origin: tuple[int, int]) -> None:
    """``pixel_stats`` of one block against plain per-label reductions: counts, the first pixel in
    the whole array, sums, finite counts and maxima of float32 layers with and without NaN, and
    labels without pixels in the block."""
    from scipy import ndimage

    from postprocess.label_stats import pixel_stats

    rng = np.random.default_rng(11)
    lab, n = ndimage.label(rng.random((60, 75)) < 0.45)
    lab = lab.astype(np.int32)
    lab[lab == 5] = 0  # a label without pixels
    width = 500
    clean = rng.normal(100, 30, lab.shape).astype(np.float32)
    holes = rng.normal(0, 10, lab.shape).astype(np.float32)
    holes[rng.random(lab.shape) < 0.2] = np.nan
    holes[lab == 3] = np.nan  # an object without any finite value
    stats = pixel_stats(lab, n, {"clean": clean, "holes": holes}, origin=origin, width=width, first=True)
    for k in range(1, n + 1):
        where = lab == k
        rows, cols = np.nonzero(where)
        assert stats["count"][k - 1] == where.sum()
        expected_first = (rows[0] + origin[0]) * width + cols[0] + origin[1] if rows.size else np.iinfo(np.int64).max
        assert stats["first"][k - 1] == expected_first
        for name, arr in (("clean", clean), ("holes", holes)):
            vals = arr[where].astype(np.float64)
            vals = vals[np.isfinite(vals)]
            assert stats[f"{name}_n"][k - 1] == vals.size
            np.testing.assert_allclose(stats[f"{name}_sum"][k - 1], vals.sum(), rtol=1e-12)
            assert stats[f"{name}_max"][k - 1] == (vals.max() if vals.size else -np.inf)
    assert stats["count"][4] == 0 and stats["holes_n"][2] == 0
    counts_only = pixel_stats(lab, n)  # the size and hole steps' summaries
    assert set(counts_only) == {"count"} and counts_only["count"].dtype == np.int64
    np.testing.assert_array_equal(counts_only["count"], stats["count"])
    assert stats["clean_n"].dtype == np.int64 and stats["clean_sum"].dtype == np.float64
