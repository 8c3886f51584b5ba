"""``python -m pipeline evaluate``: pixel and object metrics, written as one comparison table.

Model artefacts, cross-validated training recipes and per-pixel baselines are
scored on a labelled patch set (:mod:`pipeline.training.evaluate`); a scene
output is scored against an inventory. The table goes to Markdown, CSV and a
JSON file with the full metrics (:mod:`pipeline.training.comparison`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.training.comparison import Row, markdown_table, write_tables
from pipeline.training.evaluate import (
    baseline_row,
    cross_validate_config,
    evaluate_artefact,
    evaluate_objects,
)

log = logging.getLogger(__name__)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m pipeline evaluate``."""
    g = parser.add_argument_group("pixel metrics on patches")
    g.add_argument("--patches", type=Path, help="labelled patches: Landslide4Sense root or folder with img/ + mask/")
    g.add_argument("--split", default=None, help="split of --patches (train, valid, test); default: the folder itself")
    g.add_argument("--model", type=Path, nargs="+", default=[], help="model artefact(s) to evaluate")
    g.add_argument("--recipe", type=Path, nargs="+", default=[],
                   help="training config(s) to cross-validate on --patches with shared folds")
    g.add_argument("--baseline", choices=["rf", "svm", "none"], nargs="+", default=["rf", "svm"],
                   help="per-pixel baseline rows: Random Forest, RBF SVM (default both), or none")
    g.add_argument("--baseline-channels", default=None,
                   help="comma-separated channels of the baselines (default: the first model's or all 14)")
    g.add_argument("--train-patches", type=Path, default=None,
                   help="train the baselines here instead of cross-validating them on --patches")
    g.add_argument("--train-split", default=None, help="split of --train-patches")
    g.add_argument("--source-channels", default=None, help="comma-separated names of unnamed GeoTIFF chip bands")
    g.add_argument("--units", choices=["physical", "dn", "l4s"], default=None,
                   help="units of GeoTIFF chips (default: their UNITS tag, else physical; .h5 patches are l4s)")
    g.add_argument("--folds", type=int, default=5, help="folds for recipes and the baselines (default 5)")
    g.add_argument("--seed", type=int, default=0, help="fold assignment and baseline seed")
    g.add_argument("--rf-trees", type=int, default=200, help="Random Forest trees (default 200)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--device", default="cpu", help="torch device for the models (default cpu)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o = parser.add_argument_group("object metrics of a scene output")
    o.add_argument("--detections", type=Path, default=None, help="detected polygons (GeoPackage from `run`)")
    o.add_argument("--detections-layer", default=None)
    o.add_argument("--inventory", type=Path, default=None, help="reference polygons (GeoPackage, shapefile, .zip)")
    o.add_argument("--inventory-layer", default=None)
    o.add_argument("--iou", type=float, default=0.5, help="IoU to match a detection to a reference (default 0.5)")
    o.add_argument("--clip-bbox", type=float, nargs=4, default=None, metavar=("MINX", "MINY", "MAXX", "MAXY"),
                   help="restrict the inventory to this box (inventory CRS)")
    parser.add_argument("--out-dir", type=Path, default=Path("evaluation"),
                        help="where comparison.md, comparison.csv, metrics.json go (default ./evaluation)")


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _pixel_rows(args: argparse.Namespace) -> list[Row]:
    """The table rows of the models, recipes and baselines on ``--patches``."""
    from pipeline.core.channels import L4S_CHANNELS
    from pipeline.training.baseline import RandomForestConfig, SVMConfig
    from pipeline.training.config import load_train_config
    from pipeline.training.folds import shared_folds
    from pipeline.training.patch_files import data_checksum, find_patches

    rows: list[Row] = []
    source = _split(args.source_channels)
    records = find_patches(args.patches, args.split, require_masks=True)
    checksum = data_checksum(records)
    log.info("evaluating on %d patches from %s", len(records), args.patches)
    first_channels: list[str] | None = None
    for path in args.model:
        row = evaluate_artefact(path, records, checksum, args.batch_size, args.device, source)
        rows.append(row)
        first_channels = first_channels or row.channels.split(",")
    folds = None
    baselines = [b for b in args.baseline if b != "none"]
    if args.recipe or (baselines and args.train_patches is None):
        folds = shared_folds(records, args.folds, args.seed)
    for cfg_path in args.recipe:
        cfg = load_train_config(cfg_path)
        rows.append(cross_validate_config(cfg, records, folds or [], name=Path(cfg_path).stem))
    channels = _split(args.baseline_channels) or first_channels or list(L4S_CHANNELS)
    train_records = (
        find_patches(args.train_patches, args.train_split, require_masks=True)
        if args.train_patches is not None and baselines else None
    )
    for kind in baselines:
        config = (RandomForestConfig(n_estimators=args.rf_trees, seed=args.seed) if kind == "rf"
                  else SVMConfig(seed=args.seed))
        rows.append(baseline_row(records, channels, folds, train_records, config, source, args.units))
    return rows


def _object_metrics(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.detections is None:
        return None
    if args.inventory is None:
        raise InputError("--detections needs --inventory (reference polygons)")
    return evaluate_objects(args.detections, args.inventory, args.iou, args.detections_layer,
                            args.inventory_layer, args.clip_bbox)


def cli_evaluate(args: argparse.Namespace) -> int:
    """Entry point of ``python -m pipeline evaluate``."""
    if args.patches is None and args.detections is None:
        raise InputError("nothing to evaluate: give --patches (pixel metrics) and/or --detections + --inventory")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = _pixel_rows(args) if args.patches is not None else []
    objects = _object_metrics(args)
    paths = write_tables(rows, args.out_dir, objects)
    if rows:
        print(markdown_table(rows), end="")
    if objects:
        print(f"objects: precision {objects['precision']:.3f} recall {objects['recall']:.3f} "
              f"F1 {objects['f1']:.3f} (IoU >= {objects['iou_threshold']:.2f}; "
              f"{objects['matched']} of {objects['detections']} detections / {objects['references']} references)")
    print(f"wrote {paths['markdown']}, {paths['csv']}, {paths['json']}")
    return 0
