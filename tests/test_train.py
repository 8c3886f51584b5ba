"""Training config, k-fold protocol, reproducibility and artefact metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.core.errors import ConfigError
from pipeline.model.artefact import load_artefact
from pipeline.training.config import TrainConfig, load_train_config
from pipeline.training.datasets import PatchDataset
from pipeline.training.folds import kfold_indices
from pipeline.training.optimizer import build_optimizer, epoch_scheduler
from pipeline.training.patch_files import data_checksum, find_patches
from pipeline.training.thresholds import share_threshold
from pipeline.training.train import train

PATCH_IDS = ("1", "28", "461", "512")


def _four_patches(shared_data: Path, root: Path, split_dir: str | None = None, ids: tuple[str, ...] = PATCH_IDS) -> Path:
    """Link four real patches into ``root`` (flat, or ``root/split_dir``)."""
    src = shared_data / "l4s" / "train"
    base = root / split_dir if split_dir else root
    for sub, prefix in (("img", "image"), ("mask", "mask")):
        (base / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            (base / sub / f"{prefix}_{i}.h5").symlink_to(src / sub / f"{prefix}_{i}.h5")
    return root


def _yaml(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


TINY = """
data:
  root: {root}
  {extra_data}
model:
  architecture: PlainUnet
  encoder: null
  options: {{base_channels: 4, depth: 2}}
  channels: [B02, B03, B04, B08, SLOPE, DEM]
epochs: 2
batch_size: 2
cv: {{folds: 2}}
seed: {seed}
augment: {{noise_std: 0.05}}
output:
  artefact: {out}
