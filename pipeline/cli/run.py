"""``python -m pipeline run scene.yaml``: one scene, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.core.config import load_scene_config
from pipeline.run.folder import REPORT_HTML
from pipeline.run.scene import run_scene


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="scene YAML file")
    parser.add_argument("--force", action="store_true", help="recompute even if outputs for this run exist")
    parser.add_argument("--save-stack", action="store_true", help="also write the stacked channels as a COG")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="override model.device")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler (overrides dask.scheduler)")


def cli_run(args: argparse.Namespace) -> int:
    cfg = load_scene_config(args.config)
    updates: dict[str, Any] = {}
    if args.save_stack:
        updates["output"] = cfg.output.model_copy(update={"save_stack": True})
    if args.device:
        updates["model"] = cfg.model.model_copy(update={"device": args.device})
    if args.scheduler:
        updates["dask"] = cfg.dask.model_copy(update={"scheduler": args.scheduler})
    if updates:
        cfg = cfg.model_copy(update=updates)
    res = run_scene(cfg, force=args.force)
    if res.status == "skipped":
        print(f"{res.scene_id}: already up to date ({res.run_dir}); nothing to do. Use --force to recompute.")
    else:
        print(f"outputs: {res.run_dir}")
        print(f"  GeoPackage: {res.geopackage}")
    page = res.run_dir / REPORT_HTML
    if page.is_file():
        print(f"  report: {page} (python -m pipeline view {res.run_dir})")
    print(
        f"{res.scene_id}: {res.n_polygons} landslide polygon(s), "
        f"{res.total_area_m2 / 1e4:.2f} ha, {res.seconds:.1f} s"
    )
    if cfg.reference is not None:
        from pipeline.training.evaluate import evaluate_objects

        ref = cfg.reference
        m = evaluate_objects(res.geopackage, ref.path, ref.iou, inventory_layer=ref.layer)
        print(f"against {ref.path.name} (IoU >= {ref.iou:g}): object recall {m['recall']:.2f} "
              f"({m['matched']} of {m['references']} references found), precision {m['precision']:.2f} "
              f"({m['matched']} of {m['detections']} detections match)")
    return 0
