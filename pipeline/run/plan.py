"""A scene run's plan: every value derived from the config, models and stack, resolved once.

Stages receive the :class:`ScenePlan` and read it; none re-derives or re-validates what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import SceneConfig
from pipeline.core.grid import Grid
from pipeline.run import folder


@dataclass(frozen=True)
class ScenePlan:
    """What one scene run does and where it writes."""

    cfg: SceneConfig
    #: The model artefacts' metadata (weights are loaded by the workers).
    models: tuple[Any, ...]
    #: The run's fingerprint (:func:`pipeline.run.fingerprint.run_fingerprint`).
    key: str
    scene_id: str
    grid: Grid
    #: The inference block edge: ``grid.block_size`` rounded down to a multiple of the window stride.
    block: int
    #: The scene's processing level (``L1C``/``L2A``), None when unknown.
    level: str | None
    #: The decision threshold: ``postprocess.threshold``, else the model's or the ensemble's.
    threshold: float
    #: The layers the attributes and rules read (slope, DEM, rule bands), in order.
    wanted: tuple[str, ...]
    #: Of :attr:`wanted`, those the model stack reads: they travel with the probability.
    keep: tuple[str, ...]
    run_dir: Path
    gpkg_path: Path

    @property
    def context(self) -> dict[str, Any]:
        """The values every polygon carries about its run (see :mod:`postprocess.attributes`)."""
        return {
            "model_name": "+".join(m.name for m in self.models),
            "model_sha256": ",".join(m.sha256 for m in self.models),
        }


def model_channels(models: Any) -> list[str]:
    """Channels the stack must supply: every member's, first member's order first."""
    return list(dict.fromkeys(c for m in models for c in m.channels))


def inference_block(cfg: SceneConfig, models: Any) -> int:
    """The inference block edge for ``cfg`` and its models (a clear error for a bad overlap)."""
    from pipeline.inference.options import inference_block_size

    return inference_block_size(cfg.grid.block_size, models[0].tile_size, cfg.model.overlap)


def make_plan(cfg: SceneConfig, models: Any, key: str, stack: Any, level: str | None) -> ScenePlan:
    """Resolve the plan of a scene run from its config, models, fingerprint and stack."""
    from pipeline.model.ensemble import ensemble_threshold

    threshold = cfg.postprocess.threshold
    if threshold is None:  # the model's threshold, or the ensemble's combined one (0.5 for a vote)
        threshold = float(ensemble_threshold(models, cfg.model.weights, cfg.model.ensemble))
    rule_bands = [b for bands in cfg.postprocess.rule_bands().values() for b in bands]
    wanted = tuple(dict.fromkeys(["SLOPE", "DEM", *rule_bands]))
    in_stack = {str(b) for b in stack.data.band.values}
    run_dir = folder.run_dir_for(cfg.output.dir, stack.scene_id, key)
    return ScenePlan(
        cfg=cfg, models=tuple(models), key=key, scene_id=stack.scene_id, grid=stack.grid,
        block=inference_block(cfg, models), level=level, threshold=float(threshold), wanted=wanted,
        keep=tuple(c for c in wanted if c in in_stack), run_dir=run_dir,
        gpkg_path=folder.geopackage_path(run_dir, stack.scene_id),
    )
