"""Normalization: fixed statistics in physical units, independent of what else is in a scene."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

from pipeline.core.errors import ModelError
from pipeline.core.grid import Grid
from pipeline.inference.options import InferenceOptions
from pipeline.inference.tiled import predict
from pipeline.model.artefact import ModelArtefact, read_metadata, save_artefact
from pipeline.model.normalization import band_stats, fixed_spec, normalize, validate_spec
from pipeline.model.registry import build_model
from pipeline.training.datasets import PatchDataset
from pipeline.training.patch_files import find_patches

CHANNELS = ["B02", "B03", "B04", "B08", "SLOPE"]
ROOT = Path(__file__).resolve().parents[1]


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
    spec = fixed_spec(stats, clip=10.0, source="test")
    assert spec["mean"] == list(stats.median) and spec["std"] == list(stats.scale) and spec["source"] == "test"


def test_band_stats_of_an_empty_population_are_neutral() -> None:
    stats = band_stats(np.full((2, 4), np.nan, np.float32), ["DEM", "SLOPE"])
    assert stats.n_pixels == 0 and stats.median == (0.0, 0.0) and stats.scale == (1.0, 1.0)


@pytest.mark.parametrize("method", ["scene_robust", "patch_robust"])
def test_content_dependent_methods_are_refused_with_how_to_retrain(method: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="retrain") as err:
        validate_spec({"method": method, "clip": 10.0})
    assert "python -m pipeline train" in str(err.value)
    # an old artefact that uses one is refused when loaded, naming the file
    module = build_model("PlainUnet", None, 2, base_channels=4, depth=2)
    path = tmp_path / "old.safetensors"
    save_artefact(path, module, ModelArtefact("PlainUnet", None, ["B02", "B03"], tile_size=32,
                                              arch_kwargs={"base_channels": 4, "depth": 2}))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as fh:
        header = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    meta = json.loads(header["metadata"])
    meta["normalization"] = {"method": method, "clip": 10.0}
    save_file(tensors, str(path), metadata={**header, "metadata": json.dumps(meta)})
    with pytest.raises(ModelError, match=f"{path.name}.*retrain"):
        read_metadata(path)


def test_a_training_spec_may_leave_its_statistics_to_the_patches_but_an_artefact_may_not() -> None:
    assert validate_spec({"method": "fixed"}, resolved=False) == {"method": "fixed"}
    with pytest.raises(ModelError, match="required"):
        validate_spec({"method": "fixed"})
    with pytest.raises(ModelError, match="std given without mean"):
        validate_spec({"method": "fixed", "std": [1.0]}, resolved=False)
    with pytest.raises(ModelError, match="2 values given but the model has 3"):
        validate_spec({"method": "fixed", "mean": [0, 0], "std": [1, 1]}, n_channels=3)


# -- the same pixel gives the same probability whatever surrounds it ---------------------
def _grid(h: int, w: int) -> Grid:
    return Grid(CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), w, h)


def _predict(arr: np.ndarray, valid: np.ndarray, art: ModelArtefact) -> np.ndarray:
    h, w = arr.shape[1:]
    data = xr.DataArray(da.from_array(arr, chunks=(-1, 256, 256)), dims=("band", "y", "x"),
                        coords={"band": CHANNELS})
    v = xr.DataArray(da.from_array(valid, chunks=(256, 256)), dims=("y", "x"))
    with dask.config.set(scheduler="threads"):
        return np.asarray(predict(data, v, _grid(h, w), [art], InferenceOptions(device="cpu", overlap=16)).probability)


def _hillside(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Vegetated slopes (reflectance, degrees) with two bright bare scars."""
    arr = np.empty((5, h, w), np.float32)
    arr[:4] = np.array([0.04, 0.06, 0.04, 0.30], np.float32)[:, None, None]
    arr[:4] += rng.normal(0, 0.01, (4, h, w)).astype(np.float32)
    arr[4] = rng.uniform(15, 40, (h, w))
    for r, c in ((30, 40), (120, 100)):
        arr[:4, r:r + 25, c:c + 20] = np.array([0.14, 0.15, 0.17, 0.24], np.float32)[:, None, None]
    return arr


