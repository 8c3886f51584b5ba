"""Evaluation: artefact pixel metrics, Random Forest and SVM baselines, object metrics, comparison tables."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import torch
from shapely.affinity import translate
from shapely.geometry import box

from pipeline.cli.evaluate import add_evaluate_arguments, cli_evaluate
from pipeline.core.errors import InputError
from pipeline.model.artefact import ModelArtefact, save_artefact
from pipeline.model.registry import build_model
from pipeline.training.baseline import RandomForestConfig, SVMConfig, feature_names, pixel_features
from pipeline.training.comparison import Row, csv_table, markdown_table
from pipeline.training.evaluate import (
    baseline_row,
    cross_validate_config,
    evaluate_artefact,
    evaluate_objects,
)
from pipeline.training.folds import shared_folds
from pipeline.training.patch_files import data_checksum, find_patches
from pipeline.training.patch_readers import read_mask
from pipeline.training.polygon_files import read_polygons

CHANNELS = ["B02", "B03", "B04", "SLOPE", "DEM"]


def _constant_artefact(path: Path, bias: float, threshold: float = 0.5) -> Path:
    """A tiny PlainUnet whose output is the constant logit ``bias`` everywhere."""
    module = build_model("PlainUnet", None, len(CHANNELS), base_channels=2, depth=1)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        module.head.bias.fill_(bias)
    meta = ModelArtefact(
        architecture="PlainUnet", encoder=None, channels=CHANNELS, threshold=threshold,
        arch_kwargs={"base_channels": 2, "depth": 1}, name=f"constant{bias:+.0f}", version="test",
    )
    save_artefact(path, module, meta)
    return path


def test_constant_models_give_hand_computed_pixel_metrics(shared_data: Path, tmp_path: Path) -> None:
    records = find_patches(shared_data / "l4s" / "train")[:5]
    positives = sum(int(read_mask(r.mask)[0].sum()) for r in records)  # type: ignore[arg-type]
    total = 5 * 128 * 128
    everything = evaluate_artefact(_constant_artefact(tmp_path / "all.safetensors", 10.0), records, "x")
    assert everything.micro["tp"] == positives and everything.micro["fp"] == total - positives
    assert everything.micro["precision"] == pytest.approx(positives / total)
    assert everything.micro["recall"] == 1.0
    assert everything.micro["f1"] == pytest.approx(2 * positives / (positives + total))
    assert everything.micro["iou"] == pytest.approx(positives / total)
    nothing = evaluate_artefact(_constant_artefact(tmp_path / "none.safetensors", -10.0), records, "x")
    assert nothing.micro["tp"] == 0 and nothing.micro["fn"] == positives and nothing.micro["f1"] == 0.0
    # the artefact's own threshold is used: sigmoid(-10) is above a threshold of 1e-5
    low = evaluate_artefact(_constant_artefact(tmp_path / "low.safetensors", -10.0, 1e-5), records, "x")
    assert low.micro["recall"] == 1.0


def test_evaluation_flags_an_artefact_scored_on_its_training_patches(shared_data: Path, tmp_path: Path) -> None:
    records = find_patches(shared_data / "l4s" / "train")[:2]
    path = tmp_path / "m.safetensors"
    module = build_model("PlainUnet", None, len(CHANNELS), base_channels=2, depth=1)
    checksum = data_checksum(records)
    meta = ModelArtefact(
        architecture="PlainUnet", encoder=None, channels=CHANNELS, arch_kwargs={"base_channels": 2, "depth": 1},
        training={"data": {"checksum_sha256": checksum}}, metrics={"cv": {"micro": {"f1": 0.25}}}, version="t",
    )
    save_artefact(path, module, meta)
    row = evaluate_artefact(path, records, checksum)
    assert "own training patches" in row.note and "CV F1 0.250" in row.note
    assert "own training" not in evaluate_artefact(path, records, "other").note


def test_ndvi_feature_by_hand() -> None:
    raw = np.zeros((5, 2, 2), np.float32)
    raw[2] = 0.1  # B04
    names = ["B02", "B03", "B04", "B08", "DEM"]
    raw[3] = np.array([[0.3, 0.1], [0.0, 0.5]])  # B08
    feats = pixel_features(np.zeros_like(raw), raw, names)
    assert feature_names(names) == [f"{n}_norm" for n in names] + ["NDVI"]
    np.testing.assert_allclose(feats[-1], [[0.5, 0.0], [-1.0, 0.4 / 0.6]], rtol=1e-6)
    assert pixel_features(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), ["B02", "DEM"]).shape == (2, 2, 2)


BASELINE_IDS = {"1", "2", "28", "461", "512", "600"}


def _trivial_f1(records: list) -> float:
    """F1 of predicting landslide everywhere."""
    positives = sum(int(read_mask(r.mask)[0].sum()) for r in records)
    return 2 * positives / (positives + len(records) * 128 * 128)


def test_random_forest_baseline_beats_predicting_everything(shared_data: Path) -> None:
    records = find_patches(shared_data / "l4s" / "train")
    records = [r for r in records if r.id in BASELINE_IDS]
    folds = shared_folds(records, 2, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(len(records)))
    row = baseline_row(records, CHANNELS, folds, config=RandomForestConfig(n_estimators=15, seed=0))
    assert row.name == "random forest" and row.kind == "baseline" and row.patches == len(records)
    assert row.protocol == "2-fold CV (same folds)" and "15 trees" in row.note
    assert row.micro["f1"] > _trivial_f1(records) + 0.05
    # with a separate training set the same patches are scored by one model
    held = baseline_row(records[:2], CHANNELS, train_records=records[2:],
                        config=RandomForestConfig(n_estimators=15, seed=0))
    assert held.protocol == "trained on the training set" and held.patches == 2
    with pytest.raises(ValueError, match="folds or train_records"):
        baseline_row(records, CHANNELS)


def test_svm_baseline_beats_predicting_everything(shared_data: Path) -> None:
    """The RBF SVM row is cross-validated on the same shared folds as the Random Forest."""
    records = [r for r in find_patches(shared_data / "l4s" / "train") if r.id in BASELINE_IDS]
    folds = shared_folds(records, 2, seed=0)
    row = baseline_row(records, CHANNELS, folds, config=SVMConfig(pixels_per_patch=200, seed=0))
    assert row.name == "svm" and row.kind == "baseline" and row.patches == len(records)
    assert row.protocol == "2-fold CV (same folds)" and "RBF kernel" in row.note
    assert 0.0 < row.threshold < 1.0
    assert row.micro["tp"] + row.micro["fn"] == sum(int(read_mask(r.mask)[0].sum()) for r in records)  # type: ignore[arg-type]
    assert row.micro["f1"] > _trivial_f1(records) + 0.05


def test_comparison_table_markdown_and_csv() -> None:
    micro = {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "iou": 0.2}
    rows = [
        Row("a", "model", "artefact", "B02,B03", 0.4, micro, float("nan"), 3, note="x|y"),
        Row("b", "baseline", "cv", "B02", 0.5, {**micro, "f1": 0.1}, 0.2, 3),
    ]
    md = markdown_table(rows).splitlines()
    assert md[0].startswith("| name | kind |") and len(md) == 4
    assert md[2] == "| a | model | artefact | B02,B03 | 0.400 | 0.500 | 0.250 | 0.333 | 0.200 | n/a | 3 | x/y |"
    parsed = list(csv.DictReader(io.StringIO(csv_table(rows))))
    assert [p["name"] for p in parsed] == ["a", "b"]
    assert float(parsed[0]["f1"]) == pytest.approx(1 / 3) and float(parsed[1]["f1"]) == 0.1


def test_object_metrics_on_a_real_inventory(shared_data: Path, tmp_path: Path) -> None:
    inv_path = shared_data / "inventories" / "bhuyan_predicted_png.zip" / "PNG" / "2017.shp"
    inv = read_polygons(inv_path)
    assert len(inv) > 50 and inv.crs.to_epsg() == 32754
    # detections: every second polygon, shifted by 2 m, plus one false alarm
    shifted = [translate(g, 2.0, 0.0) for g in inv.geometry.iloc[::2]]
    x0, y0 = inv.total_bounds[:2]
    det = gpd.GeoDataFrame(geometry=[*shifted, box(x0 - 1000, y0 - 1000, x0 - 900, y0 - 900)], crs=inv.crs)
    det_path = tmp_path / "det.gpkg"
    det.to_crs("EPSG:4326").to_file(det_path, layer="landslides")
    expected = sum(
        g.intersection(translate(g, 2.0, 0.0)).area / g.union(translate(g, 2.0, 0.0)).area >= 0.5
        for g in inv.geometry.iloc[::2]
    )
    s = evaluate_objects(det_path, inv_path, 0.5)
    assert s["matched"] == expected
    assert s["precision"] == pytest.approx(expected / len(det))
    assert s["recall"] == pytest.approx(expected / len(inv))
    with pytest.raises(InputError, match="4 vector files"):
        read_polygons(shared_data / "inventories" / "bhuyan_predicted_png.zip")


def test_cli_writes_tables_for_models_and_baseline(shared_data: Path, tmp_path: Path) -> None:
    model = _constant_artefact(tmp_path / "all.safetensors", 10.0)
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args([
        "--patches", str(shared_data / "l4s" / "train"), "--model", str(model), "--folds", "3",
        "--rf-trees", "5", "--out-dir", str(tmp_path / "out"),
    ])
    assert cli_evaluate(args) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "comparison.csv").read_text())))
    assert [r["kind"] for r in rows] == ["model", "baseline", "baseline"]
    assert [r["name"] for r in rows[1:]] == ["random forest", "svm"]  # both baselines by default
    assert float(rows[0]["recall"]) == 1.0
    assert rows[1]["channels"] == rows[2]["channels"] == ",".join(CHANNELS)
    assert "| random forest |" in (tmp_path / "out" / "comparison.md").read_text()
    payload = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(payload["rows"][0]["details"]["metrics"]["per_patch"]) == 15
    with pytest.raises(InputError, match="nothing to evaluate"):
        cli_evaluate(parser.parse_args([]))


def test_recipes_are_cross_validated_on_the_shared_folds(shared_data: Path, tmp_path: Path) -> None:
    from pipeline.training.config import load_train_config

    records = [r for r in find_patches(shared_data / "l4s" / "train") if r.id in {"1", "28", "461", "512"}]
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(
        "data: {root: unused}\noutput: {artefact: unused.safetensors}\nepochs: 1\nbatch_size: 2\n"
        "model: {architecture: PlainUnet, encoder: null, options: {base_channels: 4, depth: 2}, "
        f"channels: {CHANNELS}}}\n".replace("'", "")
    )
    folds = shared_folds(records, 2, seed=0)
    row = cross_validate_config(load_train_config(cfg_path), records, folds, name="tiny")
    assert row.kind == "recipe" and row.patches == 4 and row.protocol == "2-fold CV (same folds)"
    oof = row.extra["oof_prob"]
    assert oof.shape == (4, 128, 128) and np.isfinite(oof).all() and (oof > 0).all()
    assert row.micro["tp"] + row.micro["fn"] == sum(int(read_mask(r.mask)[0].sum()) for r in records)  # type: ignore[arg-type]


def test_polygons_come_from_the_data_layer_not_the_style_table(tmp_path: Path) -> None:
    """Our GeoPackages hold the landslides and QGIS's layer_styles table: reading picks the data
    layer without GDAL's 'more than one layer' warning; two data layers need an explicit choice."""
    import warnings

    import pyogrio

    from postprocess.gpkg import add_qgis_style
    from postprocess.style import default_qml

    path = tmp_path / "detections.gpkg"
    gdf = gpd.GeoDataFrame({"label": [1, 2]}, geometry=[box(0, 0, 10, 10), box(20, 0, 30, 10)], crs="EPSG:32633")
    gdf.to_file(path, layer="landslides", driver="GPKG")
    add_qgis_style(path, "landslides", default_qml())
    assert [str(n) for n, _ in pyogrio.list_layers(path)] == ["landslides", "layer_styles"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_polygons(path)
    assert list(got["label"]) == [1, 2]

    gdf.iloc[:1].to_file(path, layer="other", driver="GPKG")
    with pytest.raises(InputError, match=r"several layers \(landslides, other, layer_styles\).*--detections-layer"):
        read_polygons(path)
    assert len(read_polygons(path, "other")) == 1


def test_reading_a_run_geopackage_leaves_no_sidecar(tmp_path: Path) -> None:
    """A run's GeoPackage carries dataset metadata; reading it (evaluate, a run's reference check) leaves
    no .gpkg.aux.xml beside it, and GDAL's own setting is restored afterwards."""
    import pyogrio

    from postprocess.gpkg import write_geopackage

    path = tmp_path / "run_landslides.gpkg"
    gdf = gpd.GeoDataFrame({"label": [1]}, geometry=[box(0, 0, 10, 10)], crs="EPSG:32633")
    write_geopackage(gdf, path, layer="landslides", metadata={"run_id": "x", "threshold": 0.5})
    before = pyogrio.get_gdal_config_option("GDAL_PAM_ENABLED")
    assert len(read_polygons(path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert pyogrio.get_gdal_config_option("GDAL_PAM_ENABLED") == before
    gpd.read_file(path, layer="landslides")  # without it GDAL writes the sidecar: the check has teeth
    assert (tmp_path / (path.name + ".aux.xml")).is_file()
