"""Evaluation: ``python -m pipeline evaluate``.

* Pixel metrics of model artefacts on a patch set: each artefact reads the
  channels it needs, normalizes them with its own recorded normalization and
  predicts; precision, recall, F1 and IoU pooled over all patches (the
  competition metric) at the artefact's threshold, and per-patch means.
* Training recipes compared on identical folds: every given training config
  is cross-validated on the patch set with the same k folds.
* A Random Forest baseline (:mod:`pipeline.training.baseline`) on the same patches:
  trained on a separate training set when one is given, otherwise
  cross-validated on the same folds.
* Object metrics of a scene output (GeoPackage) against an inventory.

Everything lands in one comparison table, written as Markdown and CSV, plus
a JSON file with the full metrics.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core import fsutil
from pipeline.core.errors import InputError, OutputError

if TYPE_CHECKING:
    from pipeline.model.artefact import ModelArtefact
    from pipeline.training.baseline import RandomForestConfig, SVMConfig
    from pipeline.training.datasets import PatchRecord
    from pipeline.training.fit import TrainConfig

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("name", "kind", "protocol", "channels", "threshold", "precision", "recall", "f1", "iou",
                 "f1_per_patch", "patches", "note")


@dataclass
class Row:
    """One line of the comparison table."""

    name: str
    kind: str
    protocol: str
    channels: str
    threshold: float
    micro: dict[str, float]
    per_patch_f1: float
    patches: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "protocol": self.protocol,
            "channels": self.channels,
            "threshold": self.threshold,
            "precision": self.micro["precision"],
            "recall": self.micro["recall"],
            "f1": self.micro["f1"],
            "iou": self.micro["iou"],
            "f1_per_patch": self.per_patch_f1,
            "patches": self.patches,
            "note": self.note,
        }


def _row_from_metrics(name: str, kind: str, protocol: str, channels: Sequence[str], m: dict[str, Any],
                      note: str = "", extra: dict[str, Any] | None = None) -> Row:
    return Row(
        name=name, kind=kind, protocol=protocol, channels=",".join(channels), threshold=float(m["threshold"]),
        micro=m["micro"], per_patch_f1=float(m["per_patch_mean"]["f1"]), patches=int(m["patches"]),
        note=note, extra=extra or {},
    )


# --------------------------------------------------------------------------
# Pixel metrics of artefacts
# --------------------------------------------------------------------------
def artefact_probabilities(
    art: ModelArtefact,
    records: Sequence[PatchRecord],
    batch_size: int = 16,
    device: str = "cpu",
    source_channels: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, masks, valid), each (N, H, W), of a loaded artefact on labelled patches.

    The artefact's channels are read by name and normalized with the
    artefact's own normalization spec; invalid pixels get probability 0.
    """
    from pipeline.training.datasets import PatchDataset
    from pipeline.training.fit import predict_probabilities

    if art.module is None:
        raise InputError(f"{art.path}: artefact is not loaded (use pipeline.model.artefact.load_artefact)")
    ds = PatchDataset(records, art.channels, art.normalization, source_channels=source_channels)
    x, y, v = ds.arrays()
    prob = predict_probabilities(art.module, x, batch_size, device)
    prob[~v] = 0.0
    return prob, y, v


def evaluate_artefact(
    path: Path, records: Sequence[PatchRecord], checksum: str, batch_size: int = 16, device: str = "cpu",
    source_channels: Sequence[str] | None = None,
) -> Row:
    """Table row of one artefact on labelled patches at the artefact's threshold."""
    from pipeline.model.artefact import load_artefact
    from pipeline.training.metrics import pixel_metrics

    art = load_artefact(path, device=device)
    prob, y, v = artefact_probabilities(art, records, batch_size, device, source_channels)
    m = pixel_metrics(prob, y, v, art.threshold)
    note = ""
    trained_on = (art.training.get("data") or {}).get("checksum_sha256")
    if trained_on and trained_on == checksum:
        note = "evaluated on its own training patches (not a test score)"
    cv = art.metrics.get("cv", {}).get("micro", {}).get("f1") if isinstance(art.metrics.get("cv"), dict) else None
    if cv is not None:
        note = (note + "; " if note else "") + f"recorded CV F1 {cv:.3f}"
    return _row_from_metrics(
        art.name or path.stem, "model", "artefact on patch set", art.channels, m, note,
        extra={"path": str(path), "sha256": art.sha256, "metrics": m},
    )


# --------------------------------------------------------------------------
# Cross-validated recipes and the Random Forest
# --------------------------------------------------------------------------
def shared_folds(records: Sequence[PatchRecord], folds: int, seed: int) -> list[list[int]]:
    """The k folds every compared method uses (stratified by landslide fraction)."""
    from pipeline.training.datasets import read_mask
    from pipeline.training.fit import kfold_indices

    fractions = []
    for r in records:
        if r.mask is None:
            raise InputError(f"{r.image}: patch has no mask; evaluation needs labelled patches")
        fractions.append(float(read_mask(r.mask)[0].mean()))
    return kfold_indices(fractions, folds, seed)


