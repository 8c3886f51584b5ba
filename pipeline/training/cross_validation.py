"""K-fold cross-validation of a training config: out-of-fold predictions, pooled metrics, per-fold scores."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.training.augmentation import NO_AUGMENTATION, Augmentation
from pipeline.training.datasets import serving_normalization
from pipeline.training.fit import EpochLog, FitResult, fit, validation_scores
from pipeline.training.folds import kfold_indices

if TYPE_CHECKING:
    from pipeline.training.config import TrainConfig
    from pipeline.training.datasets import PatchDataset

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    """Out-of-fold predictions and scores of a k-fold run."""

    folds: list[list[int]]
    oof_prob: np.ndarray
    masks: np.ndarray
    valid: np.ndarray
    best_epochs: list[int]
    fold_scores: list[dict[str, float]]
    threshold: float
    metrics: dict[str, Any]
    seconds: float
    #: each fold's trained weights and the normalization of its training patches
    states: list[dict[str, Any]] = field(default_factory=list)
    normalizations: list[dict[str, Any]] = field(default_factory=list)
    #: each fold's path reflectance (radiometric augmentation), per channel
    paths: list[np.ndarray] = field(default_factory=list)


def _fit_fold(
    cfg: TrainConfig, dataset: PatchDataset, folds: list[list[int]], k: int, log_file: EpochLog | None,
) -> tuple[FitResult, dict[str, Any], np.ndarray]:
    """Train fold ``k`` on the other folds' patches, normalized with their own statistics.

    Returns the run, the normalization of its training patches and their path reflectance.
    """
    held = folds[k]
    held_set = set(held)
    train_idx = [i for i in range(len(dataset)) if i not in held_set]
    train_k = dataset.subset(train_idx, Augmentation(cfg.augment, cfg.radiometric), cfg.model.normalization)
    spec = serving_normalization(cfg, train_k)
    res = fit(
        cfg,
        train_k,
        dataset.subset(held, NO_AUGMENTATION, spec),
        run_seed=cfg.seed + 1000 * (k + 1),
        label=f"fold {k + 1}/{len(folds)}",
        log_file=log_file,
    )
    assert res.val_prob is not None
    return res, spec, train_k.path


def _pooled_metrics(
    oof: np.ndarray, masks: np.ndarray, valid: np.ndarray, fold_scores: list[dict[str, float]],
) -> tuple[float, dict[str, Any]]:
    """The threshold chosen on the pooled out-of-fold probabilities, and the metrics of the run."""
    from pipeline.training.metrics import pixel_metrics
    from pipeline.training.thresholds import select_threshold

    threshold, _ = select_threshold(oof, masks, valid)
    at_t = pixel_metrics(oof, masks, valid, threshold)
    at_05 = pixel_metrics(oof, masks, valid, 0.5)
    f1s = np.array([f["val_f1_best"] for f in fold_scores])
    return threshold, {
        "protocol": f"{len(fold_scores)}-fold cross-validation, out-of-fold predictions pooled over all patches",
        "threshold": threshold,
        "micro": at_t["micro"],
        "micro_at_0.5": at_05["micro"],
        "per_patch_mean": at_t["per_patch_mean"],
        "fold_f1_best_mean": float(f1s.mean()),
        "fold_f1_best_std": float(f1s.std()),
        "folds": fold_scores,
        "patches": len(oof),
    }


def cross_validate(
    cfg: TrainConfig,
    dataset: PatchDataset,
    folds: list[list[int]] | None = None,
    log_file: EpochLog | None = None,
) -> CVResult:
    """K-fold cross-validation: out-of-fold probabilities, pooled metrics, per-fold scores.

    Each fold is normalized with the statistics of its own training patches
    (the config's spec, resolved on them), exactly as a new scene is
    normalized with the artefact's. The threshold is chosen on the pooled
    out-of-fold probabilities; the reported metrics use it (``micro``) and
    0.5 (``micro_at_0.5``). Early stopping and the threshold see the
    held-out folds, so the scores are slightly optimistic.
    """
    _, masks, valid = dataset.arrays()
    if folds is None:
        folds = kfold_indices(masks.reshape(len(masks), -1).mean(axis=1), cfg.cv.folds, cfg.seed)
    oof = np.zeros(masks.shape, dtype=np.float32)
    best_epochs, fold_scores = [], []
    states, normalizations, paths = [], [], []
    start = time.perf_counter()
    for k, held in enumerate(folds):
        res, spec, path = _fit_fold(cfg, dataset, folds, k, log_file)
        assert res.val_prob is not None
        oof[held] = res.val_prob
        states.append(res.state)
        normalizations.append(spec)
        paths.append(path)
        best_epochs.append(res.best_epoch)
        fs = validation_scores(res.val_prob, masks[held], valid[held])
        fs.update(fold=k + 1, best_epoch=res.best_epoch, patches=len(held))
        fold_scores.append(fs)
        log.info("fold %d/%d: best epoch %d, F1@0.5 %.3f, best F1 %.3f", k + 1, len(folds), res.best_epoch,
                 fs["val_f1"], fs["val_f1_best"])
    threshold, metrics = _pooled_metrics(oof, masks, valid, fold_scores)
    return CVResult(
        folds=folds, oof_prob=oof, masks=masks, valid=valid, best_epochs=best_epochs, fold_scores=fold_scores,
        threshold=threshold, metrics=metrics, seconds=time.perf_counter() - start,
        states=states, normalizations=normalizations, paths=paths,
    )
