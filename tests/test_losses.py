"""Segmentation losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.losses import LossConfig, auto_pos_weight, bce_loss, build_loss, dice_loss, focal_loss


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)


def test_bce_of_zero_logits_is_log_two() -> None:
    logits = _t([0.0, 0.0, 0.0, 0.0])
    target = _t([1, 0, 1, 0])
    assert bce_loss(logits, target).item() == pytest.approx(math.log(2), rel=1e-6)


def test_weighted_bce_scales_landslide_pixels_only() -> None:
    logits = _t([2.0, -1.0])
    target = _t([1, 0])
    pos = math.log1p(math.exp(-2.0))  # -log(sigmoid(2))
    neg = math.log1p(math.exp(-1.0))  # -log(1 - sigmoid(-1))
    assert bce_loss(logits, target, pos_weight=3.0).item() == pytest.approx((3 * pos + neg) / 2, rel=1e-6)


def test_invalid_pixels_do_not_contribute() -> None:
    target = _t([1, 0, 1, 0])
    valid = _t([1, 1, 0, 0]).bool()
    a = _t([1.0, -1.0, 5.0, 5.0])
    b = _t([1.0, -1.0, -9.0, 9.0])
    for name in ("bce", "wbce", "dice", "wbce_dice", "focal"):
        loss = build_loss(LossConfig(name=name, pos_weight=2.0))
        assert loss(a, target, valid).item() == pytest.approx(loss(b, target, valid).item(), rel=1e-6), name
        assert loss(a, target).item() != pytest.approx(loss(b, target).item(), rel=1e-6), name


def test_dice_by_hand() -> None:
    # p = 0.5 everywhere, 2 of 4 pixels landslide: inter = 1, sum p = 2, sum t = 2
    logits = _t([0.0, 0.0, 0.0, 0.0])
    target = _t([1, 1, 0, 0])
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 - 2 * 1 / 4)
    assert dice_loss(logits, target, smooth=1.0).item() == pytest.approx(1 - 3 / 5)
    perfect = _t([20.0, 20.0, -20.0, -20.0])
    assert dice_loss(perfect, target, smooth=0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-perfect, target, smooth=0.0).item() == pytest.approx(1.0, abs=1e-6)


def test_focal_with_gamma_zero_is_alpha_weighted_bce() -> None:
    logits = _t([0.3, -1.2, 2.0])
    target = _t([1, 0, 0])
    assert focal_loss(logits, target, alpha=0.5, gamma=0.0).item() == pytest.approx(
        0.5 * bce_loss(logits, target).item(), rel=1e-6
    )
    # easy examples are down-weighted: gamma > 0 lowers the loss
    assert focal_loss(logits, target, alpha=0.5, gamma=2.0).item() < 0.5 * bce_loss(logits, target).item()


def test_combined_loss_is_the_weighted_sum() -> None:
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.8).float()
    cfg = LossConfig(name="wbce_dice", pos_weight=4.0, bce_weight=0.7, dice_weight=0.3)
    expected = 0.7 * bce_loss(logits, target, pos_weight=4.0) + 0.3 * dice_loss(logits, target)
    assert build_loss(cfg)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_auto_pos_weight_is_class_ratio_capped() -> None:
    assert auto_pos_weight(10, 40) == 4.0
    assert auto_pos_weight(1, 1000, cap=10) == 10.0
    assert auto_pos_weight(0, 1000) == 1.0
    assert build_loss(LossConfig(name="wbce", pos_weight="auto"), 10, 30).pos_weight == 3.0


def test_losses_accept_masks_without_channel_axis_and_give_gradients() -> None:
    logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    target = torch.ones(2, 4, 4)
    loss = build_loss(LossConfig(name="wbce_dice", pos_weight=2.0))(logits, target)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and (logits.grad < 0).all()
    with pytest.raises(ValueError, match="shape"):
        bce_loss(logits, torch.ones(2, 1, 3, 3))
