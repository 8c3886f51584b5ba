"""The scene_robust normalization: statistics, invariance, patch sets as populations, scene sampling."""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

from pipeline.artefact import ModelArtefact
from pipeline.channels import L4S_CHANNELS
from pipeline.datasets import PatchDataset, PatchRecord
from pipeline.errors import ModelError
from pipeline.grid import Grid
from pipeline.inference import InferenceOptions, predict
from pipeline.models import build_model
from pipeline.normalization import band_stats, normalize, resolve_spec, validate_spec
from pipeline.scenestats import array_band_stats, sample_origins

SCENE = {"method": "scene_robust", "clip": 10.0}
CHANNELS = list(L4S_CHANNELS)


def _scale_offset(n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.01, 500.0, n).astype(np.float32), rng.uniform(-50.0, 50.0, n).astype(np.float32)


# -- statistics and spec ---------------------------------------------------------------
def test_band_stats_are_median_and_iqr_and_ignore_non_finite_pixels() -> None:
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(3, 5001)).astype(np.float32) * np.array([[1.0], [20.0], [0.1]], np.float32)
    with_nan = np.concatenate([vals, np.full((3, 7), np.nan, np.float32)], axis=1)
    stats = band_stats(with_nan, ["B02", "B03", "B04"])
    q25, q50, q75 = np.percentile(vals, [25, 50, 75], axis=1)
    np.testing.assert_allclose(stats.median, q50, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.scale, q75 - q25, rtol=1e-5)
    assert stats.n_pixels == 5001
    assert stats.select(["B04", "B02"]).median == (stats.median[2], stats.median[0])
    with pytest.raises(ModelError, match="B08"):
        stats.select(["B08"])


def test_band_stats_of_an_empty_population_are_neutral() -> None:
    stats = band_stats(np.full((2, 4), np.nan, np.float32), ["DEM", "SLOPE"])
    assert stats.n_pixels == 0 and stats.median == (0.0, 0.0) and stats.scale == (1.0, 1.0)


def test_scene_robust_must_be_resolved_before_use_and_resolves_to_fixed() -> None:
    assert validate_spec({"method": "scene_robust"}) == SCENE
    with pytest.raises(ModelError, match="unknown key"):
        validate_spec({"method": "scene_robust", "mean": [1.0]})
    x = np.ones((1, 2, 4, 4), np.float32)
    with pytest.raises(ModelError, match="needs the statistics"):
        normalize(x, None, SCENE)
    with pytest.raises(ModelError, match="needs the statistics"):
        resolve_spec(SCENE, None)
    stats = band_stats(np.array([[1, 2, 3, 4, 5], [10, 20, 30, 40, 50]], np.float32), ["B02", "B03"])
    spec = resolve_spec(SCENE, stats)
    assert spec == {"method": "fixed", "mean": [3.0, 30.0], "std": [2.0, 20.0], "clip": 10.0}
    assert resolve_spec({"method": "patch_robust"}, None) == {"method": "patch_robust", "clip": 10.0}


# -- patch sets as populations (training, evaluation) ----------------------------------
def _write_patches(root: Path, n: int, scale: np.ndarray, offset: np.ndarray, seed: int = 0) -> list[PatchRecord]:
    import h5py

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    records = []
    for i in range(n):
        img = rng.normal(size=(128, 128, 14)) + rng.normal(size=14) * 2  # patch-level offsets: absolute levels
        img = img * scale + offset
        mask = (rng.random((128, 128)) > 0.9).astype(np.uint8)
        with h5py.File(root / "img" / f"image_{i}.h5", "w") as f:
            f["img"] = img
        with h5py.File(root / "mask" / f"mask_{i}.h5", "w") as f:
            f["mask"] = mask
        records.append(PatchRecord(str(i), root / "img" / f"image_{i}.h5", root / "mask" / f"mask_{i}.h5"))
    return records


def test_patch_set_in_other_units_normalizes_identically(tmp_path: Path) -> None:
    """The issue's invariance: the same patches in different per-band scales give the same model input."""
    ones, zeros = np.ones(14, np.float32), np.zeros(14, np.float32)
    scale, offset = _scale_offset(14)
    a = PatchDataset(_write_patches(tmp_path / "a", 4, ones, zeros), CHANNELS, SCENE)
    b = PatchDataset(_write_patches(tmp_path / "b", 4, scale, offset), CHANNELS, SCENE)
    xa, _, _ = a.arrays()
    xb, _, _ = b.arrays()
    np.testing.assert_allclose(xb, xa, atol=2e-3)
    # and, unlike per-patch normalization, patches keep their level relative to the set
    assert np.ptp(xa.mean(axis=(2, 3)), axis=0).min() > 0.5
    assert a.stats is not None and a.stats.n_pixels == 4 * 128 * 128


