"""``python -m pipeline region region.yaml``: the nightly regional job over many scenes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.core.config import load_region_config
from pipeline.core.errors import OutputError
from pipeline.run.region import run_region


def add_region_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="region YAML file")
    parser.add_argument("--force", action="store_true", help="recompute scenes whose outputs already exist")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler (overrides dask.scheduler)")


def cli_region(args: argparse.Namespace) -> int:
    cfg = load_region_config(args.config)
    if args.scheduler:
        cfg = cfg.model_copy(update={"dask": cfg.dask.model_copy(update={"scheduler": args.scheduler})})
    t0 = time.perf_counter()
    result = run_region(cfg, force=args.force)
    done = sum(o.status == "completed" for o in result.outcomes)
    skipped = sum(o.status == "skipped" for o in result.outcomes)
    print(
        f"region {cfg.name}: {done} scene(s) processed, {skipped} already up to date, "
        f"{len(result.failed)} failed; {result.n_merged} landslide polygon(s) in "
        f"{result.merged or '(no merged layer)'} ({time.perf_counter() - t0:.1f} s)"
    )
    if result.page is not None:
        print(f"  report: {result.page} (python -m pipeline view {result.page.parent})")
    for o in result.failed:
        print(f"  failed: {o.config}: {o.error}")
    if not result.outcomes:
        raise OutputError("no scenes were run")
    return 1 if result.failed else 0
