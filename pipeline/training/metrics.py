"""Pixel and object metrics for landslide segmentation.

Pixel metrics follow the Landslide4Sense competition: counts of the landslide
class are pooled over all patches (micro average) before precision, recall,
F1 and IoU are computed. Per-patch scores are reported beside them; a score
whose denominator is zero in a patch (no landslide and no detection) is
undefined there (NaN) and left out of the per-patch mean.

Object metrics compare polygons (a scene output) with an inventory: a
detection and a reference polygon match when their IoU reaches a threshold
(0.5 by default); matching is one-to-one, greedy by decreasing IoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import geopandas as gpd


def _ratio(num: float, den: float, undefined: float) -> float:
    return float(num) / float(den) if den > 0 else undefined


@dataclass(frozen=True)
class Counts:
    """Confusion counts of the landslide class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def precision(self, undefined: float = 0.0) -> float:
        return _ratio(self.tp, self.tp + self.fp, undefined)

    def recall(self, undefined: float = 0.0) -> float:
        return _ratio(self.tp, self.tp + self.fn, undefined)

    def f1(self, undefined: float = 0.0) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, undefined)

    def iou(self, undefined: float = 0.0) -> float:
        return _ratio(self.tp, self.tp + self.fp + self.fn, undefined)

    def scores(self, undefined: float = 0.0) -> dict[str, float]:
        """precision, recall, f1, iou (``undefined`` where a denominator is 0)."""
        return {
            "precision": self.precision(undefined),
            "recall": self.recall(undefined),
            "f1": self.f1(undefined),
            "iou": self.iou(undefined),
        }