def test_a_fold_is_normalized_with_the_statistics_of_the_whole_set(tmp_path: Path) -> None:
    ds = PatchDataset(_write_patches(tmp_path, 5, np.ones(14), np.zeros(14)), CHANNELS, SCENE)
    whole = ds.arrays()[0]
    sub = ds.subset([1, 3])
    assert sub.stats == ds.stats
    np.testing.assert_array_equal(sub.arrays()[0], whole[[1, 3]])
    # a set on its own is its own population
    alone = PatchDataset([ds.records[1], ds.records[3]], CHANNELS, SCENE)
    assert alone.stats != ds.stats and alone.stats.n_pixels == 2 * 128 * 128


# -- scene sampling ----------------------------------------------------------------------
@pytest.mark.parametrize(("h", "w"), [(10980, 10980), (5000, 12000), (700, 300), (256, 256)])
def test_sample_windows_cover_the_grid_on_chunk_boundaries(h: int, w: int) -> None:
    origins = sample_origins(h, w, windows=64, size=256)
    n_chunks = -(-h // 256) * -(-w // 256)
    assert len(set(origins)) == len(origins) <= 64
    assert all(r % 256 == 0 and c % 256 == 0 and 0 <= r < h and 0 <= c < w for r, c in origins)
    if n_chunks <= 64:
        assert len(origins) == n_chunks
    else:
        assert len(origins) >= 40
        rows, cols = {r for r, _ in origins}, {c for _, c in origins}
        # spread over the whole grid, not clustered in a corner
        assert min(rows) < h / 4 and max(rows) > 3 * h / 4 - 256
        assert min(cols) < w / 4 and max(cols) > 3 * w / 4 - 256


def _grid(h: int, w: int) -> Grid:
    return Grid(CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), w, h)


def _arrays(arr: np.ndarray, valid: np.ndarray) -> tuple[xr.DataArray, xr.DataArray]:
    data = xr.DataArray(da.from_array(arr, chunks=(-1, 256, 256)), dims=("band", "y", "x"),
                        coords={"band": CHANNELS})
    return data, xr.DataArray(da.from_array(valid, chunks=(256, 256)), dims=("y", "x"))


def test_sampled_statistics_are_close_to_the_whole_scene_and_fall_back_when_cloudy() -> None:
    rng = np.random.default_rng(2)
    h = w = 2048
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    arr = (rng.normal(size=(14, h, w)).astype(np.float32) + yy) * 100 + 1000
    valid = np.ones((h, w), bool)
    data, v = _arrays(arr, valid)
    with dask.config.set(scheduler="threads"):
        sampled = array_band_stats(data, v, windows=16)
    exact = band_stats(arr.reshape(14, -1), CHANNELS)
    assert sampled.n_pixels == 16 * 256 * 256 < exact.n_pixels / 2
    np.testing.assert_allclose(sampled.median, exact.median, rtol=0.01)
    np.testing.assert_allclose(sampled.scale, exact.scale, rtol=0.05)
    # a scene valid only in a strip no sample window touches: the whole scene is read, thinned
    strip = np.zeros((h, w), bool)
    strip[1800:2000, :] = True
    assert not any(r < 2000 and r + 256 > 1800 for r, _ in sample_origins(h, w, windows=16))
    data, v = _arrays(np.where(strip, arr, np.nan).astype(np.float32), strip)
    with dask.config.set(scheduler="threads"):
        thin = array_band_stats(data, v, windows=16)
    assert thin.n_pixels > 0
    exact_strip = band_stats(arr[:, 1800:2000, :].reshape(14, -1), CHANNELS)
    np.testing.assert_allclose(thin.median, exact_strip.median, rtol=0.02)


