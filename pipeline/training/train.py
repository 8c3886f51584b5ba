"""The training protocol of ``python -m pipeline train``: from a training config to a model artefact.

Two protocols:

* with a validation split (``data.valid_split``, e.g. Landslide4Sense
  ``ValidData``): train on the training split, keep the checkpoint with the
  best validation F1 (early stopping), choose the decision threshold on the
  validation predictions of that checkpoint;
* without one: k-fold cross-validation on the training patches (each fold
  trained with early stopping on its held-out patches), the threshold chosen
  on the pooled out-of-fold predictions, the cross-validated metrics recorded,
  then a final model trained on all patches for the median best epoch count.

The output is one model artefact (:mod:`pipeline.model.artefact`) whose
metadata holds the channels, normalization, threshold, metrics, data checksum
and the training config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.training.augmentation import NO_AUGMENTATION
from pipeline.training.cross_validation import CVResult, cross_validate
from pipeline.training.datasets import make_dataset, serving_normalization
from pipeline.training.fit import EpochLog, build_network, fit, training_device
from pipeline.training.metrics import pixel_metrics
from pipeline.training.patch_files import PatchRecord, data_checksum, find_patches
from pipeline.training.predict import predict_probabilities
from pipeline.training.thresholds import select_threshold, share_threshold

if TYPE_CHECKING:
    from torch import nn

    from pipeline.training.config import DataSection, TrainConfig
    from pipeline.training.datasets import PatchDataset

log = logging.getLogger(__name__)

CAVEAT_TINY = (
    "trained and cross-validated on {n} Landslide4Sense patches only; metrics on so few patches have "
    "a large variance and are not comparable to results on the full benchmark (3799 training patches)"
)


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    artefact: Path
    threshold: float
    metrics: dict[str, Any]
    training: dict[str, Any]
    module: Any = None


@dataclass
class _Outcome:
    """What a protocol chose: the weights, their epochs, the threshold and the metrics."""

    state: dict[str, Any]
    best_epoch: int
    epochs: int
    threshold: float
    metrics: dict[str, Any]
    caveat: str | None = None


def _versions() -> dict[str, str]:
    import segmentation_models_pytorch as smp
    import torch

    from pipeline import __version__

    return {"pipeline": __version__, "torch": torch.__version__, "segmentation_models_pytorch": smp.__version__}


def _data_info(d: DataSection, records: list[PatchRecord]) -> dict[str, Any]:
    return {
        "root": str(Path(d.root).resolve()),
        "train_split": d.train_split,
        "patches": len(records),
        "patch_ids": [r.id for r in records],
        "checksum_sha256": data_checksum(records),
    }


def _train_with_validation(
    cfg: TrainConfig, dataset: PatchDataset, normalization: dict[str, Any], data_info: dict[str, Any],
    jlog: EpochLog,
) -> _Outcome:
    """Train on the training split; checkpoint and threshold chosen on the validation split."""
    d = cfg.data
    val_records = find_patches(d.valid_root or d.root, d.valid_split, require_masks=True)
    val_ds = make_dataset(cfg, val_records, augment=False, normalization=normalization)
    data_info.update(
        valid_split=d.valid_split, valid_patches=len(val_records),
        valid_checksum_sha256=data_checksum(val_records),
    )
    res = fit(cfg, dataset, val_ds, log_file=jlog, label="train")
    assert res.val_prob is not None
    _, vy, vv = val_ds.arrays()
    threshold, _ = select_threshold(res.val_prob, vy, vv)
    vm = pixel_metrics(res.val_prob, vy, vv, threshold)
    metrics: dict[str, Any] = {
        "protocol": "train split -> validation split; best checkpoint and threshold chosen on validation",
        "threshold": threshold,
        "micro": vm["micro"],
        "micro_at_0.5": pixel_metrics(res.val_prob, vy, vv, 0.5)["micro"],
        "per_patch_mean": vm["per_patch_mean"],
        "patches": len(val_records),
    }
    return _Outcome(res.state, res.best_epoch, res.epochs_run, threshold, metrics)


def _final_threshold(
    cfg: TrainConfig, cv: CVResult, dataset: PatchDataset, state: dict[str, Any],
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """The final model's threshold (``cv.final_threshold``), the policy record, and the model's
    fit on its own training patches (a sanity figure, not a score)."""
    device = training_device(cfg.device)
    module = build_network(cfg)
    module.load_state_dict(state)
    x, y, v = dataset.subset(range(len(dataset)), NO_AUGMENTATION).arrays()
    final_prob = predict_probabilities(module.to(device), x, cfg.batch_size, device)
    share = float((cv.oof_prob[cv.valid] >= cv.threshold).mean())
    threshold = cv.threshold
    if cfg.cv.final_threshold == "match_share":
        threshold = share_threshold(final_prob[v], share)
    policy = {
        "policy": cfg.cv.final_threshold,
        "oof_threshold": cv.threshold,
        "oof_landslide_share": share,
        "final_threshold": threshold,
    }
    log.info("threshold %.3f (%s; out-of-fold threshold %.3f flags %.2f%% of pixels)",
             threshold, cfg.cv.final_threshold, cv.threshold, 100 * share)
    return threshold, policy, pixel_metrics(final_prob, y, v, threshold)["micro"]


def _train_with_cross_validation(cfg: TrainConfig, dataset: PatchDataset, jlog: EpochLog) -> _Outcome:
    """Cross-validate, then train the final model on all patches."""
    cv = cross_validate(cfg, dataset, log_file=jlog)
    epochs_final = int(np.median(cv.best_epochs)) if cfg.cv.final_epochs == "median" else int(cfg.cv.final_epochs)
    epochs_final = max(1, epochs_final)
    n = len(dataset)
    log.info("final model: all %d patches, %d epochs", n, epochs_final)
    res = fit(cfg, dataset, None, epochs=epochs_final, label="final", log_file=jlog)
    threshold, policy, train_fit = _final_threshold(cfg, cv, dataset, res.state)
    metrics: dict[str, Any] = {"cv": cv.metrics, "threshold_policy": policy, "train_fit": train_fit}
    caveat = CAVEAT_TINY.format(n=n) if n < 500 else None
    return _Outcome(res.state, epochs_final, epochs_final, threshold, metrics, caveat)


def _training_record(
    cfg: TrainConfig, source: Path | None, data_info: dict[str, Any], outcome: _Outcome, log_path: Path,
    start: float,
) -> dict[str, Any]:
    """The artefact's ``training`` metadata."""
    import torch

    return {
        "config": cfg.model_dump(mode="json"),
        "config_file": str(source) if source else None,
        "data": data_info,
        "epochs": outcome.epochs,
        "best_epoch": outcome.best_epoch,
        "seed": cfg.seed,
        "threads": torch.get_num_threads(),
        "device": str(training_device(cfg.device)),
        "seconds": round(time.perf_counter() - start, 1),
        "versions": _versions(),
        "log": str(log_path),
        "loss": cfg.loss.model_dump(mode="json"),
    }