def confusion(pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> Counts:
    """Counts over all pixels of boolean ``pred`` vs ``target`` (same shape), valid pixels only."""
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target {target.shape}")
    if valid is None:
        valid = np.ones(pred.shape, dtype=bool)
    valid = np.broadcast_to(np.asarray(valid, dtype=bool), pred.shape)
    tp = int(np.count_nonzero(pred & target & valid))
    fp = int(np.count_nonzero(pred & ~target & valid))
    fn = int(np.count_nonzero(~pred & target & valid))
    tn = int(np.count_nonzero(valid)) - tp - fp - fn
    return Counts(tp, fp, fn, tn)


def pixel_metrics(
    prob: np.ndarray,
    target: np.ndarray,
    valid: np.ndarray | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Pixel metrics of probabilities ``prob`` (N, H, W) at ``threshold`` (landslide if prob >= threshold).

    Returns ``{"threshold", "micro": {precision, recall, f1, iou, tp, fp, fn, tn},
    "per_patch_mean": {...}, "per_patch": [{...}, ...], "patches": N}``.
    Micro scores are the competition metric (0 where undefined).
    """
    prob = np.asarray(prob)
    target = np.asarray(target)
    if prob.ndim == 2:
        prob, target = prob[None], target[None]
        valid = None if valid is None else np.asarray(valid)[None]
    if valid is None:
        valid = np.ones(prob.shape, dtype=bool)
    pred = prob >= threshold
    per_patch = [confusion(pred[i], target[i], valid[i]) for i in range(prob.shape[0])]
    total = sum(per_patch, Counts())
    per_scores = [c.scores(undefined=float("nan")) for c in per_patch]
    means: dict[str, float] = {}
    for key in ("precision", "recall", "f1", "iou"):
        vals = np.array([s[key] for s in per_scores], dtype=float)
        means[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return {
        "threshold": float(threshold),
        "micro": {**total.scores(), **asdict(total)},
        "per_patch_mean": means,
        "per_patch": [{**s, **asdict(c)} for s, c in zip(per_scores, per_patch, strict=True)],
        "patches": int(prob.shape[0]),
    }


# --------------------------------------------------------------------------
# Object metrics
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectMatch:
    """One-to-one matches between detections and reference polygons."""

    pairs: list[tuple[int, int, float]]  # (detection index, reference index, IoU)
    n_detections: int
    n_references: int


def match_objects(
    detections: Sequence[Any], references: Sequence[Any], iou_threshold: float = 0.5
) -> ObjectMatch:
    """Match shapely polygons one-to-one by IoU >= ``iou_threshold``, greedy by decreasing IoU."""
    from shapely import STRtree

    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    dets = [g for g in detections]
    refs = [g for g in references]
    candidates: list[tuple[float, int, int]] = []
    if dets and refs:
        tree = STRtree(refs)
        d_idx, r_idx = tree.query(dets, predicate="intersects")
        for di, ri in zip(d_idx.tolist(), r_idx.tolist(), strict=True):
            d, r = dets[di], refs[ri]
            inter = d.intersection(r).area
            union = d.area + r.area - inter
            iou = inter / union if union > 0 else 0.0
            if iou >= iou_threshold:
                candidates.append((iou, di, ri))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_d: set[int] = set()
    used_r: set[int] = set()
    pairs = []
    for iou, di, ri in candidates:
        if di in used_d or ri in used_r:
            continue
        used_d.add(di)
        used_r.add(ri)
        pairs.append((di, ri, float(iou)))
    return ObjectMatch(pairs=pairs, n_detections=len(dets), n_references=len(refs))


def object_scores(
    detections: Sequence[Any], references: Sequence[Any], iou_threshold: float = 0.5
) -> dict[str, Any]:
    """Object precision/recall/F1, area-weighted versions, and area-overlap scores.

    * ``precision`` = matched detections / detections, ``recall`` = matched
      references / references, ``f1`` their harmonic mean;
    * ``area_weighted_*``: the same with every polygon weighted by its area
      (a missed large landslide costs more than a missed small one);
    * ``area_overlap_*``: area of (union of detections) ∩ (union of references)
      over the detected / reference area — the pixel metrics in map units.

    Areas are in squared CRS units: pass polygons in a projected CRS.
    """
    from shapely import union_all

    dets = list(detections)
    refs = list(references)
    m = match_objects(dets, refs, iou_threshold)
    md = {d for d, _, _ in m.pairs}
    mr = {r for _, r, _ in m.pairs}
    p = _ratio(len(md), len(dets), 0.0)
    r = _ratio(len(mr), len(refs), 0.0)
    det_area = np.array([g.area for g in dets], dtype=float)
    ref_area = np.array([g.area for g in refs], dtype=float)
    pa = _ratio(det_area[sorted(md)].sum(), det_area.sum(), 0.0)
    ra = _ratio(ref_area[sorted(mr)].sum(), ref_area.sum(), 0.0)
    du = union_all(dets) if dets else None
    ru = union_all(refs) if refs else None
    inter = du.intersection(ru).area if du is not None and ru is not None else 0.0
    po = _ratio(inter, du.area if du is not None else 0.0, 0.0)
    ro = _ratio(inter, ru.area if ru is not None else 0.0, 0.0)

    def f1(a: float, b: float) -> float:
        return _ratio(2 * a * b, a + b, 0.0)

    return {
        "iou_threshold": float(iou_threshold),
        "detections": len(dets),
        "references": len(refs),
        "matched": len(m.pairs),
        "precision": p,
        "recall": r,
        "f1": f1(p, r),
        "mean_matched_iou": float(np.mean([i for _, _, i in m.pairs])) if m.pairs else 0.0,
        "area_weighted_precision": pa,
        "area_weighted_recall": ra,
        "area_weighted_f1": f1(pa, ra),
        "area_overlap_precision": po,
        "area_overlap_recall": ro,
        "area_overlap_f1": f1(po, ro),
    }


def object_metrics(
    detections: gpd.GeoDataFrame,
    inventory: gpd.GeoDataFrame,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Object metrics of two GeoDataFrames; both are brought to one projected CRS first.

    Detections are reprojected to the inventory's CRS; if that is geographic,
    both go to the inventory's UTM zone. The inventory is not clipped: clip it
    to the mapped area first, or landslides outside it count as misses.
    """
    if inventory.crs is None or detections.crs is None:
        raise ValueError("both detections and inventory need a CRS")
    target = inventory.crs
    if target.is_geographic:
        target = inventory.estimate_utm_crs()
    inv = inventory.to_crs(target)
    det = detections.to_crs(target)
    inv_geoms = [g for g in _polygons(inv)]
    det_geoms = [g for g in _polygons(det)]
    out = object_scores(det_geoms, inv_geoms, iou_threshold)
    out["crs"] = target.to_string()
    return out


def _polygons(gdf: gpd.GeoDataFrame) -> list[Any]:
    """Valid, non-empty polygon parts (multi-polygons stay one object)."""
    from shapely import make_valid
    from shapely.geometry import MultiPolygon, Polygon

    out = []
    for geom in gdf.geometry:
        if geom is None or geom.is_empty:
            continue
        if not geom.is_valid:
            geom = make_valid(geom)
        if isinstance(geom, Polygon | MultiPolygon):
            out.append(geom)
        elif hasattr(geom, "geoms"):
            parts = [g for g in geom.geoms if isinstance(g, Polygon | MultiPolygon)]
            if parts:
                out.append(MultiPolygon([p for g in parts for p in getattr(g, "geoms", [g])]))
    return out
