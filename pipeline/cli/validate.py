"""``python -m pipeline validate scene.yaml``: check a scene config, its models and inputs without processing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.config import load_scene_config
from pipeline.core.errors import PipelineError
from pipeline.run.validate import skipped_rules, validate_scene

#: Exit status for bad input (config, files, models): the same as ``run`` (``python -m pipeline``
#: exits 2 on a :class:`~pipeline.core.errors.PipelineError`).
BAD_INPUT = 2


def channel_list(text: str) -> list[str]:
    """A comma-separated channel list, as ``--channels`` takes it."""
    return [c.strip() for c in text.split(",") if c.strip()]


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``validate``: the scene config and an optional channel list."""
    parser.add_argument("config", type=Path, help="scene YAML file")
    parser.add_argument("--channels", type=channel_list, default=None,
                        help="comma-separated channels to check (default: channels: in the config, "
                             "else the Landslide4Sense 14 channels)")


def cli_validate(args: argparse.Namespace) -> int:
    """Check a scene config, its model(s) and its inputs; print the problems. Exit code 0 when all is well,
    :data:`BAD_INPUT` (2, as ``run``) for a bad config, model or input.

    Without ``--channels`` (and without ``channels:`` in the config) the
    channels checked are those the configured model(s) need.
    """
    from pipeline.run.plan import model_channels
    from pipeline.run.scene import load_models

    try:
        cfg = load_scene_config(args.config)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    problems: list[str] = []
    channels = args.channels or cfg.channels
    model_note = ""
    models_ok = True
    if channels is None:
        try:
            models = load_models(cfg)  # the weights checked too, before a run
            channels = model_channels(models)
            model_note = " for model " + " + ".join(f"{m.name} ({len(m.channels)} channels)" for m in models)
        except PipelineError as exc:
            problems.append(str(exc))
            models_ok = False
    # without the model its channels are unknown: checking the 14 Landslide4Sense channels instead
    # would add a misleading "cannot supply B10" to the model's own error
    problems += validate_scene(cfg, channels, check_supply=models_ok)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return BAD_INPUT
    for note in skipped_rules(cfg):
        print(f"warning: {note}", file=sys.stderr)
    print(f"{args.config}: OK - inputs readable, georeferenced and overlapping; channels available{model_note}")
    return 0
