"""Postprocessing of the probability raster: block-wise results equal whole-array results."""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize
from scipy import ndimage as ndi

from pipeline.core.config import PostprocessSection
from pipeline.core.errors import ConfigError
from pipeline.core.grid import Grid
from postprocess.areas import (
    OpenedSummaries,
    fill_small_holes,
    opened_summaries,
    remove_small_objects,
)
from postprocess.morphology import (
    _morph,
    disk,
    erode,
    open_close,
    open_close_array,
    opened_mask,
)
from postprocess.objects import ObjectLayers, OpenedMask, clean_objects
from postprocess.polygons import effective_threshold

NEPAL = "bhuyan_predicted_nepal.zip"
# A 240 x 320 px window at 10 m with ~10 % landslide cover (inventory of 2015).
NEPAL_WINDOW = (323190.0, 3107260.0, 326390.0, 3109660.0)


def make_grid(shape: tuple[int, int], res: float = 10.0) -> Grid:
    return Grid(CRS.from_epsg(32645), Affine(res, 0, 300000.0, 0, -res, 3100000.0), shape[1], shape[0])


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def nepal_scene(shared_data: Path) -> dict:
    """Probability, validity and slope built around a rasterized real inventory."""
    path = f"/vsizip/{shared_data / 'inventories' / NEPAL}/Nepal/2015.shp"
    polygons = gpd.read_file(path)
    grid = Grid.from_bounds(NEPAL_WINDOW, polygons.crs, 10.0)
    truth = rasterize(((g, 1) for g in polygons.geometry), out_shape=grid.shape, transform=grid.transform,
                      dtype="uint8").astype(bool)
    assert 0.03 < truth.mean() < 0.3, "the window should hold a fair share of landslide pixels"
    rng = np.random.default_rng(42)
    noise = ndi.gaussian_filter(rng.normal(size=grid.shape), 1.5)
    noise /= np.abs(noise).max()
    prob = np.clip(0.25 + 0.5 * truth + 0.35 * noise + 0.1 * rng.random(grid.shape), 0, 1).astype(np.float32)
    valid = np.ones(grid.shape, bool)
    valid[150:200, 0:60] = False  # a cloud at the west edge
    valid[30:45, 200:230] = False  # and one inside
    prob[~valid] = np.nan
    rows = np.arange(grid.height)[:, None]
    slope = np.broadcast_to(rows / grid.height * 30.0, grid.shape).astype(np.float32)  # 0 deg north .. 30 deg south
    return {"grid": grid, "truth": truth, "prob": prob, "valid": valid, "slope": slope}


# --------------------------------------------------------------------------
# an independent whole-array reference
# --------------------------------------------------------------------------
def reference_labels(prob, valid, grid, params, threshold, slope=None):
    """Straightforward scipy on the whole array, with the documented conventions."""
    r_open = params.opening_radius_m / grid.res[0]
    r_close = params.closing_radius_m / grid.res[0]
    m = (prob >= threshold) & valid

    def fp(r):
        h = int(np.floor(r))
        yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
        return xx**2 + yy**2 <= r * r + 1e-9

    def erode(a, r):
        return ndi.binary_erosion(a | ~valid, fp(r), border_value=1) & valid

    def dilate(a, r):
        return ndi.binary_dilation(a, fp(r), border_value=0) & valid

    if r_open >= 1:
        m = dilate(erode(m, r_open), r_open)
    if r_close >= 1:
        m = erode(dilate(m, r_close), r_close)
    four = ndi.generate_binary_structure(2, 1)
    lab, n = ndi.label(m, four)
    area = np.bincount(lab.ravel(), minlength=n + 1) * grid.pixel_area
    keep = area >= params.min_area_m2
    keep[0] = False
    m = keep[lab]
    bg, nb = ndi.label(~m, np.ones((3, 3), bool))
    edge = np.zeros(nb + 1, bool)
    for line in (bg[0], bg[-1], bg[:, 0], bg[:, -1]):
        edge[line] = True
    has_invalid = np.bincount(bg[~valid], minlength=nb + 1) > 0
    hole = ~edge & ~has_invalid & (np.bincount(bg.ravel(), minlength=nb + 1) * grid.pixel_area < params.max_hole_m2)
    hole[0] = False
    m = m | hole[bg]
    lab, n = ndi.label(m, four)
    keep = np.ones(n + 1, bool)
    keep[0] = False
    if params.min_mean_slope_deg is not None and slope is not None:
        sums = ndi.mean(slope, lab, index=np.arange(1, n + 1)) if n else np.zeros(0)
        keep[1:] = ~(np.asarray(sums) < params.min_mean_slope_deg)
    new = np.zeros(n + 1, np.int32)
    new[np.flatnonzero(keep)] = np.arange(1, keep.sum() + 1)
    return new[lab]