def train(cfg: TrainConfig, source: Path | None = None) -> TrainResult:
    """Run the training protocol of ``cfg`` and write the model artefact."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    d = cfg.data
    records = find_patches(d.root, d.train_split, require_masks=True)
    dataset = make_dataset(cfg, records)
    log.info("training on %d patches from %s (channels %s)", len(records), d.root, ",".join(cfg.model.channels))
    log_path = cfg.output.log or cfg.output.artefact.with_name(cfg.output.artefact.stem + ".log.jsonl")
    jlog = EpochLog(log_path)
    data_info = _data_info(d, records)
    normalization = serving_normalization(cfg, dataset)
    if dataset.stats is not None:
        data_info["statistics"] = dataset.stats.to_dict()
        normalization["source"] = f"{normalization['source']} (data checksum sha256 {data_info['checksum_sha256']})"
    try:
        if d.valid_split is not None:
            outcome = _train_with_validation(cfg, dataset, normalization, data_info, jlog)
        else:
            outcome = _train_with_cross_validation(cfg, dataset, jlog)
    finally:
        jlog.close()
    del dataset  # release the cache
    module = build_network(cfg)
    module.load_state_dict(outcome.state)
    module.eval()
    training = _training_record(cfg, source, data_info, outcome, log_path, start)
    if outcome.caveat:
        training["caveat"] = outcome.caveat
        outcome.metrics["caveat"] = outcome.caveat
    path = save_trained(cfg, module, outcome.threshold, training, outcome.metrics, normalization)
    log.info("wrote %s (threshold %.3f)", path, outcome.threshold)
    return TrainResult(artefact=path, threshold=outcome.threshold, metrics=outcome.metrics, training=training,
                       module=module)


def save_trained(
    cfg: TrainConfig, module: nn.Module, threshold: float, training: dict[str, Any], metrics: dict[str, Any],
    normalization: dict[str, Any],
) -> Path:
    """Write ``module`` with its metadata as a model artefact (float16 weights if configured).

    ``normalization`` is the resolved spec the module was trained with (statistics included).
    """
    from pipeline.model.artefact import ModelArtefact, save_artefact
    from pipeline.model.normalization import validate_spec

    m = cfg.model
    meta = ModelArtefact(
        architecture=m.architecture,
        encoder=m.encoder,
        channels=list(m.channels),
        normalization=validate_spec(normalization, len(m.channels)),
        levels=list(m.levels),
        tile_size=m.tile_size,
        threshold=float(threshold),
        training=training,
        metrics=metrics,
        version=m.version,
        name=m.name,
        arch_kwargs=dict(m.options),
    )
    path = Path(cfg.output.artefact)
    save_artefact(path, module, meta, half=cfg.output.half_precision)
    return path
