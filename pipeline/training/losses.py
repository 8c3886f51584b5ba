"""Segmentation losses for one landslide logit per pixel.

All losses take ``logits`` (N, 1, H, W), ``target`` (N, 1, H, W) in {0, 1}
and an optional ``valid`` (N, 1, H, W) bool mask; invalid pixels do not
contribute. Names used in training configs:

* ``bce`` — binary cross-entropy (two-class cross-entropy with one logit);
* ``wbce`` — weighted BCE, landslide pixels weighted by ``pos_weight``
  (a number, or ``"auto"``: negatives/positives of the training masks, capped);
* ``dice`` — soft Dice loss pooled over the batch;
* ``wbce_dice`` — ``bce_weight * wbce + dice_weight * dice`` (the seed papers' combination);
* ``focal`` — binary focal loss (``alpha``, ``gamma``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.core.errors import ConfigError

LossName = Literal["bce", "ce", "wbce", "dice", "wbce_dice", "focal"]


class LossConfig(BaseModel):
    """Loss choice and parameters (the ``loss`` section of a training config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: LossName = "wbce_dice"
    pos_weight: float | Literal["auto"] = Field("auto", description="landslide pixel weight for wbce")
    max_pos_weight: float = Field(10.0, gt=0, description="cap for pos_weight='auto'")
    bce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    focal_alpha: float = Field(0.75, ge=0, le=1, description="weight of the landslide class in focal loss")
    focal_gamma: float = Field(2.0, ge=0)
    smooth: float = Field(1.0, ge=0, description="Dice smoothing")


def _prepare(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    target = target.to(logits.dtype)
    if valid is None:
        weight = torch.ones_like(logits)
    else:
        if valid.dim() == logits.dim() - 1:
            valid = valid.unsqueeze(1)
        weight = valid.to(logits.dtype)
    return logits, target, weight


def _mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def bce_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, pos_weight: float = 1.0
) -> torch.Tensor:
    """(Weighted) binary cross-entropy averaged over valid pixels.

    With ``pos_weight`` w the loss of a landslide pixel is multiplied by w
    (torch's ``pos_weight`` convention); the mean is over valid pixels.
    """
    logits, target, weight = _prepare(logits, target, valid)
    pw = torch.tensor(float(pos_weight), dtype=logits.dtype, device=logits.device)
    values = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
    return _mean(values, weight)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss, 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s), pooled over the batch."""
    logits, target, weight = _prepare(logits, target, valid)
    prob = torch.sigmoid(logits) * weight
    target = target * weight
    inter = (prob * target).sum()
    denom = prob.sum() + target.sum()
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Binary focal loss: -a_t (1 - p_t)^gamma log(p_t), averaged over valid pixels."""
    logits, target, weight = _prepare(logits, target, valid)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * target + (1 - prob) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return _mean(a_t * (1 - p_t).pow(gamma) * ce, weight)


class SegmentationLoss(nn.Module):
    """Callable loss built from a :class:`LossConfig`; ``pos_weight`` resolved to a number."""

    def __init__(self, cfg: LossConfig, pos_weight: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.pos_weight = float(pos_weight)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.cfg
        if c.name in ("bce", "ce"):
            return bce_loss(logits, target, valid)
        if c.name == "wbce":
            return bce_loss(logits, target, valid, self.pos_weight)
        if c.name == "dice":
            return dice_loss(logits, target, valid, c.smooth)
        if c.name == "wbce_dice":
            return c.bce_weight * bce_loss(logits, target, valid, self.pos_weight) + c.dice_weight * dice_loss(
                logits, target, valid, c.smooth
            )
        if c.name == "focal":
            return focal_loss(logits, target, valid, c.focal_alpha, c.focal_gamma)
        raise ConfigError(f"loss.name: unknown loss {c.name!r}")  # pragma: no cover


def auto_pos_weight(positives: int, negatives: int, cap: float = 10.0) -> float:
    """negatives / positives, limited to [1, cap] (1 when there are no positives)."""
    if positives <= 0:
        return 1.0
    return float(min(max(negatives / positives, 1.0), cap))


def build_loss(cfg: LossConfig, positives: int = 0, negatives: int = 0) -> SegmentationLoss:
    """Build the loss; ``positives``/``negatives`` (pixel counts) resolve ``pos_weight: auto``."""
    if cfg.pos_weight == "auto":
        pw = auto_pos_weight(positives, negatives, cfg.max_pos_weight)
    else:
        pw = float(cfg.pos_weight)
    return SegmentationLoss(cfg, pw)