PARAMS = PostprocessSection(
    opening_radius_m=10.0, closing_radius_m=20.0, min_area_m2=600.0, max_hole_m2=900.0, min_mean_slope_deg=8.0
)


def run(prob, valid, grid, params, chunks, threshold=0.5, slope=None):
    p = da.from_array(prob, chunks=chunks)
    v = da.from_array(valid, chunks=chunks)
    s = None if slope is None else da.from_array(slope, chunks=chunks)
    objects = clean_objects(p, v, grid, params, threshold=threshold, layers=ObjectLayers(slope=s))
    return objects, objects.labels.compute()


# --------------------------------------------------------------------------
# block-wise == whole array
# --------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [(240, 320), (64, 64), (100, 77), (33, 50)])
def test_blockwise_cleaning_of_real_mask_equals_whole_array(nepal_scene, chunks):
    s = nepal_scene
    expected = reference_labels(s["prob"], s["valid"], s["grid"], PARAMS, 0.5, s["slope"])
    assert expected.max() > 10, "the test scene should keep many objects"
    _, labels = run(s["prob"], s["valid"], s["grid"], PARAMS, chunks, slope=s["slope"])
    np.testing.assert_array_equal(labels, expected)


def test_cleaning_changes_the_thresholded_mask(nepal_scene):
    """Each step must act on the test scene, or the equality test proves little."""
    s = nepal_scene
    raw = (s["prob"] >= 0.5) & s["valid"]
    _, n_raw = ndi.label(raw, ndi.generate_binary_structure(2, 1))
    no_rules = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=0)
    _, plain = run(s["prob"], s["valid"], s["grid"], no_rules, (64, 64))
    np.testing.assert_array_equal(plain > 0, raw)
    assert plain.max() == n_raw
    _, cleaned = run(s["prob"], s["valid"], s["grid"], PARAMS, (64, 64), slope=s["slope"])
    assert cleaned.max() < n_raw / 2
    # the slope rule removes objects in the flat north
    no_slope = PARAMS.model_copy(update={"min_mean_slope_deg": None})
    _, kept = run(s["prob"], s["valid"], s["grid"], no_slope, (64, 64), slope=s["slope"])
    assert kept.max() > cleaned.max()
    assert (kept[:20] > 0).any() and not (cleaned[:20] > 0).any()


@pytest.mark.parametrize("seed", range(4))
def test_random_masks_on_tiny_blocks_match_whole_array(seed):
    """Many objects and holes cut by block corners, including diagonal background contacts."""
    rng = np.random.default_rng(seed)
    shape = (61, 73)
    grid = make_grid(shape)
    prob = ndi.gaussian_filter(rng.random(shape), 1.0)
    prob = ((prob - prob.min()) / (prob.max() - prob.min())).astype(np.float32)
    valid = rng.random(shape) > 0.01
    params = PostprocessSection(opening_radius_m=0, closing_radius_m=10.0 if seed % 2 else 0.0,
                                min_area_m2=300.0, max_hole_m2=2000.0)
    expected = reference_labels(prob, valid, grid, params, 0.55)
    for chunks in [(9, 11), (16, 25)] if seed else [(7, 9), (16, 5)]:
        _, labels = run(prob, valid, grid, params, chunks, threshold=0.55)
        np.testing.assert_array_equal(labels, expected, err_msg=f"chunks {chunks}")


