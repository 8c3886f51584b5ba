"""What the tiled inference takes and gives: :class:`InferenceOptions` and the :class:`Prediction`.

Both are plain values: the options come from the ``model`` section of a scene
YAML (:meth:`InferenceOptions.from_config`), the prediction holds lazy Dask
rasters that nothing has computed yet (:func:`pipeline.inference.tiled.predict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import dask.array as da
import xarray as xr

from pipeline.core.errors import ConfigError
from pipeline.core.grid import Grid
from tiling.windows import round_block_size

if TYPE_CHECKING:
    from pipeline.core.config import ModelSection

#: Test-time augmentations: name -> (forward, inverse) on (..., H, W) tensors.
TTA_TRANSFORMS: dict[str, tuple[Any, Any]] = {
    "identity": (lambda t: t, lambda t: t),
    "hflip": (lambda t: t.flip(-1), lambda t: t.flip(-1)),
    "vflip": (lambda t: t.flip(-2), lambda t: t.flip(-2)),
    "rot90": (lambda t: t.rot90(1, (-2, -1)), lambda t: t.rot90(-1, (-2, -1))),
    "rot180": (lambda t: t.rot90(2, (-2, -1)), lambda t: t.rot90(-2, (-2, -1))),
    "rot270": (lambda t: t.rot90(3, (-2, -1)), lambda t: t.rot90(-3, (-2, -1))),
    "transpose": (lambda t: t.transpose(-2, -1), lambda t: t.transpose(-2, -1)),
}
DEFAULT_TTA: tuple[str, ...] = ("identity", "hflip", "vflip", "rot90")


@dataclass(frozen=True)
class InferenceOptions:
    """How :func:`pipeline.inference.tiled.predict` runs. Build it from the YAML with :meth:`from_config`.

    device: auto (CUDA, then MPS, then CPU), cpu, cuda, mps.
    batch_size: windows per forward pass, or auto (device policy); halved on CUDA out-of-memory.
    overlap: pixels shared by neighbouring windows (< tile size); 0 for the fastest run.
    precision: auto (bf16 autocast on CUDA GPUs with native bf16, else fp16; fp32 elsewhere), fp32,
        bf16, fp16. Chunks whose outputs overflow in bf16/fp16 are redone in fp32.
    channels_last: NHWC convolutions; auto follows the device policy.
    tta / tta_transforms: average the model over flips and rotations (names in TTA_TRANSFORMS).
    uncertainty: also return the std across TTA variants and ensemble members.
    ensemble / weights: combine several models by weighted mean or weighted vote.
    block_size: output block edge in pixels (rounded down to a multiple of the stride).
    blend_margin: zero-weight pixels at interior window edges (default overlap // 4).
    torch_threads: set torch's intra-op threads once per process (default: leave as is).
    """

    device: str = "auto"
    batch_size: int | Literal["auto"] = "auto"
    overlap: int = 32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    tta: bool = False
    tta_transforms: tuple[str, ...] = DEFAULT_TTA
    uncertainty: bool = False
    ensemble: Literal["mean", "vote"] = "mean"
    weights: tuple[float, ...] | None = None
    block_size: int = 2048
    blend_margin: int | None = None
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.overlap < 0:
            raise ConfigError(f"model.overlap must be >= 0, got {self.overlap}")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"model.batch_size must be a positive integer or 'auto', got {self.batch_size!r}")
        if self.block_size < 1:
            raise ConfigError(f"grid.block_size must be positive, got {self.block_size}")
        unknown = [t for t in self.tta_transforms if t not in TTA_TRANSFORMS]
        if unknown or not self.tta_transforms:
            raise ConfigError(
                f"test-time augmentations {unknown or '(none)'} are not known; use {', '.join(TTA_TRANSFORMS)}"
            )
        if self.ensemble not in ("mean", "vote"):
            raise ConfigError(f"model.ensemble must be mean or vote, got {self.ensemble!r}")

    @classmethod
    def from_config(cls, section: ModelSection, block_size: int = 2048, **overrides: Any) -> InferenceOptions:
        """Options from the ``model`` section of a scene YAML (and ``grid.block_size``)."""
        values: dict[str, Any] = {
            "device": section.device,
            "batch_size": section.batch_size,
            "overlap": section.overlap,
            "precision": section.precision,
            "tta": section.tta,
            "uncertainty": section.uncertainty,
            "ensemble": section.ensemble,
            "weights": tuple(section.weights) if section.weights is not None else None,
            "block_size": block_size,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def transforms(self) -> tuple[str, ...]:
        """The augmentations each window runs through (identity alone without TTA)."""
        return self.tta_transforms if self.tta else ("identity",)


@dataclass(frozen=True)
class Prediction:
    """The inference stage's output on ``grid``."""

    probability: xr.DataArray  # (y, x) float32 dask, [0, 1], NaN where no valid input
    uncertainty: xr.DataArray | None  # (y, x) float32 std across members/augmentations
    grid: Grid
    threshold: float = 0.5  # decision threshold of the (combined) model
    windows: int = 0  # windows in the global grid (including skipped ones)
    #: input channels passed through unchanged (``keep`` of :func:`~pipeline.inference.tiled.predict`),
    #: same graph as the probability
    layers: dict[str, xr.DataArray] = field(default_factory=dict)
    #: label under which the block tasks report the time spent in the model's forward pass to Dask's
    #: performance metrics (:func:`~pipeline.inference.forward.forward_seconds`); unique per prediction
    meter: str = "model-forward"
    #: ``coarse`` of :func:`~pipeline.inference.tiled.predict`: (channels, rows // factor,
    #: cols // factor) means, or None
    coarse: da.Array | None = None
    coarse_factor: int = 0
    #: the precision the models run in, as far as the main process can tell without PyTorch
    #: (:func:`planned_precision`): ``auto`` when each GPU worker decides (bf16 or fp16);
    #: :func:`~pipeline.inference.forward.precision_figures` says what the workers used
    precision: str = "fp32"


def planned_precision(options: InferenceOptions) -> str:
    """The precision the workers resolve ``options.precision`` to, told without importing PyTorch
    (the rules of :func:`pipeline.model.device.resolve_precision`): the one asked for, or for
    ``auto``: fp32 on the CPU and MPS, ``auto`` where a CUDA worker decides (``device`` cuda, or auto
    on a machine that may have a GPU)."""
    if options.precision != "auto":
        return options.precision
    if options.device in ("cpu", "mps"):
        return "fp32"
    return "auto"


def inference_block_size(block_size: int, tile: int, overlap: int) -> int:
    """The block edge the inference uses: ``block_size`` rounded down to a multiple of the window stride.

    A stack chunked with this size gives each inference block exactly one
    input chunk plus thin strips of its neighbours (read at once through a
    window reader when the inference has one). An overlap outside ``[0, tile)`` is a
    :class:`ConfigError` here, where a run first meets the models' window size, before its cluster
    starts (rather than at inference).
    """
    if not 0 <= overlap < tile:
        raise ConfigError(
            f"model.overlap ({overlap}) must be at least 0 and smaller than the model's window of {tile} px"
        )
    return round_block_size(block_size, tile - overlap)