def test_scene_prediction_is_invariant_to_band_units() -> None:
    """A scene_robust model gives the same probabilities on reflectance x 10000 + offsets as on reflectance."""
    rng = np.random.default_rng(4)
    h, w = 300, 260
    arr = rng.random((14, h, w), dtype=np.float32)
    arr[:, 100:160, 80:150] += 0.8  # a bright scar
    valid = np.ones((h, w), bool)
    valid[:40, :50] = False
    arr[:, ~valid] = np.nan
    scale, offset = _scale_offset(14, seed=9)
    torch.manual_seed(3)
    module = build_model("PlainUnet", None, 14, base_channels=4, depth=2).eval()
    art = ModelArtefact("PlainUnet", None, CHANNELS, normalization=dict(SCENE), tile_size=64, module=module)
    outs = []
    for a in (arr, arr * scale[:, None, None] + offset[:, None, None]):
        data, v = _arrays(a.astype(np.float32), valid)
        with dask.config.set(scheduler="threads"):
            outs.append(np.asarray(predict(data, v, _grid(h, w), [art], InferenceOptions(overlap=16)).probability))
    assert np.isfinite(outs[0][valid]).all() and np.isnan(outs[0][~valid]).all()
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-3)
    # the scene statistics matter: other statistics give other probabilities
    other = band_stats(rng.random((14, 1000), dtype=np.float32), CHANNELS)
    data, v = _arrays(arr, valid)
    with dask.config.set(scheduler="threads"):
        shifted = np.asarray(predict(data, v, _grid(h, w), [art], InferenceOptions(overlap=16),
                                     scene_stats=other).probability)
    assert np.nanmax(np.abs(shifted - outs[0])) > 1e-3


def test_scene_statistics_of_a_real_product_read_only_the_sample(tmp_path: Path) -> None:
    """On a demo L2A product: the sample covers a small scene whole and equals the full-stack statistics;
    a coarser lattice reads fewer pixels and stays close."""
    from pipeline.config import load_scene_config
    from pipeline.demo import write_demo_data
    from pipeline.scenestats import scene_band_stats
    from pipeline.stack import stack_scene

    paths = write_demo_data(tmp_path / "demo", size=300, seed=3)
    cfg = load_scene_config(paths.scene_yaml)
    channels = ["B02", "B04", "B08", "B11", "SLOPE", "DEM"]
    with dask.config.set(scheduler="threads"):
        stack = stack_scene(cfg, channels)
        data, valid = dask.compute(stack.data.data, stack.valid.data)
        whole = band_stats(data[:, valid], channels)
        sampled = scene_band_stats(cfg, channels)  # 300 px: 4 chunks of 256 px, so the whole scene
        coarse = scene_band_stats(cfg, channels, windows=4, size=128, min_pixels=1000)
        # too few valid pixels in 4 windows of 128 px for the default minimum: the whole scene is read
        fallback = scene_band_stats(cfg, channels, windows=4, size=128)
    assert 0 < whole.n_pixels < 300 * 300  # clouds and their buffer are excluded
    # the same pixels, read in the same blocks as the run's stack (not in 256 px windows): the same values
    assert sampled.n_pixels == whole.n_pixels
    np.testing.assert_array_equal(sampled.median, whole.median)
    np.testing.assert_array_equal(sampled.scale, whole.scale)
    assert coarse.n_pixels < whole.n_pixels / 2
    assert fallback.n_pixels == whole.n_pixels
    np.testing.assert_allclose(coarse.median, whole.median, rtol=0.25)


def test_the_sample_is_read_on_the_threads_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a local cluster starts, the run samples on one core fewer than the machine has (the
    workers' imports get the other): the same pixels on any number of threads."""
    from pipeline import scenestats

    rng = np.random.default_rng(5)
    arr = rng.normal(size=(14, 512, 768)).astype(np.float32)
    valid = rng.random((512, 768)) < 0.8
    data, v = _arrays(arr, valid)
    origins = sample_origins(512, 768, windows=4)
    seen: list[tuple[object, object]] = []
    real = dask.compute

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((kwargs.get("scheduler"), kwargs.get("num_workers")))
        return real(*args, **kwargs)

    monkeypatch.setattr(dask, "compute", spy)
    one = scenestats._sample(data.data, v.data, origins, 256, 1, "threads", 1)
    default = scenestats._sample(data.data, v.data, origins, 256, 1, "threads")
    assert seen == [("threads", 1), ("threads", None)]
    np.testing.assert_array_equal(one, default)
    assert one.shape == (14, sum(int(valid[r:r + 256, c:c + 256].sum()) for r, c in origins))


def test_numpy_input_is_normalized_while_pytorch_is_half_way_through_its_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's first block normalizes its pixels while another thread may still be importing
    PyTorch: ``sys.modules["torch"]`` is then a module without ``Tensor`` yet, and numpy input is
    normalized as numpy (it used to raise AttributeError); tensors still go the PyTorch way."""
    import sys
    import types

    spec = {"method": "fixed", "mean": [1.0, 2.0], "std": [2.0, 4.0], "clip": None}
    x = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3)
    expected = normalize(x, None, spec)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # partially initialized
    got = normalize(x, None, spec)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, expected)
    monkeypatch.setitem(sys.modules, "torch", torch)
    as_tensor = normalize(torch.from_numpy(x), None, spec)
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), expected, rtol=1e-6)