def test_opening_and_closing_per_block_equal_whole_array():
    rng = np.random.default_rng(3)
    shape = (90, 110)
    mask = ndi.gaussian_filter(rng.random(shape), 2) > 0.5
    known = np.ones(shape, bool)
    known[40:60, 0:30] = False
    for r_open, r_close in [(1.0, 1.0), (2.5, 1.5), (0.0, 3.0), (3.2, 0.0)]:
        expected = open_close_array(mask, known, disk(r_open), disk(r_close))
        got = open_close(da.from_array(mask, chunks=(20, 17)), da.from_array(known, chunks=(20, 17)),
                         r_open, r_close).compute()
        np.testing.assert_array_equal(got, expected, err_msg=f"radii {r_open}, {r_close}")


@pytest.mark.parametrize("radius", [1.0, 1.5, 2.0, 2.5, 3.0, 4.2, 7.0])
def test_row_run_erosion_and_dilation_equal_scipy(radius):
    """The fast erosion/dilation gives scipy's result, border values included, on any shape."""
    rng = np.random.default_rng(int(radius * 10))
    footprint = disk(radius)
    for shape in [(1, 1), (3, 50), (57, 83), (200, 131)]:
        for density in (0.1, 0.5, 0.9):
            x = rng.random(shape) < density
            np.testing.assert_array_equal(_morph(x, footprint, True),
                                          ndi.binary_erosion(x, structure=footprint, border_value=1))
            np.testing.assert_array_equal(_morph(x, footprint, False),
                                          ndi.binary_dilation(x, structure=footprint, border_value=0))
    # a footprint that is not symmetric top to bottom goes to scipy
    odd = np.array([[0, 1, 0], [1, 1, 1], [1, 1, 1]], bool)
    x = rng.random((30, 30)) < 0.3
    np.testing.assert_array_equal(_morph(x, odd, False), ndi.binary_dilation(x, structure=odd, border_value=0))
    # with unknown pixels: erosion treats them as foreground, and they stay false
    x = rng.random((40, 40)) < 0.7
    known = rng.random((40, 40)) < 0.9
    expected = ndi.binary_erosion(x | ~known, structure=footprint, border_value=1) & known
    np.testing.assert_array_equal(erode(x, known, footprint), expected)


# --------------------------------------------------------------------------
# behaviour of each step
# --------------------------------------------------------------------------
def test_disk_radius_is_converted_from_metres():
    assert disk(0.5) is None
    np.testing.assert_array_equal(disk(1.0), ndi.generate_binary_structure(2, 1))
    assert disk(2.0).shape == (5, 5) and disk(2.0).sum() == 13
    assert disk(1.5).sum() == 9


def test_opening_removes_specks_and_closing_fills_gaps():
    grid = make_grid((30, 30))
    prob = np.zeros((30, 30), np.float32)
    prob[5, 5] = 0.9  # a speck
    prob[10:20, 10:20] = 0.9
    prob[10:20, 14] = 0.1  # a one-pixel gap
    valid = np.ones_like(prob, bool)
    params = PostprocessSection(opening_radius_m=10, closing_radius_m=10, min_area_m2=0, max_hole_m2=0)
    _, labels = run(prob, valid, grid, params, (12, 12))
    assert labels[5, 5] == 0
    assert labels.max() == 1  # the two halves are joined
    assert (labels[12:18, 14] == 1).all()
    assert labels[10, 10] == 0  # a cross-shaped (10 m) opening rounds the corners


