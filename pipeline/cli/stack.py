"""``python -m pipeline stack scene.yaml``: stack a scene onto its 10 m grid and write it as a COG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli.validate import BAD_INPUT, channel_list
from pipeline.core.config import load_scene_config
from pipeline.core.errors import PipelineError
from pipeline.stack.layers import save_stack, stack_scene


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stack``: the scene config, the output COG and the channels."""
    parser.add_argument("config", type=Path, help="scene YAML file")
    parser.add_argument("--out", "-o", type=Path, default=None,
                        help="output COG (default: <output.dir>/<scene id>_stack.tif)")
    parser.add_argument("--channels", type=channel_list, default=None,
                        help="comma-separated channels in output order (default: channels: in the "
                             "config, else the Landslide4Sense 14 channels)")


def cli_stack(args: argparse.Namespace) -> int:
    """Stack a scene onto its 10 m grid and write it as a float32 COG (NaN = invalid)."""
    try:
        cfg = load_scene_config(args.config)
        stack = stack_scene(cfg, args.channels)
        out = args.out or cfg.output.dir / f"{stack.scene_id}_stack.tif"
        save_stack(stack, out)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    print(out)
    return 0
