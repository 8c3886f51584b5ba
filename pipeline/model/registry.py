"""Model registry: segmentation networks by name.

:func:`build_model` builds any segmentation-models-pytorch (smp) architecture
by name with ``encoder_weights=None`` (no downloads), plus ``PlainUnet``, a
small classic U-Net without a pretrained encoder. Every model maps
``(N, in_channels, H, W)`` to logits ``(N, classes, H, W)``.

Notes on smp 0.6 (checked with 14 input channels and 128 x 128 inputs):

- All encoders of the seed papers build with ``Unet`` and 14 channels:
  resnet34, vgg16, mobilenet_v2, efficientnet-b0, mit_b1, inceptionv4,
  densenet121, resnext50_32x4d, se_resnet50, se_resnext50_32x4d,
  inceptionresnetv2. For ``in_channels != 3`` smp replaces the first
  convolution with a freshly initialised one; for the Mix Transformer
  (``mit_b*``) that is the 7 x 7, stride 4 convolution of the first patch
  embedding, so 14 channels work there too.
- smp encoders need H and W divisible by 32 (``output_stride``); 128 px tiles
  give a 4 x 4 deepest feature map. ``mit_b*`` encoders start at stride 4
  (the stride-2 skip is an empty placeholder), so a U-Net decoder on
  ``mit_b1`` gets its finest skip at 32 x 32 for 128 px inputs, and the
  attention in the last stage sees only 4 x 4 tokens: it runs, but the
  seed papers' transformer results came from larger inputs.
- ``UnetPlusPlus`` and ``Linknet`` refuse ``mit_b*`` encoders; ``DPT`` accepts
  only timm encoders (``tu-...`` names). These combinations raise
  :class:`ModelError` with smp's reason.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import ModelError
from pipeline.model.architectures import PLAIN_UNET, SEED_ENCODERS, SMP_NAMES, canonical_architecture

log = logging.getLogger(__name__)


def _smp() -> Any:
    """segmentation-models-pytorch, imported on first use: with torchvision it adds seconds to every
    process that imports this module, and the shipped default (``PlainUnet``) does not need it."""
    import segmentation_models_pytorch as smp

    return smp


@functools.cache
def smp_architectures() -> dict[str, type[nn.Module]]:
    """smp architectures by their class name (those this smp version has; see :data:`SMP_NAMES`)."""
    smp = _smp()
    return {name: getattr(smp, name) for name in SMP_NAMES if hasattr(smp, name)}


def build_model(
    architecture: str,
    encoder: str | None,
    in_channels: int,
    classes: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """Build an untrained segmentation model that outputs logits.

    ``architecture`` is an smp class name (``Unet``, ``DeepLabV3Plus``, ...)
    or ``PlainUnet``; ``encoder`` an smp encoder name (ignored and allowed to
    be ``None`` for ``PlainUnet``). Extra ``kwargs`` go to the constructor
    (``decoder_channels``, ``encoder_depth``, ``base_channels`` ...).
    Pretrained weights are never loaded: ``encoder_weights`` other than
    ``None`` is refused.
    """
    arch = canonical_architecture(architecture)
    if in_channels < 1 or classes < 1:
        raise ModelError(f"in_channels and classes must be positive, got {in_channels} and {classes}")
    if kwargs.get("encoder_weights") is not None:
        raise ModelError("encoder_weights must be None: pretrained weights are not downloaded")
    kwargs.pop("encoder_weights", None)
    if arch == PLAIN_UNET:
        if encoder not in (None, "", "none"):
            raise ModelError(f"PlainUnet has no encoder; got encoder={encoder!r} (use null)")
        try:
            return PlainUnet(in_channels, classes, **kwargs)
        except TypeError as exc:
            raise ModelError(f"PlainUnet: bad argument: {exc}") from None
    if not encoder:
        raise ModelError(f"{arch} needs an encoder name, e.g. resnet34; got {encoder!r}")
    smp = _smp()
    if not encoder.startswith("tu-") and encoder not in smp.encoders.get_encoder_names():
        raise ModelError(
            f"unknown encoder {encoder!r} for {arch}; seed-paper encoders: {', '.join(SEED_ENCODERS)}"
        )
    cls = smp_architectures().get(arch)
    if cls is None:
        raise ModelError(f"{arch} is not in the installed segmentation-models-pytorch {smp.__version__}; upgrade it")
    try:
        return cls(
            encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes, **kwargs
        )
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"cannot build {arch} with encoder {encoder!r}: {exc}") from None


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class PlainUnet(nn.Module):
    """Classic U-Net (Ronneberger et al. 2015) with same-padding convolutions.

    ``depth`` down-sampling steps starting at ``base_channels`` features
    (doubling each step), max pooling down, transposed convolutions up,
    skip connections by concatenation. Inputs whose sides are not multiples
    of ``2**depth`` are padded by reflection and the output is cropped back.
    """

    def __init__(self, in_channels: int, classes: int = 1, base_channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ModelError(f"PlainUnet needs depth >= 1 and base_channels >= 1, got {depth}, {base_channels}")
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_DoubleConv(in_channels, widths[0])])
        self.down.extend(_DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.merge = nn.ModuleList(_DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes, H, W)."""
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = up(x)
            x = merge(torch.cat([skips.pop(), x], dim=1))
        out: torch.Tensor = self.head(x)
        return out[..., :h, :w]