def test_min_area_is_strict_and_in_square_metres():
    grid = make_grid((20, 40))
    prob = np.zeros((20, 40), np.float32)
    prob[2:5, 2:4] = 0.9  # 6 px = 600 m2
    prob[10:13, 10:12] = 0.9
    prob[10, 10] = 0.0  # 5 px = 500 m2
    valid = np.ones_like(prob, bool)
    params = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=600, max_hole_m2=0)
    _, labels = run(prob, valid, grid, params, (7, 7))
    assert labels.max() == 1
    assert (labels[2:5, 2:4] == 1).all() and labels[10:13, 10:12].sum() == 0


def test_small_enclosed_holes_are_filled_but_not_holes_touching_missing_data_or_the_edge():
    grid = make_grid((40, 40))
    prob = np.zeros((40, 40), np.float32)
    prob[2:12, 2:12] = 0.9
    prob[5:7, 5:7] = 0.0  # small enclosed hole: filled
    prob[20:30, 2:12] = 0.9
    prob[23:25, 5:7] = 0.0  # small hole that holds a pixel without data: kept
    prob[2:12, 20:30] = 0.9
    prob[4:10, 22:28] = 0.0  # hole of 36 px = 3600 m2 >= 900: kept
    prob[30:40, 30:40] = 0.9
    prob[39, 34] = 0.0  # notch on the raster edge: not a hole
    valid = np.ones_like(prob, bool)
    valid[23, 5] = False
    params = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=900)
    _, labels = run(prob, valid, grid, params, (13, 11))
    mask = labels > 0
    assert mask[5:7, 5:7].all()
    assert not mask[23:25, 5:7].any()
    assert not mask[4:10, 22:28].any()
    assert not mask[39, 34]


def test_hole_closed_only_diagonally_across_a_block_corner_is_not_a_hole():
    """Background is 8-connected: a diagonal gap at a block corner links a 'hole' to the outside."""
    grid = make_grid((20, 20))
    m = np.zeros((20, 20), bool)
    m[6:14, 6:14] = True
    m[8:10, 8:10] = False  # inner background, 4 px
    m[7, 7] = False  # ... reaching the ring's corner diagonally
    m[6, 6] = False
    # pixel (9, 9) region and the outside touch only diagonally via (7,7)-(6,6)-(5,5)
    prob = np.where(m, 0.9, 0.1).astype(np.float32)
    valid = np.ones_like(prob, bool)
    params = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=10000)
    expected = reference_labels(prob, valid, grid, params, 0.5)
    assert not (expected[8:10, 8:10] > 0).any()
    for chunks in [(7, 7), (8, 8), (6, 6), (20, 20)]:  # corners at (7,7), (8,8) and (6,6)
        _, labels = run(prob, valid, grid, params, chunks)
        np.testing.assert_array_equal(labels, expected, err_msg=f"chunks {chunks}")


def test_object_joined_only_through_other_blocks_gets_one_label():
    grid = make_grid((30, 30))
    m = np.zeros((30, 30), bool)
    m[2:28, 2] = m[27, 2:28] = m[2:28, 27] = True  # a U spanning blocks
    m[2:5, 10:12] = True  # separate object
    prob = np.where(m, 0.9, 0.1).astype(np.float32)
    valid = np.ones_like(prob, bool)
    params = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=0)
    _, labels = run(prob, valid, grid, params, (10, 10))
    assert labels.max() == 2
    assert labels[2, 2] == 1 and labels[2, 27] == 1 and labels[2, 10] == 2


def test_global_ids_follow_first_pixel_order_whatever_the_blocks(nepal_scene):
    s = nepal_scene
    _, a = run(s["prob"], s["valid"], s["grid"], PARAMS, (240, 320), slope=s["slope"])
    _, b = run(s["prob"], s["valid"], s["grid"], PARAMS, (50, 45), slope=s["slope"])
    np.testing.assert_array_equal(a, b)
    firsts = [np.flatnonzero(a.ravel() == k)[0] for k in range(1, a.max() + 1)]
    assert firsts == sorted(firsts)


