"""Evaluation: the rows of the comparison table, and object metrics of a scene output.

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

The rows go to one comparison table (:mod:`pipeline.training.comparison`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import InputError
from pipeline.training.comparison import Row
from pipeline.training.patch_readers import PatchFormat

if TYPE_CHECKING:
    from pipeline.model.artefact import ModelArtefact
    from pipeline.training.baseline import RandomForestConfig, SVMConfig
    from pipeline.training.config import TrainConfig
    from pipeline.training.datasets import PatchDataset
    from pipeline.training.patch_files import PatchRecord


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
    from pipeline.training.predict import predict_probabilities

    if art.module is None:
        raise InputError(f"{art.path}: artefact is not loaded (use pipeline.model.artefact.load_artefact)")
    ds = PatchDataset(records, art.channels, art.normalization, patch_format=PatchFormat(source_channels))
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
# Cross-validated recipes and the per-pixel baselines
# --------------------------------------------------------------------------
def cross_validate_config(
    cfg: TrainConfig, records: Sequence[PatchRecord], folds: list[list[int]], name: str | None = None,
) -> Row:
    """Cross-validate a training config on ``records`` with the given folds."""
    from pipeline.training.cross_validation import cross_validate
    from pipeline.training.datasets import make_dataset

    ds = make_dataset(cfg, records)
    res = cross_validate(cfg, ds, folds)
    m = dict(res.metrics)
    return _row_from_metrics(
        name or cfg.model.name, "recipe", f"{len(folds)}-fold CV (same folds)", cfg.model.channels, m,
        note=f"{cfg.model.architecture} {cfg.model.encoder or ''}, {cfg.loss.name}".strip(),
        extra={"metrics": m, "seconds": res.seconds, "oof_prob": res.oof_prob},
    )


#: A training spec: the statistics come from the baseline's own training patches.
_UNRESOLVED = {"method": "fixed", "clip": 10.0}


def _baseline_trained(
    records: Sequence[PatchRecord], channels: Sequence[str], train_records: Sequence[PatchRecord],
    cfg: RandomForestConfig | SVMConfig, fmt: PatchFormat,
) -> dict[str, Any]:
    """Metrics of a baseline trained on ``train_records`` and scored on ``records``."""
    from pipeline.training.baseline import fit_predict
    from pipeline.training.datasets import PatchDataset
    from pipeline.training.metrics import pixel_metrics

    # large training sets (the full Landslide4Sense train split) are streamed, not cached
    train = PatchDataset(train_records, channels, dict(_UNRESOLVED), patch_format=fmt,
                         cache=len(train_records) <= 500)
    test = PatchDataset(records, channels, train.normalization, patch_format=fmt)
    prob, model = fit_predict(train, test, cfg)
    _, y, v = test.arrays()
    return pixel_metrics(prob, y, v, model.threshold)


def _baseline_cross_validated(ds: PatchDataset, folds: list[list[int]], cfg: RandomForestConfig | SVMConfig
                              ) -> dict[str, Any]:
    """Metrics of a baseline cross-validated on ``folds``, each fold at its own out-of-sample threshold."""
    from pipeline.training.baseline import fit_predict
    from pipeline.training.metrics import pixel_metrics

    _, y, v = ds.arrays()
    prob = np.zeros(y.shape, np.float32)
    thresholds = np.zeros(y.shape, np.float32)
    for held in folds:
        train = ds.subset([i for i in range(len(ds)) if i not in set(held)], normalization=dict(_UNRESOLVED))
        prob[held], model = fit_predict(train, ds.subset(held, normalization=train.normalization), cfg)
        thresholds[held] = model.threshold
    # each fold is thresholded at its own out-of-sample threshold: compare to 0/1 at 0.5
    binary = (prob >= thresholds).astype(np.float32)
    m = pixel_metrics(binary, y, v, 0.5)
    m["threshold"] = float(np.mean([thresholds[h[0]].flat[0] for h in folds]))
    return m


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
    from pipeline.training.baseline import RandomForestConfig, SVMConfig
    from pipeline.training.datasets import PatchDataset

    cfg = config or RandomForestConfig()
    fmt = PatchFormat(source_channels, units)
    if train_records is not None:
        m = _baseline_trained(records, channels, train_records, cfg, fmt)
        protocol = "trained on the training set"
    else:
        if folds is None:
            raise ValueError("give folds or train_records")
        ds = PatchDataset(records, channels, dict(_UNRESOLVED), patch_format=fmt)
        m = _baseline_cross_validated(ds, folds, cfg)
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
    from pipeline.training.polygon_files import read_polygons

    det = read_polygons(detections, detections_layer)
    inv = read_polygons(inventory, inventory_layer)
    if clip_bbox is not None:
        inv = inv.cx[clip_bbox[0] : clip_bbox[2], clip_bbox[1] : clip_bbox[3]]
    out = object_metrics(det, inv, iou_threshold)
    out.update(detections_file=str(detections), inventory_file=str(inventory))
    return out