def cross_validate_config(
    cfg: TrainConfig, records: Sequence[PatchRecord], folds: list[list[int]], name: str | None = None,
) -> Row:
    """Cross-validate a training config on ``records`` with the given folds."""
    from pipeline.training.fit import cross_validate, make_dataset

    ds = make_dataset(cfg, records)
    res = cross_validate(cfg, ds, folds)
    m = dict(res.metrics)
    return _row_from_metrics(
        name or cfg.model.name, "recipe", f"{len(folds)}-fold CV (same folds)", cfg.model.channels, m,
        note=f"{cfg.model.architecture} {cfg.model.encoder or ''}, {cfg.loss.name}".strip(),
        extra={"metrics": m, "seconds": res.seconds, "oof_prob": res.oof_prob},
    )


def baseline_row(
    records: Sequence[PatchRecord],
    channels: Sequence[str],
    folds: list[list[int]] | None = None,
    train_records: Sequence[PatchRecord] | None = None,
    config: RandomForestConfig | SVMConfig | None = None,
    source_channels: Sequence[str] | None = None,
    units: str | None = None,
) -> Row:
    """A per-pixel baseline (Random Forest, or SVM with an :class:`SVMConfig`): trained on
    ``train_records`` or cross-validated on ``folds``.

    Features are normalized with the statistics of the baseline's own training patches (each
    fold's in cross-validation), as the networks are.
    """
    from pipeline.training.baseline import RandomForestConfig, SVMConfig, fit_predict
    from pipeline.training.datasets import PatchDataset
    from pipeline.training.metrics import pixel_metrics

    cfg = config or RandomForestConfig()
    unresolved = {"method": "fixed", "clip": 10.0}
    if train_records is not None:
        # large training sets (the full Landslide4Sense train split) are streamed, not cached
        train = PatchDataset(train_records, channels, unresolved, source_channels=source_channels,
                             cache=len(train_records) <= 500, units=units)
        test = PatchDataset(records, channels, train.normalization, source_channels=source_channels, units=units)
        prob, model = fit_predict(train, test, cfg)
        _, y, v = test.arrays()
        m = pixel_metrics(prob, y, v, model.threshold)
        protocol = "trained on the training set"
    else:
        if folds is None:
            raise ValueError("give folds or train_records")
        ds = PatchDataset(records, channels, unresolved, source_channels=source_channels, units=units)
        _, y, v = ds.arrays()
        prob = np.zeros(y.shape, np.float32)
        thresholds = np.zeros(y.shape, np.float32)
        for held in folds:
            train = ds.subset([i for i in range(len(ds)) if i not in set(held)], normalization=unresolved)
            prob[held], model = fit_predict(train, ds.subset(held, normalization=train.normalization), cfg)
            thresholds[held] = model.threshold
        # each fold is thresholded at its own out-of-sample threshold: compare to 0/1 at 0.5
        binary = (prob >= thresholds).astype(np.float32)
        m = pixel_metrics(binary, y, v, 0.5)
        m["threshold"] = float(np.mean([thresholds[h[0]].flat[0] for h in folds]))
        protocol = f"{len(folds)}-fold CV (same folds)"
    svm = isinstance(cfg, SVMConfig)
    detail = f"RBF kernel, C {cfg.C:g}" if svm else f"{cfg.n_estimators} trees"
    return _row_from_metrics(
        "svm" if svm else "random forest", "baseline", protocol, channels, m,
        note="per-pixel bands + NDVI" + (" + terrain" if {"SLOPE", "DEM"} & set(channels) else "")
        + f", {detail}, {cfg.pixels_per_patch} px/patch, out-of-sample threshold",
        extra={"metrics": m},
    )


# --------------------------------------------------------------------------
# Object metrics
# --------------------------------------------------------------------------
def read_polygons(path: Path, layer: str | None = None) -> Any:
    """Read a polygon file (GeoPackage, shapefile, zipped shapefile) as a GeoDataFrame.

    Reading leaves nothing beside the file: GDAL would write the GeoPackage's dataset metadata to a
    ``.aux.xml`` sidecar on closing it (its persistent auxiliary metadata, switched off here).
    """
    import geopandas as gpd

    target = _vector_source(Path(path))
    with _no_sidecars():
        try:
            if layer is None:
                layer = _polygon_layer(path, target)
            return gpd.read_file(target, layer=layer) if layer else gpd.read_file(target)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyogrio raises many types
            raise InputError(f"{path}: cannot read polygons: {exc}") from None


@contextmanager
def _no_sidecars() -> Iterator[None]:
    """GDAL's persistent auxiliary metadata (``.aux.xml`` files) off while the block runs."""
    import pyogrio

    before = pyogrio.get_gdal_config_option("GDAL_PAM_ENABLED")
    pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": "NO"})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": before})


#: Tables GIS tools keep beside the data in a GeoPackage (QGIS stores layer styles here).
_NON_DATA_LAYERS = {"layer_styles"}


