"""One training run: the epoch loop, validation, checkpoint selection and early stopping.

Runs are reproducible: seeds are fixed for torch, numpy and the data order,
augmentation draws are seeded by (seed, epoch, patch) and deterministic
algorithms are requested. Every epoch's record goes to an :class:`EpochLog`
(JSON lines).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.training.optimizer import build_optimizer, epoch_scheduler, plateau_scheduler, weight_average
from pipeline.training.predict import predict_probabilities

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
    from torch.optim.swa_utils import AveragedModel
    from torch.utils.data import DataLoader

    from pipeline.training.config import EarlyStoppingSection, TrainConfig
    from pipeline.training.datasets import PatchDataset
    from pipeline.training.losses import SegmentationLoss

log = logging.getLogger(__name__)


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


def training_device(name: str) -> torch.device:
    """The torch device of the config's ``device`` (auto: CUDA when there is one, else the CPU)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA device")
    return torch.device(name)


def loader_workers(setting: int | str, device: torch.device) -> int:
    """Data loader processes for ``setting`` on ``device`` (``auto``: 0 on the CPU, where they would
    compete with the model for the cores; on a GPU up to 4, leaving a core to the training process)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def build_network(cfg: TrainConfig) -> nn.Module:
    """The untrained network of the config's ``model`` section (one output channel)."""
    from pipeline.model.registry import build_model

    return build_model(cfg.model.architecture, cfg.model.encoder, len(cfg.model.channels), 1, **cfg.model.options)


class EpochLog:
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


