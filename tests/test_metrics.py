"""Pixel metrics (pooled and per patch), threshold selection, object matching."""

from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import box

from pipeline.training.metrics import (
    Counts,
    confusion,
    match_objects,
    object_metrics,
    object_scores,
    pixel_metrics,
)
from pipeline.training.thresholds import f1_by_threshold, select_threshold


def test_confusion_counts_by_hand() -> None:
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], bool)
    target = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], bool)
    c = confusion(pred, target)
    assert c == Counts(tp=2, fp=2, fn=1, tn=3)
    assert c.precision() == 0.5
    assert c.recall() == pytest.approx(2 / 3)
    assert c.f1() == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert c.iou() == pytest.approx(2 / 5)
    valid = np.ones_like(pred)
    valid[1, 3] = False  # drop the second false positive
    assert confusion(pred, target, valid) == Counts(tp=2, fp=1, fn=1, tn=3)


def test_pooled_f1_differs_from_mean_of_patch_f1() -> None:
    # patch A: 1 TP, 0 FP, 0 FN (F1 1); patch B: 1 TP, 9 FP, 0 FN (F1 2/11)
    target = np.zeros((2, 4, 4), np.uint8)
    prob = np.zeros((2, 4, 4), np.float32)
    target[0, 0, 0] = 1
    prob[0, 0, 0] = 0.9
    target[1, 0, 0] = 1
    prob[1].flat[:10] = 0.9
    m = pixel_metrics(prob, target)
    assert m["micro"]["tp"] == 2 and m["micro"]["fp"] == 9 and m["micro"]["fn"] == 0
    assert m["micro"]["f1"] == pytest.approx(4 / 13)
    assert m["per_patch"][0]["f1"] == 1.0
    assert m["per_patch"][1]["f1"] == pytest.approx(2 / 11)
    assert m["per_patch_mean"]["f1"] == pytest.approx((1 + 2 / 11) / 2)


def test_patch_without_landslides_or_detections_is_left_out_of_patch_means() -> None:
    target = np.zeros((2, 2, 2), np.uint8)
    target[0, 0, 0] = 1
    prob = target.astype(np.float32)
    m = pixel_metrics(prob, target, threshold=0.5)
    assert math.isnan(m["per_patch"][1]["f1"])
    assert m["per_patch_mean"]["f1"] == 1.0
    assert m["micro"]["f1"] == 1.0
    empty = pixel_metrics(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    assert empty["micro"]["f1"] == 0.0  # undefined pooled scores are reported as 0


def test_threshold_is_inclusive() -> None:
    m = pixel_metrics(np.array([[0.5, 0.49]]), np.array([[1, 0]]), threshold=0.5)
    assert m["micro"]["tp"] == 1 and m["micro"]["fp"] == 0


def test_f1_by_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    target = rng.random((3, 16, 16)) > 0.8
    prob = np.clip(target * 0.4 + rng.random((3, 16, 16)) * 0.6, 0, 1)
    valid = rng.random((3, 16, 16)) > 0.1
    ts, f1 = f1_by_threshold(prob, target, valid)
    for t, f in zip(ts, f1, strict=True):
        assert f == pytest.approx(pixel_metrics(prob, target, valid, t)["micro"]["f1"], abs=1e-12)


def test_select_threshold_finds_the_separating_value() -> None:
    prob = np.array([0.1, 0.2, 0.3, 0.62, 0.7, 0.9])
    target = np.array([0, 0, 0, 1, 1, 1])
    t, f1 = select_threshold(prob, target, thresholds=np.arange(0.05, 0.96, 0.05))
    assert f1 == 1.0
    assert 0.3 < t <= 0.62
    # ties resolve to the value closest to 0.5
    assert t == pytest.approx(0.5)


def test_objects_match_one_to_one_by_iou() -> None:
    refs = [box(0, 0, 10, 10), box(100, 100, 110, 110), box(200, 0, 230, 30)]
    dets = [
        box(1, 0, 11, 10),  # IoU 90/110 = 0.818 with ref 0
        box(0, 0, 10, 10),  # IoU 1 with ref 0: wins the match
        box(100, 100, 105, 110),  # IoU 0.5 with ref 1: matches at the 0.5 threshold
        box(500, 500, 510, 510),  # nothing
    ]
    m = match_objects(dets, refs, 0.5)
    assert sorted((d, r) for d, r, _ in m.pairs) == [(1, 0), (2, 1)]
    assert match_objects(dets, refs, 0.51).pairs == [(1, 0, 1.0)]
    s = object_scores(dets, refs, 0.5)
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # area-weighted: matched detections 100 + 50 of 100+100+50+100; matched refs 100 + 100 of 100+100+900
    assert s["area_weighted_precision"] == pytest.approx(150 / 350)
    assert s["area_weighted_recall"] == pytest.approx(200 / 1100)
    # area overlap: union of detections (110 + 50 + 100) vs union of refs (1100), overlap 100 + 50
    assert s["area_overlap_precision"] == pytest.approx(150 / 260)
    assert s["area_overlap_recall"] == pytest.approx(150 / 1100)


def test_no_detections_gives_zero_scores() -> None:
    s = object_scores([], [box(0, 0, 1, 1)])
    assert s["precision"] == 0 and s["recall"] == 0 and s["f1"] == 0 and s["matched"] == 0


def test_object_metrics_reproject_detections_to_the_inventory() -> None:
    inv = gpd.GeoDataFrame(geometry=[box(500000, 4000000, 500100, 4000100), box(501000, 4000000, 501050, 4000050)],
                           crs="EPSG:32633")
    det = gpd.GeoDataFrame(geometry=[box(500005, 4000000, 500105, 4000100)], crs="EPSG:32633").to_crs("EPSG:4326")
    s = object_metrics(det, inv, iou_threshold=0.5)
    assert s["matched"] == 1 and s["recall"] == 0.5 and s["precision"] == 1.0
    assert s["mean_matched_iou"] == pytest.approx(9500 / 10500, rel=1e-3)
    # a geographic inventory is measured in its UTM zone
    s2 = object_metrics(det, inv.to_crs("EPSG:4326"))
    assert s2["crs"] == "EPSG:32633" and s2["matched"] == 1
