"""The shipped model artefacts: format, channels, size, and useful predictions on real patches.

The F1 floors below are the models' fit on the 15 labelled Landslide4Sense
patches they were trained on (each artefact's metadata: metrics.train_fit),
less a margin for floating-point differences between platforms. They check
that "the shipped weights are the trained ones and are wired up correctly"
(a random or mis-normalized model scores far below them, as does predicting
landslide everywhere), not test scores; the cross-validated scores are in
the metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.channels import L4S_CHANNELS
from pipeline.model.artefact import load_artefact, read_metadata
from pipeline.model.normalization import level_spec
from pipeline.training.augmentation import Augmentation, RadiometricConfig, surface_look
from pipeline.training.datasets import PatchDataset, normalize_patch
from pipeline.training.evaluate import artefact_probabilities
from pipeline.training.metrics import pixel_metrics
from pipeline.training.patch_files import find_patches
from pipeline.training.predict import predict_probabilities

MODELS = Path(__file__).resolve().parents[1] / "pipeline" / "models"
#: Landslide4Sense order without B10: L2A products have no B10, and the default model must run on them.
L4S_WITHOUT_B10 = [c for c in L4S_CHANNELS if c != "B10"]
SHIPPED = {
    "default.safetensors": (L4S_WITHOUT_B10, 0.67),
    "rgb_terrain.safetensors": (["B02", "B03", "B04", "SLOPE", "DEM"], 0.68),
}
MARGIN = 0.05


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_artefact_is_small_and_documented(name: str) -> None:
    path = MODELS / name
    assert path.stat().st_size <= 15 * 1024 * 1024
    meta = read_metadata(path)
    assert meta.channels == SHIPPED[name][0]
    assert meta.normalization["method"] == "fixed" and "15 training patches" in meta.normalization["source"]
    assert meta.levels == ["L1C", "L2A"]
    stats = meta.training["data"]["statistics"]
    assert 0 < stats["n_pixels"] <= 15 * 128 * 128 and sorted(stats["median"]) == sorted(meta.channels)
    assert [stats["median"][c] for c in meta.channels] == meta.normalization["mean"]
    assert 0 < meta.threshold < 1
    cv = meta.metrics["cv"]
    assert cv["patches"] == 15 and len(cv["folds"]) == 5
    assert 0 < cv["micro"]["f1"] <= 1
    assert "15 Landslide4Sense patches" in meta.metrics["caveat"]
    assert len(meta.training["data"]["checksum_sha256"]) == 64


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_predicts_the_training_patches(name: str, shared_data: Path) -> None:
    art = load_artefact(MODELS / name)
    records = find_patches(shared_data / "l4s" / "train", require_masks=True)
    prob, y, v = artefact_probabilities(art, records)
    m = pixel_metrics(prob, y, v, art.threshold)["micro"]
    floor = SHIPPED[name][1]
    assert m["f1"] >= floor - MARGIN, m
    assert m["f1"] == pytest.approx(art.metrics["train_fit"]["f1"], abs=0.02)
    positives = y.sum()
    trivial = 2 * positives / (positives + y.size)
    assert m["f1"] > 4 * trivial


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_serves_surface_reflectance(name: str, shared_data: Path) -> None:
    """The patches given the look of an L2A product (the typical path reflectance of the training patches
    removed, the infrared brightened) and normalized with the artefact's L2A statistics get the L1C
    patches' inputs back; with an atmosphere half or 1.5 times as thick as the typical one they are
    mapped nearly as well, at the same threshold (docs/model-card.md has the cross-validated figures)."""
    art = load_artefact(MODELS / name)
    records = find_patches(shared_data / "l4s" / "train", require_masks=True)
    cfg = RadiometricConfig(**art.training["config"]["radiometric"])
    ds = PatchDataset(records, art.channels, {"method": "fixed"}, Augmentation(radiometric=cfg))
    l1c, y, v = ds.arrays()
    l2a_spec = level_spec(art.normalization, "L2A")

    def look(u: float) -> np.ndarray:
        return np.stack([normalize_patch(surface_look(ds.raw(i).image, ds.channels, cfg, ds.path, u),
                                         ds.raw(i).valid, l2a_spec) for i in range(len(ds))])

    np.testing.assert_allclose(look(1.0), l1c, atol=1e-3)
    f1 = {u: pixel_metrics(predict_probabilities(art.module, x), y, v, art.threshold)["micro"]["f1"]
          for u, x in ((0.0, l1c), (0.5, look(0.5)), (1.5, look(1.5)))}
    assert min(f1[0.5], f1[1.5]) >= f1[0.0] - 0.2, f1
    # unharmonized, the surface look is another input: the L2A statistics are what makes it work
    raw = np.stack([normalize_patch(surface_look(ds.raw(i).image, ds.channels, cfg, ds.path, 1.0),
                                    ds.raw(i).valid, art.normalization) for i in range(len(ds))])
    assert np.abs(raw - l1c).max() > 1.0


def test_unlabelled_patches_give_sane_probabilities(shared_data: Path) -> None:
    art = load_artefact(MODELS / "default.safetensors")
    records = find_patches(shared_data / "l4s" / "unlabeled")
    ds = PatchDataset(records, art.channels, art.normalization, require_masks=False)
    x, _, _ = ds.arrays()
    prob = predict_probabilities(art.module, x)
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
    share = (prob >= art.threshold).mean()
    assert 0.0 < share < 0.5  # some landslide pixels, far from everything