def validation_scores(prob: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Pooled precision, recall, F1 and IoU at 0.5, and the best F1 with its threshold."""
    from pipeline.training.metrics import pixel_metrics
    from pipeline.training.thresholds import select_threshold

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


@dataclass
class _Run:
    """What one training run works with."""

    module: nn.Module
    #: the weights that are validated and kept: the trained module or its moving average
    kept: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    plateau: ReduceLROnPlateau | None
    loss_fn: SegmentationLoss
    loader: DataLoader  # type: ignore[type-arg]
    scaler: torch.amp.GradScaler
    device: torch.device
    use_amp: bool


def _start_run(cfg: TrainConfig, train_ds: PatchDataset, seed: int, schedule_epochs: int) -> _Run:
    import torch
    from torch.utils.data import DataLoader

    from pipeline.training.losses import build_loss

    device = training_device(cfg.device)
    module = build_network(cfg).to(device)
    optimizer = build_optimizer(cfg.optimizer, module)
    ema = weight_average(cfg.optimizer, module)
    pos, neg = train_ds.label_counts()
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        # not persistent: each epoch's workers get the dataset with that epoch's augmentation draw
        num_workers=loader_workers(cfg.num_workers, device),
        pin_memory=device.type == "cuda",
        drop_last=len(train_ds) > cfg.batch_size and len(train_ds) % cfg.batch_size == 1,
    )
    use_amp = cfg.amp and device.type == "cuda"
    return _Run(
        module=module, kept=module if ema is None else ema.module, ema=ema, optimizer=optimizer,
        scheduler=epoch_scheduler(cfg.optimizer, optimizer, schedule_epochs),
        plateau=plateau_scheduler(cfg.optimizer, optimizer), loss_fn=build_loss(cfg.loss, pos, neg),
        loader=loader, scaler=torch.amp.GradScaler("cuda", enabled=use_amp), device=device, use_amp=use_amp,
    )


def _train_epoch(run: _Run) -> float:
    """One pass over the training patches; the mean loss per patch."""
    import torch

    run.module.train()
    # the loss summed on the device: read once per epoch, not once per step (each read waits for the GPU)
    total = torch.zeros((), dtype=torch.float32 if run.device.type == "mps" else torch.float64, device=run.device)
    count = 0
    async_copy = run.device.type == "cuda"  # from pinned batches: the copy overlaps the previous step's work
    for batch in run.loader:
        x = batch["image"].to(run.device, non_blocking=async_copy)
        y = batch["mask"].to(run.device, non_blocking=async_copy)
        v = batch["valid"].to(run.device, non_blocking=async_copy)
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, enabled=run.use_amp):
            logits = run.module(x)
        loss = run.loss_fn(logits.float(), y, v)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update_parameters(run.module)
        total += loss.detach().to(total.dtype) * x.shape[0]
        count += x.shape[0]
    return float(total) / max(count, 1)


def _validate(run: _Run, val: tuple[np.ndarray, np.ndarray, np.ndarray], batch_size: int,
              record: dict[str, Any]) -> np.ndarray:
    """Add the validation loss and scores of the kept weights to ``record``; their probabilities."""
    import torch

    val_x, val_y, val_v = val
    prob = predict_probabilities(run.kept, val_x, batch_size, run.device)
    with torch.no_grad():
        logit = torch.logit(torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6))[:, None]
        record["val_loss"] = float(
            run.loss_fn(logit, torch.from_numpy(val_y[:, None]).float(), torch.from_numpy(val_v[:, None]))
        )
    record.update(validation_scores(prob, val_y, val_v))
    return prob


@dataclass
class _Checkpoint:
    """The weights kept so far, their score, and the epochs since the score last improved."""

    score: float = -math.inf
    epoch: int = 0
    state: dict[str, Any] | None = None
    prob: np.ndarray | None = None
    stale: int = 0

    def offer(self, es: EarlyStoppingSection, score: float, epoch: int, kept: nn.Module, prob: np.ndarray) -> None:
        if es.checkpoint == "last" or score > self.score + es.min_delta or self.state is None:
            self.score, self.epoch, self.prob = score, epoch, prob
            self.state = copy.deepcopy(kept.state_dict())
            self.stale = 0
        else:
            self.stale += 1

    def exhausted(self, es: EarlyStoppingSection, epoch: int) -> bool:
        return es.enabled and es.checkpoint == "best" and epoch >= es.min_epochs and self.stale >= es.patience


def fit(
    cfg: TrainConfig,
    train_ds: PatchDataset,
    val_ds: PatchDataset | None,
    epochs: int | None = None,
    run_seed: int | None = None,
    label: str = "train",
    log_file: EpochLog | None = None,
) -> FitResult:
    """Train one model; with ``val_ds`` keep the best checkpoint and stop early.

    The learning-rate schedule always spans ``cfg.epochs``, so a shorter final run follows the
    folds' trajectory.
    """
    from tqdm.auto import tqdm

    seed = cfg.seed if run_seed is None else run_seed
    seed_everything(seed)
    epochs = epochs or cfg.epochs
    run = _start_run(cfg, train_ds, seed, max(cfg.epochs, epochs))
    val = val_ds.arrays() if val_ds is not None else None
    es = cfg.early_stopping
    best = _Checkpoint()
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=label, unit="epoch", disable=None, leave=False)
    epoch = 0
    for epoch in bar:
        t0 = time.perf_counter()
        train_ds.set_epoch(epoch)
        train_loss = _train_epoch(run)
        record: dict[str, Any] = {
            "run": label, "epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": train_loss,
        }
        if val is not None:
            prob = _validate(run, val, cfg.batch_size, record)
            score = record["val_f1_best" if es.monitor == "f1_best" else "val_f1"]
            if run.plateau is not None:
                run.plateau.step(score)
            best.offer(es, score, epoch + 1, run.kept, prob)
        if run.scheduler is not None:
            run.scheduler.step()
        record["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        if log_file is not None:
            log_file.write(record)
        bar.set_postfix({k: round(v, 3) for k, v in record.items() if k in ("train_loss", "val_f1_best")})
        if val is not None and best.exhausted(es, epoch + 1):
            log.info("%s: early stop after epoch %d (best %d, %s %.3f)", label, epoch + 1, best.epoch, es.monitor,
                     best.score)
            break
    bar.close()
    if val is None:
        best.state, best.epoch = copy.deepcopy(run.kept.state_dict()), epoch + 1
    assert best.state is not None
    return FitResult(state=best.state, best_epoch=best.epoch, epochs_run=epoch + 1, history=history,
                     val_prob=best.prob, seconds=time.perf_counter() - start)