def test_ndvi_rule_drops_green_objects():
    grid = make_grid((20, 20))
    prob = np.zeros((20, 20), np.float32)
    prob[2:6, 2:6] = prob[12:16, 12:16] = 0.9
    red = np.full((20, 20), 0.2, np.float32)
    nir = np.full((20, 20), 0.25, np.float32)
    nir[12:16, 12:16] = 0.6  # NDVI 0.5: vegetation
    valid = np.ones_like(prob, bool)
    params = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=0,
                                max_mean_ndvi=0.3)
    obj = clean_objects(da.from_array(prob, chunks=8), da.from_array(valid, chunks=8), grid, params,
                        threshold=0.5,
                        layers=ObjectLayers(red=da.from_array(red, chunks=8), nir=da.from_array(nir, chunks=8)))
    labels = obj.labels.compute()
    assert labels.max() == 1 and (labels[2:6, 2:6] == 1).all() and labels[12:16, 12:16].sum() == 0
    assert obj.dropped["terrain"] == 1


def test_ndwi_rule_drops_water_and_keeps_scars_across_blocks():
    """A turbid river (bright in the visible, dark in the NIR) is dropped, a bare scar is kept, an
    object without B03/B08 values is kept; the means are over whole objects, whatever the blocks."""
    grid = make_grid((24, 24))
    prob = np.zeros((24, 24), np.float32)
    prob[1:5, 1:9] = 0.9  # scar, crossing a block edge
    prob[10:13, 2:22] = 0.9  # river, crossing two block edges
    prob[18:22, 18:22] = 0.9  # no B03/B08 values
    green = np.full((24, 24), 0.10, np.float32)
    nir = np.full((24, 24), 0.25, np.float32)  # bare soil and rock: NDWI about -0.43
    green[10:13, 2:22], nir[10:13, 2:22] = 0.12, 0.05  # water: NDWI about +0.41
    green[10:13, 2:6] = 0.06  # the river's upstream end alone has NDWI about +0.09
    green[18:22, 18:22] = nir[18:22, 18:22] = np.nan
    valid = np.ones_like(prob, bool)

    def clean(limit, chunks):
        params = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=0,
                                    max_mean_ndwi=limit)
        return clean_objects(da.from_array(prob, chunks=chunks), da.from_array(valid, chunks=chunks), grid, params,
                             threshold=0.5, layers=ObjectLayers(green=da.from_array(green, chunks=chunks),
                                                                nir=da.from_array(nir, chunks=chunks)))

    for chunks in (24, 7):
        obj = clean(0.2, chunks)
        labels = obj.labels.compute()
        assert obj.dropped["terrain"] == 1
        assert (labels[1:5, 1:9] > 0).all() and (labels[18:22, 18:22] > 0).all()
        assert labels[10:13, 2:22].sum() == 0  # dropped as a whole: the upstream end with it
    assert clean(None, 7).labels.compute()[10:13, 2:22].all()  # no rule: the river is a detection
    assert clean(0.5, 7).labels.compute()[10:13, 2:22].all()  # mean NDWI 0.35 is under 0.5


def test_ndwi_rule_without_bands_is_skipped_with_a_warning(caplog):
    grid = make_grid((10, 10))
    prob = np.zeros((10, 10), np.float32)
    prob[2:6, 2:6] = 0.9
    params = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=0,
                                max_mean_ndwi=0.0)
    with caplog.at_level("WARNING"):
        obj = clean_objects(da.from_array(prob, chunks=5), da.from_array(np.ones((10, 10), bool), chunks=5), grid,
                            params, threshold=0.5)
    assert obj.count == 1
    assert "max_mean_ndwi is set but B03/B08 were not given" in caplog.text


def test_missing_probability_is_never_above_threshold_and_mask_stays_inside_valid_data():
    grid = make_grid((20, 20))
    prob = np.full((20, 20), 0.9, np.float32)
    prob[:, :5] = np.nan
    valid = np.ones_like(prob, bool)
    valid[15:, :] = False
    params = PostprocessSection(min_area_m2=0, max_hole_m2=0)
    _, labels = run(prob, valid, grid, params, (7, 7))
    assert not (labels[:, :5] > 0).any()
    assert not (labels[15:] > 0).any()
    assert (labels[:15, 5:] > 0).all()  # unknown pixels do not erode the object


