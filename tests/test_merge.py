"""Regional merge: overlapping scenes never give duplicate landslides."""

from __future__ import annotations

import geopandas as gpd
from shapely.geometry import box

from pipeline.run.merge import merge_frames


def _frame(geoms, crs, scene, probs):
    return gpd.GeoDataFrame(
        {"landslide_id": [f"{scene}-{i}" for i in range(len(geoms))], "scene_id": scene, "mean_prob": probs},
        geometry=geoms,
        crs=crs,
    )


def test_same_landslide_in_two_overlapping_scenes_is_one_feature() -> None:
    # scene A sees the whole landslide, scene B only its western half (cut at its edge)
    whole = box(500000, 4700000, 500200, 4700100)
    half = box(500000, 4700000, 500100, 4700100)
    other = box(510000, 4700000, 510050, 4700050)
    a = _frame([whole, other], "EPSG:32633", "A", [0.7, 0.9])
    b = _frame([half], "EPSG:32633", "B", [0.8])
    merged = merge_frames([a, b])
    assert len(merged) == 2
    assert merged.crs.to_epsg() == 4326
    row = merged[merged["n_merged"] == 2].iloc[0]
    assert row["scene_ids"] == "A,B"
    assert row["landslide_id"] == "B-0"  # attributes of the most confident member
    assert abs(row["area_m2"] - 200 * 100) / (200 * 100) < 0.01  # geodesic area of the union


def test_scenes_in_different_utm_zones_are_merged_in_geographic_coordinates() -> None:
    poly_32 = gpd.GeoSeries([box(830000, 4700000, 830300, 4700300)], crs="EPSG:32632")
    poly_33 = poly_32.to_crs("EPSG:32633")
    a = _frame(list(poly_32), "EPSG:32632", "A", [0.6])
    b = _frame(list(poly_33), "EPSG:32633", "B", [0.6])
    merged = merge_frames([a, b])
    assert len(merged) == 1
    assert merged.iloc[0]["scene_ids"] == "A,B"


def test_polygons_of_one_scene_are_never_merged() -> None:
    touching = [box(0, 0, 10, 10), box(10, 0, 20, 10)]
    merged = merge_frames([_frame(touching, "EPSG:32633", "A", [0.5, 0.6])])
    assert len(merged) == 2


def test_merging_is_idempotent_and_empty_inputs_are_fine() -> None:
    a = _frame([box(0, 0, 10, 10)], "EPSG:32633", "A", [0.5])
    assert len(merge_frames([a, a.iloc[0:0]])) == 1
    assert len(merge_frames([])) == 0


def test_polygons_of_two_scenes_that_only_touch_stay_two_features() -> None:
    """A shared edge or a shared corner is no overlap: each keeps its own id and attributes."""
    left = box(500000, 4700000, 500100, 4700100)
    right_edge = box(500100, 4700000, 500200, 4700100)   # shares the east edge
    corner = box(500100, 4700100, 500150, 4700150)       # shares only the north-east corner
    a = _frame([left], "EPSG:32633", "A", [0.9])
    b = _frame([right_edge, corner], "EPSG:32633", "B", [0.5, 0.6])
    merged = merge_frames([a, b])
    assert len(merged) == 3
    assert sorted(merged["landslide_id"]) == ["A-0", "B-0", "B-1"]
    assert (merged["n_merged"] == 1).all()
    assert list(merged["landslide_ids"]) == list(merged["landslide_id"])


def test_a_merged_feature_keeps_every_members_id() -> None:
    whole = box(500000, 4700000, 500200, 4700100)
    a = _frame([whole], "EPSG:32633", "A", [0.7])
    b = _frame([box(500000, 4700000, 500100, 4700100)], "EPSG:32633", "B", [0.8])
    c = _frame([box(500150, 4700000, 500300, 4700100)], "EPSG:32633", "C", [0.6])
    merged = merge_frames([a, b, c])
    assert len(merged) == 1
    row = merged.iloc[0]
    assert row["landslide_ids"] == "A-0,B-0,C-0" and row["scene_ids"] == "A,B,C" and row["n_merged"] == 3
    assert row["landslide_id"] == "B-0"
