"""``python -m pipeline train``: train a segmentation model from a training YAML file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.training.config import TrainConfig, load_train_config
from pipeline.training.train import train


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m pipeline train``."""
    parser.add_argument("config", type=Path, help="training YAML (see configs/train_default.yaml)")
    parser.add_argument("--output", type=Path, default=None, help="artefact path (overrides output.artefact)")
    parser.add_argument("--epochs", type=int, default=None, help="override epochs")
    parser.add_argument("--seed", type=int, default=None, help="override seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (override)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None, help="override device")


def _with_overrides(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``cfg`` with the values given on the command line."""
    updates: dict[str, Any] = {}
    for key in ("epochs", "seed", "threads", "device"):
        if getattr(args, key, None) is not None:
            updates[key] = getattr(args, key)
    if args.output is not None:
        updates["output"] = cfg.output.model_copy(update={"artefact": args.output.resolve()})
    if updates:
        cfg = TrainConfig.model_validate({**cfg.model_dump(), **updates})
    return cfg


def cli_train(args: argparse.Namespace) -> int:
    """Entry point of ``python -m pipeline train``."""
    cfg = _with_overrides(load_train_config(args.config), args)
    result = train(cfg, source=Path(args.config).resolve())
    m = result.metrics.get("cv", result.metrics)
    micro = m["micro"]
    print(
        f"{result.artefact}: threshold {result.threshold:.3f}; {m['protocol']}: "
        f"F1 {micro['f1']:.3f} precision {micro['precision']:.3f} recall {micro['recall']:.3f} IoU {micro['iou']:.3f}"
    )
    return 0
