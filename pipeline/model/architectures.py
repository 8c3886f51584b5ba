"""Names of the segmentation architectures and what each needs of its input, without PyTorch.

The registry itself (:mod:`pipeline.model.registry`) imports PyTorch and
segmentation-models-pytorch, seconds of import time and hundreds of MB. A
run's main process only reads model metadata (which architecture, which
channels, which tile size) and never builds a network, so the names live
here; :func:`pipeline.model.registry.build_model` builds them in the processes that
run the model.
"""

from __future__ import annotations

from pipeline.core.errors import ModelError

PLAIN_UNET = "PlainUnet"

#: segmentation-models-pytorch architectures by their class name (all present in smp 0.6).
SMP_NAMES: tuple[str, ...] = (
    "Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "PAN",
    "DeepLabV3", "DeepLabV3Plus", "UPerNet", "Segformer", "DPT",
)

ARCHITECTURES: tuple[str, ...] = (*SMP_NAMES, PLAIN_UNET)

#: Encoders used by the seed papers (smp names).
SEED_ENCODERS: tuple[str, ...] = (
    "resnet34", "vgg16", "mobilenet_v2", "efficientnet-b0", "mit_b1", "inceptionv4",
    "densenet121", "resnext50_32x4d", "se_resnet50", "se_resnext50_32x4d", "inceptionresnetv2",
)

_BY_LOWER = {name.lower(): name for name in ARCHITECTURES}


def canonical_architecture(name: str) -> str:
    """Registry spelling of an architecture name (case-insensitive, ``-``/``_`` ignored)."""
    key = name.strip().lower()
    found = _BY_LOWER.get(key) or _BY_LOWER.get(key.replace("-", "").replace("_", ""))
    if found is None:
        raise ModelError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    return found


def input_multiple(architecture: str) -> int:
    """Tile edges must be a multiple of this for ``architecture``.

    smp models need multiples of 32; ``PlainUnet`` pads internally and takes any size.
    """
    return 1 if canonical_architecture(architecture) == PLAIN_UNET else 32
