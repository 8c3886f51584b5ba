"""Processing levels: L2A scenes brought back to the radiometry of the L1C training patches."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

from pipeline.core.grid import Grid
from pipeline.inference.options import InferenceOptions
from pipeline.inference.tiled import predict
from pipeline.model.artefact import ModelArtefact
from pipeline.model.normalization import add_level, level_spec, normalize
from pipeline.model.registry import build_model
from pipeline.run.summary import processing_level
from pipeline.training.augmentation import RadiometricConfig, radiometric, surface_look

CHANNELS = ["B02", "B03", "B04", "B08", "SLOPE"]
PATH = np.array([0.05, 0.03, 0.016, 0.0, 0.0], np.float32)
CFG = RadiometricConfig(p=1.0, spread=0.5, nir_gain=0.08)
SPEC = {"method": "fixed", "mean": [0.07, 0.06, 0.04, 0.2, 30.0], "std": [0.03, 0.03, 0.03, 0.09, 14.0],
        "clip": 10.0}


def _scene(rng: np.random.Generator, h: int = 160, w: int = 150) -> np.ndarray:
    arr = np.empty((5, h, w), np.float32)
    arr[:4] = rng.uniform(0.03, 0.3, (4, h, w))
    arr[4] = rng.uniform(0, 50, (h, w))
    arr[:4, 40:80, 30:70] += 0.1
    return arr


def test_surface_look_darkens_the_visible_brightens_the_infrared_and_leaves_terrain() -> None:
    x = _scene(np.random.default_rng(0))
    look = surface_look(x, CHANNELS, CFG, PATH, 1.0)
    np.testing.assert_allclose(look[:3], x[:3] - PATH[:3, None, None], atol=1e-6)
    np.testing.assert_allclose(look[3], x[3] * 1.08, rtol=1e-6)
    np.testing.assert_array_equal(look[4], x[4])
    np.testing.assert_array_equal(surface_look(x, CHANNELS, CFG, PATH, 0.0), x)


def test_training_draws_atmospheres_within_the_spread() -> None:
    x = np.full((5, 4, 4), 0.1, np.float32)
    shifts = [0.1 - radiometric(x, CHANNELS, CFG, PATH, np.random.default_rng(i))[0, 0, 0] for i in range(200)]
    u = np.array(shifts) / PATH[0]
    assert u.min() >= -0.5 - 1e-4 and u.max() <= 0.5 + 1e-4 and u.min() < -0.3 and u.max() > 0.3


def test_l2a_statistics_normalize_a_surface_look_as_the_l1c_statistics_normalize_the_scene() -> None:
    x = _scene(np.random.default_rng(1))[None]
    spec = add_level(SPEC, "L2A", PATH, [1.0, 1.0, 1.0, 1.08, 1.0])
    l1c = normalize(x, None, level_spec(spec, "L1C"))
    l2a = normalize(surface_look(x[0], CHANNELS, CFG, PATH, 1.0)[None], None, level_spec(spec, "L2A"))
    np.testing.assert_allclose(l2a, l1c, atol=1e-4)
    assert level_spec(spec, None) == level_spec(spec, "L1C") and "levels" not in level_spec(spec, "L2A")
    # without the level's statistics the surface look is something else to the model
    raw = normalize(surface_look(x[0], CHANNELS, CFG, PATH, 1.0)[None], None, level_spec(spec, None))
    assert np.abs(raw - l1c).max() > 1.0


def _grid(h: int, w: int) -> Grid:
    return Grid(CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), w, h)


def _predict(arr: np.ndarray, art: ModelArtefact, level: str | None) -> np.ndarray:
    data = xr.DataArray(da.from_array(arr, chunks=(-1, 128, 128)), dims=("band", "y", "x"), coords={"band": CHANNELS})
    with dask.config.set(scheduler="threads"):
        pred = predict(data, None, _grid(*arr.shape[1:]), [art], InferenceOptions(device="cpu", overlap=16), level=level)
        return np.asarray(pred.probability)


def test_an_l2a_scene_gets_the_probabilities_of_its_l1c_twin() -> None:
    x = _scene(np.random.default_rng(2))
    torch.manual_seed(0)
    module = build_model("PlainUnet", None, 5, base_channels=4, depth=2).eval()
    spec = add_level(SPEC, "L2A", PATH, [1.0, 1.0, 1.0, 1.08, 1.0])
    art = ModelArtefact("PlainUnet", None, CHANNELS, normalization=spec, levels=["L1C", "L2A"], tile_size=64,
                        module=module)
    l1c = _predict(x, art, "L1C")
    look = surface_look(x, CHANNELS, CFG, PATH, 1.0)
    np.testing.assert_allclose(_predict(look, art, "L2A"), l1c, atol=2e-4)
    assert np.abs(_predict(look, art, None) - l1c).max() > 1e-3  # the level matters


def test_the_scene_level_is_checked_against_the_models() -> None:
    both = SimpleNamespace(name="both", architecture="PlainUnet", levels=["L1C", "L2A"])
    l1c_only = SimpleNamespace(name="old", architecture="PlainUnet", levels=["L1C"])
    info = processing_level([both], "S2_L2A", None)
    assert info == {"scene": "L2A", "source": "product metadata", "models": {"both": ["L1C", "L2A"]},
                    "served": True, "unserved": []}
    info = processing_level([both, l1c_only], "bands", "L2A")
    assert info["source"] == "scene.level" and not info["served"] and info["unserved"] == ["old"]
    info = processing_level([both], "bands", None)
    assert info["scene"] is None and not info["served"]


def test_a_scene_config_declares_its_level_and_reference(tmp_path: Path) -> None:
    from pipeline.core.config import load_scene_config
    from pipeline.core.errors import ConfigError

    (tmp_path / "b.tif").write_bytes(b"")
    text = "scene:\n  bands: {B02: b.tif}\n  level: {level}\ndem:\n  path: b.tif\nreference:\n  path: r.gpkg\n"
    cfg = load_scene_config(_write(tmp_path / "ok.yaml", text.replace("{level}", "L2A")))
    assert cfg.scene.level == "L2A" and cfg.reference is not None and cfg.reference.iou == 0.1
    assert cfg.reference.path == tmp_path / "r.gpkg"
    with pytest.raises(ConfigError, match="scene.level"):
        load_scene_config(_write(tmp_path / "bad.yaml", text.replace("{level}", "L3")))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_model_serves_l2a_only_with_the_path_reflectance_of_its_patches(shared_data: Path) -> None:
    from pipeline.core.errors import ConfigError
    from pipeline.training.config import TrainConfig
    from pipeline.training.datasets import make_dataset, serving_normalization
    from pipeline.training.patch_files import find_patches

    records = find_patches(shared_data / "l4s" / "train", require_masks=True)[:4]
    base = {"data": {"root": str(shared_data / "l4s" / "train")}, "output": {"artefact": "/tmp/unused.safetensors"},
            "model": {"architecture": "PlainUnet", "encoder": None, "channels": ["B02", "B03", "B04"],
                      "levels": ["L1C", "L2A"]}}
    cfg = TrainConfig.model_validate(base)
    spec = serving_normalization(cfg, make_dataset(cfg, records))
    path = np.percentile(np.concatenate([make_dataset(cfg, records).raw(i).image.reshape(3, -1)
                                         for i in range(4)], axis=1), 1.0, axis=1)
    np.testing.assert_allclose(np.subtract(spec["mean"], spec["levels"]["L2A"]["mean"]), path, rtol=1e-5)
    given = {**base, "model": {**base["model"], "normalization": {"method": "fixed", "mean": [0.1] * 3,
                                                                   "std": [0.1] * 3}}}
    cfg = TrainConfig.model_validate(given)
    with pytest.raises(ConfigError, match="L2A"):
        serving_normalization(cfg, make_dataset(cfg, records))
