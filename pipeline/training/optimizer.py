"""The optimizer of a training run, its learning-rate schedule and the moving average of its weights.

The schedules are :mod:`torch.optim.lr_scheduler`'s: a linear warm-up over
``warmup_epochs`` followed by a constant rate (``none``), a step decay
(``step``) or a cosine annealing to ``min_lr`` (``cosine``), stepped once per
epoch; ``plateau`` lowers the rate when validation F1 stops improving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
    from torch.optim.swa_utils import AveragedModel

    from pipeline.training.config import OptimizerSection


def build_optimizer(opt: OptimizerSection, module: nn.Module) -> torch.optim.Optimizer:
    """Adam or AdamW over ``module``'s parameters."""
    import torch

    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(module.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def epoch_scheduler(opt: OptimizerSection, optimizer: torch.optim.Optimizer, epochs: int) -> LRScheduler | None:
    """The schedule to step after every epoch of a run of ``epochs``; None when the rate stays
    ``lr`` throughout or follows validation (``plateau``: :func:`plateau_scheduler`)."""
    from torch.optim import lr_scheduler as sched

    if opt.schedule == "plateau":
        return None
    warmup = opt.warmup_epochs
    if not warmup and opt.schedule == "none":
        return None
    schedulers: list[LRScheduler] = []
    if warmup:
        schedulers.append(sched.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1))
    if opt.schedule == "cosine":
        schedulers.append(sched.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup), eta_min=opt.min_lr))
    elif opt.schedule == "step":
        schedulers.append(sched.StepLR(optimizer, step_size=opt.step_size, gamma=opt.gamma))
    else:
        schedulers.append(sched.ConstantLR(optimizer, factor=1.0, total_iters=0))
    if not warmup:
        return schedulers[0]
    return sched.SequentialLR(optimizer, schedulers, milestones=[warmup])


def plateau_scheduler(opt: OptimizerSection, optimizer: torch.optim.Optimizer) -> ReduceLROnPlateau | None:
    """For ``schedule: plateau``: the rate times ``gamma`` after ``plateau_patience`` epochs without a
    better validation score; None for the other schedules."""
    if opt.schedule != "plateau":
        return None
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    return ReduceLROnPlateau(optimizer, mode="max", factor=opt.gamma, patience=opt.plateau_patience)


def weight_average(opt: OptimizerSection, module: nn.Module) -> AveragedModel | None:
    """The exponential moving average of ``module``'s weights and batch-norm statistics
    (``ema_decay``), updated after every step; None when it is off."""
    if opt.ema_decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(opt.ema_decay), use_buffers=True)