def test_threshold_from_config_overrides_model_threshold():
    assert effective_threshold(PostprocessSection(threshold=0.7), 0.4) == 0.7
    assert effective_threshold(PostprocessSection(), 0.4) == 0.4
    with pytest.raises(ConfigError, match="postprocess.threshold"):
        effective_threshold(PostprocessSection(), None)


def test_global_passes_are_identity_when_disabled():
    m = da.from_array(np.eye(10, dtype=bool), chunks=4)
    assert remove_small_objects(m, 0, 100.0) is m
    assert fill_small_holes(m, m, 0, 100.0) is m


def test_morphology_runs_once_per_block_for_all_passes_and_the_mask(monkeypatch):
    """The size, hole and final passes and the mask raster reuse one opened/closed mask."""
    import postprocess.morphology as morphology

    calls = []
    original = morphology.open_close_array

    def counted(mask, *args, **kwargs):
        if mask.size:  # dask may probe the function with an empty array
            calls.append(mask.shape)
        return original(mask, *args, **kwargs)

    monkeypatch.setattr(morphology, "open_close_array", counted)
    rng = np.random.default_rng(5)
    shape = (120, 150)
    prob = ndi.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    valid = np.ones(shape, bool)
    grid = make_grid(shape)
    chunks = (40, 50)
    expected = reference_labels(prob, valid, grid, PARAMS, 0.5)
    objects, labels = run(prob, valid, grid, PARAMS, chunks)
    mask = objects.mask.compute()
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(mask, expected > 0)
    assert objects.count == expected.max() > 3
    assert len(calls) == 3 * 3  # once per block


# --------------------------------------------------------------------------
# the size and hole steps from summaries made with the opened mask
# --------------------------------------------------------------------------
SUMMARY_PARAMS = {
    "removes and fills": PostprocessSection(opening_radius_m=10.0, closing_radius_m=0.0, min_area_m2=600.0,
                                            max_hole_m2=2000.0),
    "changes nothing": PostprocessSection(opening_radius_m=10.0, closing_radius_m=10.0, min_area_m2=100.0,
                                          max_hole_m2=100.0),
    "fills only": PostprocessSection(opening_radius_m=10.0, closing_radius_m=0.0, min_area_m2=0.0,
                                     max_hole_m2=2000.0),
    "removes only": PostprocessSection(opening_radius_m=0.0, closing_radius_m=0.0, min_area_m2=400.0,
                                       max_hole_m2=0.0),
}


class CountComputations:
    """Counts the computations dask's local schedulers start (``dask.callbacks.Callback``): each
    pass of the cleaning steps over the mask's blocks is one computation."""

    def __init__(self) -> None:
        from dask.callbacks import Callback

        self.count = 0
        self._callback = Callback(start=self._started)

    def _started(self, dsk) -> None:  # noqa: ANN001
        self.count += 1

    def __enter__(self) -> CountComputations:
        self._callback.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._callback.__exit__(*exc)