"""


def _tiny(tmp_path: Path, name: str, root: Path, seed: int = 7, extra_data: str = "") -> TrainConfig:
    cfg_path = _yaml(tmp_path / f"{name}.yaml", TINY.format(root=root, out=f"out/{name}.safetensors", seed=seed,
                                                            extra_data=extra_data))
    return load_train_config(cfg_path)


def test_config_paths_are_relative_to_the_yaml_file(tmp_path: Path) -> None:
    cfg = load_train_config(_yaml(tmp_path / "t.yaml", "data: {root: patches}\noutput: {artefact: m.safetensors}\n"))
    assert cfg.data.root == tmp_path / "patches"
    assert cfg.output.artefact == tmp_path / "m.safetensors"
    # the default: fixed statistics, left to the training patches; a model serving L1C scenes
    assert cfg.model.normalization == {"method": "fixed", "clip": 10.0}
    assert cfg.model.levels == ["L1C"] and cfg.radiometric.p == 0


def test_config_refuses_retired_normalizations_and_unknown_levels(tmp_path: Path) -> None:
    head = "data: {root: p}\noutput: {artefact: m.safetensors}\n"
    with pytest.raises(ConfigError, match="model.normalization.*retrain"):
        load_train_config(_yaml(tmp_path / "t1.yaml", head + "model: {normalization: {method: scene_robust}}\n"))
    with pytest.raises(ConfigError, match="model.normalization.*unknown key"):
        load_train_config(_yaml(tmp_path / "t2.yaml", head + "model: {normalization: {method: fixed, scale: 2}}\n"))
    cfg = load_train_config(_yaml(tmp_path / "t4.yaml", head + "model: {levels: [L1C, L2A]}\nradiometric: {p: 0.5}\n"))
    assert cfg.model.levels == ["L1C", "L2A"] and cfg.radiometric.p == 0.5
    with pytest.raises(ConfigError, match="model.levels"):
        load_train_config(_yaml(tmp_path / "t5.yaml", head + "model: {levels: [L3]}\n"))
    # given statistics are kept as they are
    cfg = load_train_config(_yaml(tmp_path / "t6.yaml", head + "model: {channels: [B02, DEM], normalization: "
                                  "{method: fixed, mean: [0.1, 900], std: [0.05, 400]}}\n"))
    assert cfg.model.normalization == {"method": "fixed", "mean": [0.1, 900.0], "std": [0.05, 400.0]}


def test_config_refuses_unknown_keys_duplicates_and_bad_channels(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"t1.yaml:3: optimizer.lrate: unknown key"):
        load_train_config(_yaml(tmp_path / "t1.yaml", "data: {root: p}\noutput: {artefact: m.safetensors}\n"
                                                      "optimizer: {lrate: 0.1}\n"))
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_train_config(_yaml(tmp_path / "t2.yaml", "epochs: 1\nepochs: 2\n"))
    with pytest.raises(ConfigError, match="model.channels"):
        load_train_config(_yaml(tmp_path / "t3.yaml", "data: {root: p}\noutput: {artefact: m.safetensors}\n"
                                                      "model: {channels: [B02, B99]}\n"))
    with pytest.raises(ConfigError, match="loss.name"):
        load_train_config(_yaml(tmp_path / "t4.yaml", "data: {root: p}\noutput: {artefact: m.safetensors}\n"
                                                      "loss: {name: hinge}\n"))


def test_folds_partition_the_patches_and_spread_landslides() -> None:
    fractions = [0.0, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.0, 0.04]
    folds = kfold_indices(fractions, 5, seed=3)
    assert sorted(i for f in folds for i in f) == list(range(10))
    assert all(len(f) == 2 for f in folds)
    # stratified: the two richest patches never share a fold
    assert not any({6, 7} <= set(f) for f in folds)
    assert folds == kfold_indices(fractions, 5, seed=3)
    with pytest.raises(ConfigError, match="folds"):
        kfold_indices([0.1, 0.2], 3, 0)


def _epoch_rates(optimizer: dict[str, float | str], epochs: int, run: int | None = None) -> list[float]:
    """The learning rate of each epoch of a run under ``optimizer`` (the config section)."""
    import torch

    cfg = TrainConfig.model_validate({"data": {"root": "x"}, "output": {"artefact": "m.safetensors"},
                                      "optimizer": optimizer})
    opt = build_optimizer(cfg.optimizer, torch.nn.Linear(1, 1))
    scheduler = epoch_scheduler(cfg.optimizer, opt, epochs)
    rates = []
    for _ in range(epochs if run is None else run):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return rates


def test_cosine_schedule_with_warmup() -> None:
    rates = _epoch_rates({"lr": 1e-3, "min_lr": 0.0, "warmup_epochs": 2, "schedule": "cosine"}, 12, run=13)
    assert rates[0] == pytest.approx(5e-4)
    assert rates[2] == pytest.approx(1e-3)
    assert rates[7] == pytest.approx(5e-4)
    assert rates[12] == pytest.approx(0.0, abs=1e-12)
    # a shorter run (the final model) follows the same trajectory
    assert _epoch_rates({"lr": 1e-3, "min_lr": 0.0, "warmup_epochs": 2}, 12, run=5) == rates[:5]


def test_step_and_constant_schedules() -> None:
    step = _epoch_rates({"lr": 1e-3, "warmup_epochs": 1, "schedule": "step", "step_size": 2, "gamma": 0.5}, 6)
    assert step == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    assert _epoch_rates({"lr": 1e-3, "warmup_epochs": 2, "schedule": "none"}, 4) == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    assert _epoch_rates({"lr": 1e-3, "schedule": "plateau", "warmup_epochs": 2}, 3) == [1e-3] * 3


def test_two_epoch_cv_run_is_reproducible_and_fills_the_metadata(shared_data: Path, tmp_path: Path) -> None:
    root = _four_patches(shared_data, tmp_path / "patches")
    a = train(_tiny(tmp_path, "a", root))
    b = train(_tiny(tmp_path, "b", root))
    c = train(_tiny(tmp_path, "c", root, seed=8))
    wa, wb, wc = (load_file(str(r.artefact)) for r in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert any(not np.array_equal(wa[k], wc[k]) for k in wa if wa[k].dtype.kind == "f")
    assert a.metrics["cv"]["micro"] == b.metrics["cv"]["micro"]

    art = load_artefact(a.artefact)
    assert art.channels == ["B02", "B03", "B04", "B08", "SLOPE", "DEM"]
    # the normalization is fixed: the median and IQR of the training patches, in physical units
    norm = art.normalization
    assert norm["method"] == "fixed" and norm["clip"] == 10.0 and len(norm["mean"]) == len(norm["std"]) == 6
    assert "4 training patches" in norm["source"] and art.training["data"]["checksum_sha256"] in norm["source"]
    expected = PatchDataset(find_patches(root), art.channels, {"method": "fixed", "clip": 10.0}).normalization
    np.testing.assert_allclose(norm["mean"], expected["mean"], rtol=1e-6)
    np.testing.assert_allclose(norm["std"], expected["std"], rtol=1e-6)
    assert 0 < norm["mean"][0] < 1 and norm["mean"][-1] > 100  # B02 reflectance, DEM metres
    stats = art.training["data"]["statistics"]
    assert stats["n_pixels"] == 4 * 128 * 128 and stats["median"]["DEM"] == pytest.approx(norm["mean"][-1])
    assert "population_stats" not in art.training["data"]
    assert art.levels == ["L1C"] and "levels" not in norm  # an L1C model carries no L2A statistics
    policy = art.metrics["threshold_policy"]
    assert 0 < art.threshold < 1 and art.threshold == a.threshold == policy["final_threshold"]
    assert policy["oof_threshold"] == art.metrics["cv"]["threshold"]
    cv = art.metrics["cv"]
    assert cv["patches"] == 4 and len(cv["folds"]) == 2
    assert {"precision", "recall", "f1", "iou", "tp", "fp", "fn", "tn"} <= set(cv["micro"])
    assert cv["micro"]["tp"] + cv["micro"]["fp"] + cv["micro"]["fn"] + cv["micro"]["tn"] == 4 * 128 * 128
    assert "caveat" in art.metrics and "4 Landslide4Sense patches" in art.metrics["caveat"]
    data = art.training["data"]
    assert data["checksum_sha256"] == data_checksum(find_patches(root))
    assert data["patch_ids"] == list(PATCH_IDS)
    assert art.training["config"]["model"]["architecture"] == "PlainUnet"
    assert art.training["config"]["augment"]["noise_std"] == 0.05
    assert art.training["epochs"] >= 1 and art.training["versions"]["torch"]
    assert art.arch_kwargs == {"base_channels": 4, "depth": 2}

    log = [json.loads(line) for line in Path(art.training["log"]).read_text().splitlines()]
    assert [r["run"] for r in log[:2]] == ["fold 1/2", "fold 1/2"]
    assert all("val_f1" in r for r in log if r["run"].startswith("fold"))
    assert log[-1]["run"] == "final"


def test_validation_split_chooses_checkpoint_and_threshold_on_validation(shared_data: Path, tmp_path: Path) -> None:
    root = _four_patches(shared_data, tmp_path / "l4s", "TrainData", ids=("1", "28", "461"))
    _four_patches(shared_data, tmp_path / "l4s", "ValidData", ids=("512",))
    cfg = _tiny(tmp_path, "v", root, extra_data="train_split: train\n  valid_split: valid")
    result = train(cfg)
    art = load_artefact(result.artefact)
    assert art.metrics["patches"] == 1
    assert "validation" in art.metrics["protocol"]
    assert art.training["data"]["valid_patches"] == 1 and art.training["data"]["patches"] == 3
    # the statistics are the training split's alone; the validation patch is normalized with them
    assert art.training["data"]["statistics"]["n_pixels"] == 3 * 128 * 128
    assert "3 training patches" in art.normalization["source"]
    assert 1 <= art.training["best_epoch"] <= 2


def test_share_threshold_flags_the_requested_share() -> None:
    prob = np.random.default_rng(0).random(10_000)
    t = share_threshold(prob, 0.05)
    assert (prob >= t).mean() == pytest.approx(0.05, abs=1e-3)
    assert share_threshold(prob, 0.0) == 0.98
    assert share_threshold(np.full(100, 0.999), 0.5) == 0.98  # limited to [0.02, 0.98]


def test_weight_average_is_what_training_keeps(shared_data: Path, tmp_path: Path) -> None:
    """optimizer.ema_decay: validation, checkpoints and the result use the moving average of the weights."""
    from pipeline.training.datasets import make_dataset
    from pipeline.training.fit import build_network, fit, seed_everything

    root = _four_patches(shared_data, tmp_path / "l4s")
    records = find_patches(root, require_masks=True)

    def run(decay: float) -> dict[str, np.ndarray]:
        base = _tiny(tmp_path, f"ema{decay}", root)
        cfg = TrainConfig.model_validate({**base.model_dump(), "epochs": 3,
                                          "optimizer": {**base.optimizer.model_dump(), "ema_decay": decay}})
        ds = make_dataset(cfg, records)
        res = fit(cfg, ds, ds.subset([0, 1], ds.augmentation), label="ema")
        assert res.val_prob is not None and np.isfinite(res.val_prob).all()
        last = fit(cfg, ds, None)
        return {k: v.float().numpy() for k, v in last.state.items() if v.is_floating_point()}

    plain, tiny, strong = run(0.0), run(1e-9), run(0.999)
    seed_everything(7)
    init = {k: v.float().numpy() for k, v in build_network(_tiny(tmp_path, "init", root)).state_dict().items()
            if v.is_floating_point()}
    assert plain.keys() == tiny.keys() == strong.keys() == init.keys()
    # an average that forgets at once is the trained weights themselves
    for k in plain:
        np.testing.assert_allclose(tiny[k], plain[k], rtol=1e-5, atol=1e-6)

    # a slow average stays near the early weights: closer to the initialization than training went
    def dist(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
        return float(sum(np.abs(a[k] - b[k]).sum() for k in a if "running" not in k))

    assert dist(strong, init) < 0.7 * dist(plain, init)
    assert dist(strong, plain) > 0


def test_data_loader_workers_on_each_device() -> None:
    """auto: none on the CPU (they would compete with the model for the cores), up to 4 on a GPU,
    one core left to the training process; an explicit number is kept."""
    import torch

    from pipeline.training.fit import loader_workers

    assert loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers("auto", torch.device("mps")) == 0
    on_gpu = loader_workers("auto", torch.device("cuda"))
    assert 1 <= on_gpu <= 4 and on_gpu <= max(1, (os.cpu_count() or 2) - 1)
    assert loader_workers(3, torch.device("cpu")) == 3 and loader_workers(0, torch.device("cuda")) == 0