def _polygon_layer(path: Path, target: str) -> str | None:
    """The one data layer of a multi-layer source (our GeoPackages hold ``landslides`` plus the
    QGIS style table); None to let GDAL pick when there is only one layer."""
    import pyogrio

    layers = pyogrio.list_layers(target)
    if len(layers) <= 1:
        return None
    data = [str(name) for name, geometry in layers if name not in _NON_DATA_LAYERS and geometry is not None]
    if len(data) == 1:
        return data[0]
    raise InputError(
        f"{path}: holds several layers ({', '.join(str(n) for n, _ in layers)}); "
        "choose one with --detections-layer / --inventory-layer"
    )


def _vector_source(path: Path) -> str:
    """GDAL name of ``path``; ``archive.zip/dir/file.shp`` reads a member of a zip archive."""
    text = str(path)
    if text.startswith("/vsi"):
        return text
    if path.exists() and path.suffix.lower() != ".zip":
        return text
    if path.exists():
        import zipfile

        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.lower().endswith((".shp", ".gpkg", ".geojson"))]
        if len(members) == 1:
            return f"/vsizip/{path}/{members[0]}"
        raise InputError(
            f"{path}: the archive holds {len(members)} vector files; name one as {path}/<member>, "
            f"e.g. {path}/{members[0] if members else 'layer.shp'}"
        )
    for parent in path.parents:
        if parent.suffix.lower() == ".zip" and parent.is_file():
            return f"/vsizip/{parent}/{path.relative_to(parent).as_posix()}"
    raise InputError(f"{path}: vector file not found")


def evaluate_objects(
    detections: Path, inventory: Path, iou_threshold: float = 0.5,
    detections_layer: str | None = None, inventory_layer: str | None = None,
    clip_bbox: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Object metrics of a detection file against an inventory file.

    ``clip_bbox`` (minx, miny, maxx, maxy in the inventory CRS) restricts the
    inventory to the mapped area.
    """
    from pipeline.training.metrics import object_metrics

    det = read_polygons(detections, detections_layer)
    inv = read_polygons(inventory, inventory_layer)
    if clip_bbox is not None:
        inv = inv.cx[clip_bbox[0] : clip_bbox[2], clip_bbox[1] : clip_bbox[3]]
    out = object_metrics(det, inv, iou_threshold)
    out.update(detections_file=str(detections), inventory_file=str(inventory))
    return out


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    """The comparison table as Markdown."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        cells = r.cells()
        lines.append("| " + " | ".join(_fmt(cells[c]).replace("|", "/") for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row]) -> str:
    """The comparison table as CSV (full precision)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.cells())
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = fsutil.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {exc}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not isinstance(v, np.ndarray)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_tables(rows: Sequence[Row], out_dir: Path, objects: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write comparison.md, comparison.csv and metrics.json into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    md = markdown_table(rows)
    if objects:
        md += "\nObject metrics (IoU >= {:.2f}):\n\n".format(objects["iou_threshold"])
        md += "| " + " | ".join(k for k in objects if isinstance(objects[k], int | float)) + " |\n"
        md += "|" + "---|" * sum(isinstance(v, int | float) for v in objects.values()) + "\n"
        md += "| " + " | ".join(_fmt(v) for v in objects.values() if isinstance(v, int | float)) + " |\n"
    paths = {"markdown": out_dir / "comparison.md", "csv": out_dir / "comparison.csv", "json": out_dir / "metrics.json"}
    _atomic_write(paths["markdown"], md)
    _atomic_write(paths["csv"], csv_table(rows))
    payload = {"rows": [{**r.cells(), "details": _jsonable(r.extra)} for r in rows], "objects": objects}
    _atomic_write(paths["json"], json.dumps(_jsonable(payload), indent=1, sort_keys=True))
    return paths


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
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


def cli_evaluate(args: argparse.Namespace) -> int:
    """Entry point of ``python -m pipeline evaluate``."""
    from pipeline.training.baseline import RandomForestConfig, SVMConfig
    from pipeline.core.channels import L4S_CHANNELS
    from pipeline.training.datasets import data_checksum, find_patches

    if args.patches is None and args.detections is None:
        raise InputError("nothing to evaluate: give --patches (pixel metrics) and/or --detections + --inventory")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    source = _split(args.source_channels)
    if args.patches is not None:
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
            from pipeline.training.fit import load_train_config

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
    objects = None
    if args.detections is not None:
        if args.inventory is None:
            raise InputError("--detections needs --inventory (reference polygons)")
        objects = evaluate_objects(args.detections, args.inventory, args.iou, args.detections_layer,
                                   args.inventory_layer, args.clip_bbox)
    paths = write_tables(rows, args.out_dir, objects)
    if rows:
        print(markdown_table(rows), end="")
    if objects:
        print(f"objects: precision {objects['precision']:.3f} recall {objects['recall']:.3f} "
              f"F1 {objects['f1']:.3f} (IoU >= {objects['iou_threshold']:.2f}; "
              f"{objects['matched']} of {objects['detections']} detections / {objects['references']} references)")
    print(f"wrote {paths['markdown']}, {paths['csv']}, {paths['json']}")
    return 0