@pytest.mark.parametrize("case", list(SUMMARY_PARAMS))
def test_size_and_hole_steps_from_the_opened_masks_summaries_equal_their_passes(
        nepal_scene, case: str) -> None:
    """Summaries made with the opened mask give the same objects, statistics and mask; a step that
    changes nothing makes no pass over the mask, one that removes objects redoes the hole step's
    summaries on the smaller mask."""
    s = nepal_scene
    params = SUMMARY_PARAMS[case]
    chunks = (64, 77)
    expected = reference_labels(s["prob"], s["valid"], s["grid"], params, 0.5)
    assert expected.max() > 10
    p = da.from_array(s["prob"], chunks=chunks)
    v = da.from_array(s["valid"], chunks=chunks)
    opened = opened_mask(p, v, s["grid"], params, 0.5)
    opened_np, computed = dask.compute(opened, opened_summaries(opened, v))
    given = OpenedMask(da.from_array(opened_np, chunks=chunks), OpenedSummaries.collect(opened.chunks, computed))
    with CountComputations() as passes:
        objects = clean_objects(p, v, s["grid"], params, threshold=0.5, opened=given)
    np.testing.assert_array_equal(objects.labels.compute(), expected)
    np.testing.assert_array_equal(objects.mask.compute(), expected > 0)
    plain = clean_objects(da.from_array(s["prob"], chunks=chunks), da.from_array(s["valid"], chunks=chunks),
                          s["grid"], params, threshold=0.5)
    assert plain.stats.keys() == objects.stats.keys()
    for name in plain.stats:
        np.testing.assert_array_equal(plain.stats[name], objects.stats[name], err_msg=name)
    # what each case does to the opened mask decides which computations remain: the final labelling
    # alone when the steps change nothing; the hole step's summaries again when the size step removed
    # objects; the changed mask's own computation when a step changed it
    assert passes.count == {"removes and fills": 3, "changes nothing": 1, "fills only": 2, "removes only": 2}[case]
    with CountComputations() as without:  # without the summaries: a pass for each step that runs
        clean_objects(p, v, s["grid"], params, threshold=0.5)
    assert without.count >= passes.count + 2  # the size and hole steps' passes, saved


def test_the_cases_do_what_their_names_say(nepal_scene) -> None:
    """The cases above act on the test scene as named (else the pass counts prove little)."""
    s = nepal_scene
    for case, params in SUMMARY_PARAMS.items():
        p, v = da.from_array(s["prob"], chunks=(64, 77)), da.from_array(s["valid"], chunks=(64, 77))
        opened = opened_mask(p, v, s["grid"], params, 0.5)
        smaller = remove_small_objects(opened, params.min_area_m2, s["grid"].pixel_area)
        filled = fill_small_holes(smaller, v, params.max_hole_m2, s["grid"].pixel_area)
        removed = smaller is not opened and bool((smaller != opened).any().compute())
        fills = filled is not smaller and bool((filled != smaller).any().compute())
        assert (removed, fills) == {"removes and fills": (True, True), "changes nothing": (False, False),
                                    "fills only": (False, True), "removes only": (True, False)}[case], case


def test_summaries_in_other_chunks_are_not_used(nepal_scene) -> None:
    s = nepal_scene
    expected = reference_labels(s["prob"], s["valid"], s["grid"], PARAMS, 0.5)
    chunks, other = (64, 77), (100, 90)
    p, v = da.from_array(s["prob"], chunks=chunks), da.from_array(s["valid"], chunks=chunks)
    opened_other = opened_mask(da.from_array(s["prob"], chunks=other), da.from_array(s["valid"], chunks=other),
                               s["grid"], PARAMS, 0.5)
    computed = opened_summaries(opened_other, da.from_array(s["valid"], chunks=other)).compute()
    summaries = OpenedSummaries.collect(opened_other.chunks, computed)
    mask = da.from_array(opened_other.compute(), chunks=chunks)
    with CountComputations() as passes:
        objects = clean_objects(p, v, s["grid"], PARAMS, threshold=0.5, opened=OpenedMask(mask, summaries))
    np.testing.assert_array_equal(objects.labels.compute(), expected)
    with CountComputations() as without:
        clean_objects(p, v, s["grid"], PARAMS, threshold=0.5, opened=OpenedMask(mask, None))
    assert passes.count == without.count  # every pass made, as without summaries


def test_summaries_must_match_their_layout() -> None:
    m = da.from_array(np.eye(12, dtype=bool), chunks=6)
    computed = opened_summaries(m, m | True).compute()
    assert len(OpenedSummaries.collect(m.chunks, computed).objects) == 4
    with pytest.raises(ValueError, match="do not match"):
        OpenedSummaries.collect(((4, 4, 4), (6, 6)), computed)