@pytest.mark.parametrize("surroundings", ["sea", "cloud", "snow", "farmland", "landslides"])
def test_probabilities_of_an_area_do_not_depend_on_the_rest_of_the_scene(surroundings: str) -> None:
    """The area alone, and the area inside a larger scene that is mostly something else: the same
    probabilities (float tolerance) away from the area's edges by one window."""
    rng = np.random.default_rng(1)
    h = w = 192
    area = _hillside(rng, h, w)
    big_h, big_w = 576, 512
    fill = {"sea": [0.05, 0.04, 0.02, 0.01, 0.0], "cloud": [0.6, 0.6, 0.6, 0.65, 5.0],
            "snow": [0.9, 0.9, 0.88, 0.8, 20.0], "farmland": [0.05, 0.08, 0.06, 0.4, 1.0],
            "landslides": [0.14, 0.15, 0.17, 0.24, 35.0]}[surroundings]
    big = np.broadcast_to(np.asarray(fill, np.float32)[:, None, None], (5, big_h, big_w)).copy()
    big += rng.normal(0, 0.01, big.shape).astype(np.float32)
    r0, c0 = 192, 224  # multiples of the window stride (64 - 16): the same windows cover the area
    big[:, r0:r0 + h, c0:c0 + w] = area
    torch.manual_seed(3)
    module = build_model("PlainUnet", None, 5, base_channels=4, depth=2).eval()
    spec = {"method": "fixed", "mean": [0.05, 0.07, 0.05, 0.3, 25.0], "std": [0.05, 0.05, 0.06, 0.1, 10.0],
            "clip": 10.0}
    art = ModelArtefact("PlainUnet", None, CHANNELS, normalization=spec, tile_size=64, module=module)
    alone = _predict(area, np.ones((h, w), bool), art)
    inside = _predict(big, np.ones((big_h, big_w), bool), art)[r0:r0 + h, c0:c0 + w]
    m = 64
    np.testing.assert_allclose(inside[m:-m, m:-m], alone[m:-m, m:-m], atol=1e-5)
    # and the comparison has teeth: a model sees the scars (the probabilities vary over the area)
    assert np.ptp(alone[m:-m, m:-m]) > 1e-3


# -- the statistics are the training patches', in physical units -----------------------
def test_training_patches_supply_the_statistics_and_a_fold_uses_its_own(shared_data: Path) -> None:
    records = find_patches(shared_data / "l4s" / "train", require_masks=True)
    channels = ["B02", "B04", "B08", "SLOPE", "DEM"]
    ds = PatchDataset(records, channels, {"method": "fixed", "clip": 10.0})
    pixels = np.concatenate([ds.raw(i).image.reshape(5, -1) for i in range(len(ds))], axis=1)
    q25, q50, q75 = np.percentile(pixels, [25, 50, 75], axis=1)
    np.testing.assert_allclose(ds.normalization["mean"], q50, rtol=1e-6)
    np.testing.assert_allclose(ds.normalization["std"], q75 - q25, rtol=1e-5)
    assert "15 training patches" in ds.normalization["source"]
    # physical units: reflectance around 0.05-0.3, slope in degrees, elevation in metres
    assert 0.01 < q50[0] < 0.2 and 0.1 < q50[2] < 0.5 and 10 < q50[3] < 60 and 500 < q50[4] < 5000
    fold = ds.subset(range(10), normalization={"method": "fixed"})
    assert fold.normalization["mean"] != ds.normalization["mean"]
    held = ds.subset(range(10, 15), normalization=fold.normalization)
    assert held.normalization == fold.normalization


@pytest.mark.parametrize("name", ["default", "rgb_terrain"])
def test_shipped_artefacts_carry_the_training_statistics(shared_data: Path, name: str) -> None:
    """The statistics in each shipped artefact are the median and IQR of its training patches (the
    shared 15), in physical units, recomputed here from the patches, never from a scene."""
    art = read_metadata(ROOT / "pipeline" / "models" / f"{name}.safetensors")
    spec = art.normalization
    assert spec["method"] == "fixed" and "training patches" in spec["source"]
    records = find_patches(shared_data / "l4s" / "train", require_masks=True)
    ds = PatchDataset(records, art.channels, {"method": "fixed", "clip": spec.get("clip")})
    np.testing.assert_allclose(spec["mean"], ds.normalization["mean"], rtol=1e-6)
    np.testing.assert_allclose(spec["std"], ds.normalization["std"], rtol=1e-6)


def test_numpy_input_is_normalized_while_pytorch_is_half_way_through_its_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's first block normalizes its pixels while another thread may still be importing
    PyTorch: ``sys.modules["torch"]`` is then a module without ``Tensor`` yet, and numpy input is
    normalized as numpy; tensors still go the PyTorch way."""
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
