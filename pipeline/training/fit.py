"""Training: ``python -m pipeline train train.yaml``.

A typed config (see :class:`TrainConfig`; unknown keys are errors, paths are
relative to the YAML file) says which patches, which model, which loss and
optimizer. Two protocols:

* with a validation split (``data.valid_split``, e.g. Landslide4Sense
  ``ValidData``): train on the training split, keep the checkpoint with the
  best validation F1 (early stopping), choose the decision threshold on the
  validation predictions of that checkpoint;
* without one: k-fold cross-validation on the training patches (each fold
  trained with early stopping on its held-out patches), the threshold chosen
  on the pooled out-of-fold predictions, the cross-validated metrics recorded,
  then a final model trained on all patches for the median best epoch count.

Runs are reproducible: seeds are fixed for torch, numpy and the data order,
augmentation draws are seeded by (seed, epoch, patch) and deterministic
algorithms are requested. Per-epoch metrics go to a JSON-lines log; the
output is one model artefact (:mod:`pipeline.model.artefact`) whose metadata holds
the channels, normalization, threshold, metrics, data checksum and the
training config.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.channels import L4S_CHANNELS, canonical
from pipeline.core.config import RelPath
from pipeline.training.datasets import UNITS, AugmentConfig, RadiometricConfig
from pipeline.core.errors import ConfigError
from pipeline.training.losses import LossConfig
from pipeline.core.yamlio import line_of, load_yaml

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.training.datasets import PatchDataset, PatchRecord

log = logging.getLogger(__name__)

CAVEAT_TINY = (
    "trained and cross-validated on {n} Landslide4Sense patches only; metrics on so few patches have "
    "a large variance and are not comparable to results on the full benchmark (3799 training patches)"
)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Strict):
    """Where the patches are."""

    root: RelPath = Field(..., description="Landslide4Sense root (TrainData/...) or a folder with img/ + mask/")
    train_split: str | None = Field(None, description="split of root to train on (train -> TrainData); default: root itself")
    valid_root: RelPath | None = Field(None, description="root of the validation split; default: root")
    valid_split: str | None = Field(None, description="validation split (valid -> ValidData); none: k-fold CV")
    source_channels: list[str] | None = Field(None, description="channel names of GeoTIFF chips without band descriptions")
    units: Literal[UNITS] | None = Field(  # type: ignore[valid-type]
        None,
        description=(
            "how GeoTIFF chips store their values: physical (reflectance, degrees, metres), dn "
            "(reflectance x 10000) or l4s (Landslide4Sense scaling); default: the chips' UNITS tag, "
            "else physical. Landslide4Sense HDF5 patches are always l4s"
        ),
    )
    cache: bool = Field(True, description="keep normalized patches in memory (turn off for the full dataset with workers)")


class ModelSection(_Strict):
    """Which network, on which channels, normalized how."""

    architecture: str = "Unet"
    encoder: str | None = "mobilenet_v2"
    options: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments, e.g. decoder_channels")
    channels: list[str] = Field(default_factory=lambda: list(L4S_CHANNELS))
    normalization: dict[str, Any] = Field(
        default_factory=lambda: {"method": "fixed", "clip": 10.0},
        description="fixed: per-channel median and IQR of the training patches in physical units (or given mean/std)",
    )
    levels: list[Literal["L1C", "L2A"]] = Field(
        default_factory=lambda: ["L1C"],
        description=(
            "processing levels the model serves; the patches are L1C, and L2A scenes are brought back to "
            "L1C radiometry by the typical path reflectance of the training patches (radiometric section)"
        ),
    )
    tile_size: int = Field(128, ge=16)
    name: str = "landslide-segmentation"
    version: str = "1"

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        out = [canonical(v) for v in value]
        if len(set(out)) != len(out):
            raise ValueError(f"channels repeat: {out}")
        if not out:
            raise ValueError("give at least one channel")
        return out

    @field_validator("normalization")
    @classmethod
    def _normalization(cls, value: dict[str, Any]) -> dict[str, Any]:
        from pipeline.core.errors import ModelError
        from pipeline.model.normalization import validate_spec

        try:
            return validate_spec(value, resolved=False)
        except ModelError as exc:
            raise ValueError(str(exc)) from None


class OptimizerSection(_Strict):
    name: Literal["adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["none", "cosine", "step", "plateau"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(1e-5, ge=0, description="floor of the cosine schedule")
    step_size: int = Field(30, ge=1, description="epochs between decays for schedule=step")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor for step/plateau")
    plateau_patience: int = Field(5, ge=1)
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description=(
            "exponential moving average of the weights (and batch-norm statistics) after every step, "
            "used for validation, checkpoints and the artefact; 0 turns it off"
        ),
    )


class EarlyStoppingSection(_Strict):
    """Checkpoint selection and early stopping on validation F1."""

    enabled: bool = True
    checkpoint: Literal["best", "last"] = Field(
        "best", description="keep the epoch with the best validation F1, or the last epoch (fixed-length training)"
    )
    patience: int = Field(20, ge=1, description="epochs without improvement of validation F1 before stopping")
    min_delta: float = Field(0.0, ge=0)
    min_epochs: int = Field(1, ge=1)
    monitor: Literal["f1", "f1_best"] = Field(
        "f1_best", description="f1: pooled F1 at threshold 0.5; f1_best: pooled F1 at the best threshold"
    )


class CVSection(_Strict):
    folds: int = Field(5, ge=2)
    final_epochs: int | Literal["median"] = Field(
        "median", description="epochs of the final all-patch model: a number, or the median best epoch of the folds"
    )
    final_threshold: Literal["oof", "match_share"] = Field(
        "match_share",
        description=(
            "oof: the threshold chosen on the out-of-fold predictions; match_share: the final model's threshold "
            "that flags the same share of pixels as the out-of-fold threshold does (labels are not used, so "
            "the choice stays honest; it corrects the calibration drift between fold models and the final model)"
        ),
    )


class OutputSection(_Strict):
    artefact: RelPath
    log: RelPath | None = Field(None, description="per-epoch metrics, JSON lines; default: <artefact>.log.jsonl")
    half_precision: bool = Field(True, description="store weights as float16 (half the file size)")


class TrainConfig(_Strict):
    """Everything a training run needs; see configs/train_default.yaml."""

    data: DataSection
    model: ModelSection = ModelSection()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerSection = OptimizerSection()
    augment: AugmentConfig = AugmentConfig()
    radiometric: RadiometricConfig = RadiometricConfig()
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    early_stopping: EarlyStoppingSection = EarlyStoppingSection()
    cv: CVSection = CVSection()
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = Field(False, description="mixed precision on CUDA")
    num_workers: int = Field(0, ge=0)
    output: OutputSection

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model.tile_size % 32 and self.model.architecture.lower() != "plainunet":
            raise ValueError(f"model.tile_size must be a multiple of 32 for {self.model.architecture}")
        return self


def load_train_config(path: Path | str) -> TrainConfig:
    """Read and validate a training YAML file (strict keys, paths relative to the file)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return TrainConfig.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            where = f"{path}:{line_of(data, loc)}" if line_of(data, loc) else str(path)
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{where}: {'.'.join(str(p) for p in loc) or '(top level)'}: {msg}")
        raise ConfigError("\n".join(lines)) from None


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; ask torch for deterministic algorithms."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA device")
    return torch.device(name)


