"""The training configuration: the typed sections of a training YAML file and its loader.

Unknown keys are errors and paths are relative to the YAML file (see
``configs/train_default.yaml``; ``docs/configuration.md`` lists every key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.core.channels import L4S_CHANNELS, canonical
from pipeline.core.configbase import CountOrAuto, RelPath, Strict
from pipeline.core.errors import ConfigError
from pipeline.core.yamlio import line_of, load_yaml
from pipeline.training.augmentation import AugmentConfig, RadiometricConfig
from pipeline.training.losses import LossConfig
from pipeline.training.patch_readers import UNITS


class DataSection(Strict):
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


class ModelSection(Strict):
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


class OptimizerSection(Strict):
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


class EarlyStoppingSection(Strict):
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


class CVSection(Strict):
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


class OutputSection(Strict):
    artefact: RelPath
    log: RelPath | None = Field(None, description="per-epoch metrics, JSON lines; default: <artefact>.log.jsonl")
    half_precision: bool = Field(True, description="store weights as float16 (half the file size)")


class TrainConfig(Strict):
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
    num_workers: CountOrAuto = Field(
        "auto",
        description="data loader processes: auto = none on the CPU (the patches are held in memory), up to 4 "
        "on a GPU so that augmentation keeps up with it; 0 = in the training process",
    )
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
