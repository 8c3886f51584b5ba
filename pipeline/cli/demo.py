"""``python -m pipeline demo-data``: write the built-in synthetic demo input."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.demo.write import write_demo_data


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m pipeline demo-data``."""
    parser.add_argument("out_dir", type=Path, help="directory to write (must be new or empty unless --force)")
    parser.add_argument("--size", type=int, default=1020,
                        help="scene side in 10 m pixels, a multiple of 6 (default: 1020, about 10 km)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    parser.add_argument("--product", choices=("L2A", "L1C"), default="L2A", help="product level (default: L2A)")
    parser.add_argument("--baseline", default="05.10",
                        help="processing baseline; 04.00 and later carry the -1000 DN offset (default: 05.10)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty directory")


def cli_demo(args: argparse.Namespace) -> int:
    """Run ``demo-data``: write the demo input and print what was written."""
    try:
        paths = write_demo_data(
            args.out_dir, size=args.size, seed=args.seed, product=args.product,
            baseline=args.baseline, force=args.force,
        )
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Sentinel-2 product: {paths.safe}")
    print(f"DEM (EPSG:4326):    {paths.dem}")
    print(f"truth mask:         {paths.truth_mask}")
    print(f"truth polygons:     {paths.truth_scars}")
    print(f"scene config:       {paths.scene_yaml}")
    print(f"run it with:        python -m pipeline run {paths.scene_yaml}")
    return 0