def kfold_indices(masks_positive: Sequence[float], folds: int, seed: int) -> list[list[int]]:
    """Held-out patch indices of each fold, stratified by landslide fraction.

    Patches are sorted by landslide fraction; each run of ``folds`` neighbours
    is dealt to the folds in a seeded random order, so every fold gets a
    similar mix of landslide-rich and landslide-free patches.
    """
    n = len(masks_positive)
    if folds > n:
        raise ConfigError(f"cv.folds: {folds} folds need at least {folds} patches, found {n}")
    rng = np.random.default_rng(seed)
    order = np.argsort(np.asarray(masks_positive, dtype=float), kind="stable")
    out: list[list[int]] = [[] for _ in range(folds)]
    for start in range(0, n, folds):
        block = order[start : start + folds]
        slots = rng.permutation(folds)[: len(block)]
        for idx, slot in zip(block, slots, strict=True):
            out[int(slot)].append(int(idx))
    return [sorted(f) for f in out]


def predict_probabilities(
    module: nn.Module, images: np.ndarray, batch_size: int = 16, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Landslide probabilities (N, H, W) of normalized images (N, C, H, W).

    Sides that are not multiples of 32 are padded by reflection and cropped back.
    """
    import torch

    module.eval()
    dev = torch.device(device)
    dtype = next(module.parameters()).dtype
    out = []
    h, w = images.shape[-2:]
    ph, pw = (-h) % 32, (-w) % 32
    with torch.no_grad():
        for k in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[k : k + batch_size], dtype=np.float32)).to(dev)
            if ph or pw:
                x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
            logits = module(x.to(dtype)).float()[:, 0, :h, :w]
            out.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def share_threshold(prob: np.ndarray, share: float, lo: float = 0.02, hi: float = 0.98) -> float:
    """Threshold at which a fraction ``share`` of ``prob`` is flagged (prob >= t), limited to [lo, hi]."""
    values = np.sort(np.asarray(prob, dtype=np.float64).ravel())
    if values.size == 0 or share <= 0:
        return hi
    k = min(values.size - 1, max(0, int(round(values.size * (1.0 - share)))))
    return float(np.clip(values[k], lo, hi))


def _build(cfg: TrainConfig) -> nn.Module:
    from pipeline.model.registry import build_model

    return build_model(cfg.model.architecture, cfg.model.encoder, len(cfg.model.channels), 1, **cfg.model.options)


def _optimizer(cfg: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    import torch

    o = cfg.optimizer
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(module.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def _lr_at(cfg: TrainConfig, epoch: int, epochs: int) -> float | None:
    """Learning rate of ``epoch`` (0-based) for the closed-form schedules, None for plateau."""
    o = cfg.optimizer
    if o.schedule == "plateau":
        return None
    if o.warmup_epochs and epoch < o.warmup_epochs:
        return o.lr * (epoch + 1) / o.warmup_epochs
    if o.schedule == "none":
        return o.lr
    if o.schedule == "step":
        return o.lr * o.gamma ** ((epoch - o.warmup_epochs) // o.step_size)
    span = max(1, epochs - o.warmup_epochs)
    t = min(1.0, (epoch - o.warmup_epochs) / span)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * t))


class _JsonLog:
    """Per-epoch records as JSON lines, streamed to ``<path>.partial`` and renamed when closed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path.with_name(path.name + ".partial"), "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, sort_keys=True) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None and self.path is not None:
            self._fh.close()
            os.replace(self._fh.name, self.path)
            self._fh = None


@dataclass
class FitResult:
    """Outcome of one training run."""

    state: dict[str, Any]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_prob: np.ndarray | None = None
    seconds: float = 0.0


def _val_scores(prob: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    from pipeline.training.metrics import pixel_metrics, select_threshold

    at05 = pixel_metrics(prob, mask, valid, 0.5)["micro"]
    thr, f1b = select_threshold(prob, mask, valid)
    return {
        "val_f1": at05["f1"],
        "val_precision": at05["precision"],
        "val_recall": at05["recall"],
        "val_iou": at05["iou"],
        "val_f1_best": f1b,
        "val_threshold_best": thr,
    }


def fit(
    cfg: TrainConfig,
    train_ds: PatchDataset,
    val_ds: PatchDataset | None,
    epochs: int | None = None,
    run_seed: int | None = None,
    label: str = "train",
    log_file: _JsonLog | None = None,
) -> FitResult:
    """Train one model; with ``val_ds`` keep the best checkpoint and stop early."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from pipeline.training.losses import build_loss

    seed = cfg.seed if run_seed is None else run_seed
    seed_everything(seed)
    device = resolve_device(cfg.device)
    epochs = epochs or cfg.epochs
    # the learning-rate schedule always spans cfg.epochs, so a shorter final run follows the folds' trajectory
    schedule_epochs = max(cfg.epochs, epochs)
    module = _build(cfg).to(device)
    optimizer = _optimizer(cfg, module)
    # the weights that are validated and kept: the trained module or its moving average
    ema = None
    if cfg.optimizer.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(cfg.optimizer.ema_decay), use_buffers=True)
    kept = module if ema is None else ema.module
    plateau = None
    if cfg.optimizer.schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.optimizer.gamma, patience=cfg.optimizer.plateau_patience
        )
    pos, neg = train_ds.label_counts()
    loss_fn = build_loss(cfg.loss, pos, neg)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=cfg.num_workers,
        drop_last=len(train_ds) > cfg.batch_size and len(train_ds) % cfg.batch_size == 1,
    )
    if val_ds is not None:
        val_x, val_y, val_v = val_ds.arrays()
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    es = cfg.early_stopping
    best_score, best_epoch, best_state, best_prob = -math.inf, 0, None, None
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=label, unit="epoch", disable=None, leave=False)
    stale = 0
    epoch = 0
    for epoch in bar:
        t0 = time.perf_counter()
        lr = _lr_at(cfg, epoch, schedule_epochs)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        train_ds.set_epoch(epoch)
        module.train()
        total, count = 0.0, 0
        for batch in loader:
            x = batch["image"].to(device)
            y = batch["mask"].to(device)
            v = batch["valid"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                logits = module(x)
            loss = loss_fn(logits.float(), y, v)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(module)
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
        record: dict[str, Any] = {
            "run": label,
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": total / max(count, 1),
        }
        if val_ds is not None:
            prob = predict_probabilities(kept, val_x, cfg.batch_size, device)
            with torch.no_grad():
                logit = torch.logit(torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6))[:, None]
                record["val_loss"] = float(
                    loss_fn(logit, torch.from_numpy(val_y[:, None]).float(), torch.from_numpy(val_v[:, None]))
                )
            record.update(_val_scores(prob, val_y, val_v))
            score = record["val_f1_best" if es.monitor == "f1_best" else "val_f1"]
            if plateau is not None:
                plateau.step(score)
            if es.checkpoint == "last" or score > best_score + es.min_delta or best_state is None:
                best_score, best_epoch, best_prob = score, epoch + 1, prob
                best_state = copy.deepcopy(kept.state_dict())
                stale = 0
            else:
                stale += 1
        record["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        if log_file is not None:
            log_file.write(record)
        bar.set_postfix({k: round(v, 3) for k, v in record.items() if k in ("train_loss", "val_f1_best")})
        if (val_ds is not None and es.enabled and es.checkpoint == "best" and epoch + 1 >= es.min_epochs
                and stale >= es.patience):
            log.info("%s: early stop after epoch %d (best %d, %s %.3f)", label, epoch + 1, best_epoch, es.monitor, best_score)
            break
    bar.close()
    if val_ds is None:
        best_state, best_epoch = copy.deepcopy(kept.state_dict()), epoch + 1
    assert best_state is not None
    return FitResult(
        state=best_state,
        best_epoch=best_epoch,
        epochs_run=epoch + 1,
        history=history,
        val_prob=best_prob,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------
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


def make_dataset(
    cfg: TrainConfig, records: Sequence[PatchRecord], augment: bool = True,
    normalization: dict[str, Any] | None = None,
) -> PatchDataset:
    """A :class:`PatchDataset` with the config's channels, normalization and augmentation.

    ``normalization`` (a resolved spec, e.g. the training set's) replaces the config's.
    """
    from pipeline.training.datasets import NO_AUGMENT, PatchDataset

    return PatchDataset(
        records,
        cfg.model.channels,
        normalization or cfg.model.normalization,
        augment=cfg.augment if augment else NO_AUGMENT,
        source_channels=cfg.data.source_channels,
        seed=cfg.seed,
        cache=cfg.data.cache,
        radiometric=cfg.radiometric if augment else None,
        units=cfg.data.units,
    )


def cross_validate(
    cfg: TrainConfig,
    dataset: PatchDataset,
    folds: list[list[int]] | None = None,
    log_file: _JsonLog | None = None,
) -> CVResult:
    """K-fold cross-validation: out-of-fold probabilities, pooled metrics, per-fold scores.

    Each fold is normalized with the statistics of its own training patches
    (the config's spec, resolved on them), exactly as a new scene is
    normalized with the artefact's. The threshold is chosen on the pooled
    out-of-fold probabilities; the reported metrics use it (``micro``) and
    0.5 (``micro_at_0.5``). Early stopping and the threshold see the
    held-out folds, so the scores are slightly optimistic.
    """
    from pipeline.training.datasets import NO_AUGMENT
    from pipeline.training.metrics import pixel_metrics, select_threshold

    _, masks, valid = dataset.arrays()
    if folds is None:
        folds = kfold_indices(masks.reshape(len(masks), -1).mean(axis=1), cfg.cv.folds, cfg.seed)
    oof = np.zeros(masks.shape, dtype=np.float32)
    best_epochs, fold_scores = [], []
    states, normalizations, paths = [], [], []
    start = time.perf_counter()
    for k, held in enumerate(folds):
        train_idx = [i for i in range(len(dataset)) if i not in set(held)]
        train_k = dataset.subset(train_idx, cfg.augment, cfg.model.normalization, cfg.radiometric)
        res = fit(
            cfg,
            train_k,
            dataset.subset(held, NO_AUGMENT, serving_normalization(cfg, train_k)),
            run_seed=cfg.seed + 1000 * (k + 1),
            label=f"fold {k + 1}/{len(folds)}",
            log_file=log_file,
        )
        assert res.val_prob is not None
        oof[held] = res.val_prob
        states.append(res.state)
        normalizations.append(serving_normalization(cfg, train_k))
        paths.append(train_k.path)
        best_epochs.append(res.best_epoch)
        fs = _val_scores(res.val_prob, masks[held], valid[held])
        fs.update(fold=k + 1, best_epoch=res.best_epoch, patches=len(held))
        fold_scores.append(fs)
        log.info("fold %d/%d: best epoch %d, F1@0.5 %.3f, best F1 %.3f", k + 1, len(folds), res.best_epoch, fs["val_f1"], fs["val_f1_best"])
    threshold, _ = select_threshold(oof, masks, valid)
    at_t = pixel_metrics(oof, masks, valid, threshold)
    at_05 = pixel_metrics(oof, masks, valid, 0.5)
    f1s = np.array([f["val_f1_best"] for f in fold_scores])
    metrics = {
        "protocol": f"{len(folds)}-fold cross-validation, out-of-fold predictions pooled over all patches",
        "threshold": threshold,
        "micro": at_t["micro"],
        "micro_at_0.5": at_05["micro"],
        "per_patch_mean": at_t["per_patch_mean"],
        "fold_f1_best_mean": float(f1s.mean()),
        "fold_f1_best_std": float(f1s.std()),
        "folds": fold_scores,
        "patches": len(dataset),
    }
    return CVResult(
        folds=folds, oof_prob=oof, masks=masks, valid=valid, best_epochs=best_epochs, fold_scores=fold_scores,
        threshold=threshold, metrics=metrics, seconds=time.perf_counter() - start,
        states=states, normalizations=normalizations, paths=paths,
    )


def serving_normalization(cfg: TrainConfig, dataset: PatchDataset) -> dict[str, Any]:
    """The normalization a model trained on ``dataset`` ships with: the patches' statistics, plus
    those for L2A scenes when the model serves them (the typical path reflectance of the patches
    added back, the infrared gain undone: :func:`pipeline.model.normalization.add_level`)."""
    from pipeline.model.normalization import add_level

    spec = dict(dataset.normalization)
    if "L2A" not in cfg.model.levels or spec["method"] != "fixed":
        return spec
    if not dataset.path.any():
        raise ConfigError(
            "model.levels includes L2A but no path reflectance was estimated from the training patches: "
            "leave normalization.mean/std to the patches or set radiometric.p > 0"
        )
    return add_level(spec, "L2A", dataset.path, 1.0 + dataset.nir_gain)


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    artefact: Path
    threshold: float
    metrics: dict[str, Any]
    training: dict[str, Any]
    module: Any = None


def _versions() -> dict[str, str]:
    import segmentation_models_pytorch as smp
    import torch

    from pipeline import __version__

    return {"pipeline": __version__, "torch": torch.__version__, "segmentation_models_pytorch": smp.__version__}


def train(cfg: TrainConfig, source: Path | None = None) -> TrainResult:
    """Run the training protocol of ``cfg`` and write the model artefact."""
    import torch

    from pipeline.training.datasets import NO_AUGMENT, data_checksum, find_patches
    from pipeline.training.metrics import pixel_metrics, select_threshold

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    d = cfg.data
    records = find_patches(d.root, d.train_split, require_masks=True)
    dataset = make_dataset(cfg, records)
    log.info("training on %d patches from %s (channels %s)", len(records), d.root, ",".join(cfg.model.channels))
    log_path = cfg.output.log or cfg.output.artefact.with_name(cfg.output.artefact.stem + ".log.jsonl")
    jlog = _JsonLog(log_path)
    data_info: dict[str, Any] = {
        "root": str(Path(d.root).resolve()),
        "train_split": d.train_split,
        "patches": len(records),
        "patch_ids": [r.id for r in records],
        "checksum_sha256": data_checksum(records),
    }
    normalization = serving_normalization(cfg, dataset)
    if dataset.stats is not None:
        data_info["statistics"] = dataset.stats.to_dict()
        normalization["source"] = f"{normalization['source']} (data checksum sha256 {data_info['checksum_sha256']})"
    try:
        if d.valid_split is not None:
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
            state, best_epoch, epochs_final = res.state, res.best_epoch, res.epochs_run
            caveat = None
        else:
            cv = cross_validate(cfg, dataset, log_file=jlog)
            threshold = cv.threshold
            metrics = {"cv": cv.metrics}
            epochs_final = (
                int(np.median(cv.best_epochs)) if cfg.cv.final_epochs == "median" else int(cfg.cv.final_epochs)
            )
            epochs_final = max(1, epochs_final)
            log.info("final model: all %d patches, %d epochs", len(records), epochs_final)
            res = fit(cfg, dataset, None, epochs=epochs_final, label="final", log_file=jlog)
            state, best_epoch = res.state, epochs_final
            caveat = CAVEAT_TINY.format(n=len(records)) if len(records) < 500 else None
            # the final model on its own training patches: a sanity figure, not a score
            module = _build(cfg)
            module.load_state_dict(state)
            x, y, v = dataset.subset(range(len(dataset)), NO_AUGMENT).arrays()
            final_prob = predict_probabilities(module, x)
            share = float((cv.oof_prob[cv.valid] >= cv.threshold).mean())
            if cfg.cv.final_threshold == "match_share":
                threshold = share_threshold(final_prob[v], share)
            metrics["threshold_policy"] = {
                "policy": cfg.cv.final_threshold,
                "oof_threshold": cv.threshold,
                "oof_landslide_share": share,
                "final_threshold": threshold,
            }
            log.info("threshold %.3f (%s; out-of-fold threshold %.3f flags %.2f%% of pixels)",
                     threshold, cfg.cv.final_threshold, cv.threshold, 100 * share)
            metrics["train_fit"] = pixel_metrics(final_prob, y, v, threshold)["micro"]
            del dataset  # release the cache
    finally:
        jlog.close()
    module = _build(cfg)
    module.load_state_dict(state)
    module.eval()
    training = {
        "config": cfg.model_dump(mode="json"),
        "config_file": str(source) if source else None,
        "data": data_info,
        "epochs": epochs_final,
        "best_epoch": best_epoch,
        "seed": cfg.seed,
        "threads": torch.get_num_threads(),
        "device": str(resolve_device(cfg.device)),
        "seconds": round(time.perf_counter() - start, 1),
        "versions": _versions(),
        "log": str(log_path),
        "loss": cfg.loss.model_dump(mode="json"),
    }
    if caveat:
        training["caveat"] = caveat
        metrics["caveat"] = caveat
    path = save_trained(cfg, module, threshold, training, metrics, normalization)
    log.info("wrote %s (threshold %.3f)", path, threshold)
    return TrainResult(artefact=path, threshold=threshold, metrics=metrics, training=training, module=module)


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


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m pipeline train``."""
    parser.add_argument("config", type=Path, help="training YAML (see configs/train_default.yaml)")
    parser.add_argument("--output", type=Path, default=None, help="artefact path (overrides output.artefact)")
    parser.add_argument("--epochs", type=int, default=None, help="override epochs")
    parser.add_argument("--seed", type=int, default=None, help="override seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (override)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None, help="override device")


def cli_train(args: argparse.Namespace) -> int:
    """Entry point of ``python -m pipeline train``."""
    cfg = load_train_config(args.config)
    updates: dict[str, Any] = {}
    for key in ("epochs", "seed", "threads", "device"):
        if getattr(args, key, None) is not None:
            updates[key] = getattr(args, key)
    if args.output is not None:
        updates["output"] = cfg.output.model_copy(update={"artefact": args.output.resolve()})
    if updates:
        cfg = TrainConfig.model_validate({**cfg.model_dump(), **updates})
    result = train(cfg, source=Path(args.config).resolve())
    m = result.metrics.get("cv", result.metrics)
    micro = m["micro"]
    print(
        f"{result.artefact}: threshold {result.threshold:.3f}; {m['protocol']}: "
        f"F1 {micro['f1']:.3f} precision {micro['precision']:.3f} recall {micro['recall']:.3f} IoU {micro['iou']:.3f}"
    )
    return 0
