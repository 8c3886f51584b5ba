"""The shipped model artefacts: format, channels, size, and useful predictions on real patches.

The F1 floors below were measured on the 15 labelled Landslide4Sense patches
the models were trained on (see each artefact's metadata: metrics.train_fit),
minus a margin for platform differences in floating point. They are sanity
floors for "the shipped weights are the trained ones and are wired up
correctly" (a random or mis-normalized model scores far below them: an
all-landslide prediction gives F1 ~0.07 on these patches), not test scores;
the cross-validated scores are in the metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.artefact import load_artefact, read_metadata
from pipeline.channels import L4S_CHANNELS
from pipeline.datasets import PatchDataset, find_patches
from pipeline.evaluate import artefact_probabilities
from pipeline.metrics import pixel_metrics
from pipeline.normalization import normalize_population
from pipeline.train import predict_probabilities

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
    assert meta.normalization["method"] == "scene_robust"
    stats = meta.training["data"]["population_stats"]
    assert 0 < stats["n_pixels"] <= 15 * 128 * 128 and sorted(stats["median"]) == sorted(meta.channels)
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
def test_prediction_does_not_depend_on_per_band_units(name: str, shared_data: Path) -> None:
    """The same patches in other per-band scales and offsets (as reflectance, degrees, metres) give the same map."""
    art = load_artefact(MODELS / name)
    records = find_patches(shared_data / "l4s" / "train")[:6]
    ds = PatchDataset(records, art.channels, art.normalization)
    raw = np.stack([ds.raw(i).image for i in range(len(ds))])
    valid = np.ones((raw.shape[0],) + raw.shape[2:], bool)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.05, 400.0, size=raw.shape[1]).astype(np.float32)[None, :, None, None]
    offset = rng.uniform(-50.0, 50.0, size=raw.shape[1]).astype(np.float32)[None, :, None, None]
    base = predict_probabilities(art.module, normalize_population(raw, valid, art.normalization))
    other = predict_probabilities(art.module, normalize_population(raw * scale + offset, valid, art.normalization))
    assert np.abs(base - other).max() < 2e-3
    assert ((base >= art.threshold) == (other >= art.threshold)).mean() > 0.999
    # without the normalization the model would see different inputs: the check is not vacuous
    assert np.abs(raw * scale + offset - raw).max() > 1.0


def test_unlabelled_patches_give_sane_probabilities(shared_data: Path) -> None:
    art = load_artefact(MODELS / "default.safetensors")
    records = find_patches(shared_data / "l4s" / "unlabeled")
    ds = PatchDataset(records, art.channels, art.normalization, require_masks=False)
    x, _, _ = ds.arrays()
    prob = predict_probabilities(art.module, x)
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
    share = (prob >= art.threshold).mean()
    assert 0.0 < share < 0.5  # some landslide pixels, far from everything
