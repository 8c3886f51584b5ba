"""Landslide probabilities of a network on whole normalized patches (validation and evaluation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


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
