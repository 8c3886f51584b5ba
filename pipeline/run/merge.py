"""Merge per-scene landslide layers into one regional layer without duplicates.

Sentinel-2 tiles overlap their neighbours (and may sit in different UTM
zones), so one landslide can be mapped by two scenes, whole in one and cut at
the edge of the other. Polygons from *different* scenes that overlap (share
area, not only a boundary or a corner) are merged into one feature: its
geometry is their union, its attributes those of the member with the highest
mean probability, its ``scene_ids`` and ``landslide_ids`` all members'.
Polygons of one scene never overlap each other and are kept as they are.

The nightly regional job tracks landslides across nights instead
(:mod:`pipeline.run.tracking`, with :func:`overlapping_pairs` and :func:`components` from
here); :func:`merge_frames` is the merge of one set of scenes without their history.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from pyproj import Geod
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely import STRtree
from shapely.ops import unary_union

from pipeline.core.errors import InputError
from pipeline.io.gdal import no_sidecars
from postprocess.gpkg import to_lonlat

log = logging.getLogger(__name__)

_GEOD = Geod(ellps="WGS84")


#: Overlaps smaller than this share of the smaller polygon are boundaries that reprojection moved
#: by a rounding error, not shared area.
MIN_OVERLAP = 1e-6


def overlapping_pairs(geoms: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Pairs (2, k) of polygons of different scenes whose intersection has area."""
    pairs = STRtree(geoms).query(geoms, predicate="intersects")
    pairs = pairs[:, (src[pairs[0]] != src[pairs[1]]) & (pairs[0] < pairs[1])]
    if pairs.shape[1] == 0:
        return pairs
    a, b = geoms[pairs[0]], geoms[pairs[1]]
    shared = shapely.area(shapely.intersection(a, b))
    return pairs[:, shared > MIN_OVERLAP * np.minimum(shapely.area(a), shapely.area(b))]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes given edge ``pairs`` (2, k)."""
    graph = coo_matrix((np.ones(pairs.shape[1], dtype=np.int8), (pairs[0], pairs[1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def merge_frames(frames: Sequence[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    """Merge scene layers (any CRSs) into one EPSG:4326 layer, deduplicating overlaps."""
    parts = []
    for i, frame in enumerate(frames):
        if len(frame) == 0:
            continue
        f = to_lonlat(frame).copy()
        f["_src"] = i
        parts.append(f)
    if not parts:
        return gpd.GeoDataFrame({"scene_ids": pd.Series([], dtype=str)}, geometry=[], crs="EPSG:4326")
    gdf = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs="EPSG:4326")
    geoms = np.asarray(gdf.geometry.values)
    comp = components(len(gdf), overlapping_pairs(geoms, gdf["_src"].to_numpy()))

    prob_col = "mean_prob" if "mean_prob" in gdf.columns else None
    rows = []
    order = np.argsort(comp, kind="stable")  # by component, members in input order: linear, not quadratic
    for idx in np.split(order, np.flatnonzero(np.diff(comp[order])) + 1):
        members = gdf.iloc[idx]
        best = members.iloc[int(np.argmax(members[prob_col].to_numpy()))] if prob_col else members.iloc[0]
        row = best.drop(labels=["geometry", "_src"]).to_dict()
        geom = members.geometry.iloc[0] if len(idx) == 1 else unary_union(members.geometry.values)
        if "scene_id" in members.columns:
            row["scene_ids"] = ",".join(sorted(set(members["scene_id"].astype(str))))
        else:
            row["scene_ids"] = ""
        if "landslide_id" in members.columns:
            row["landslide_ids"] = ",".join(sorted(members["landslide_id"].astype(str)))
        row["n_merged"] = len(idx)
        area, perimeter = _GEOD.geometry_area_perimeter(geom)
        row["area_m2"] = abs(area)
        row["perimeter_m"] = perimeter
        row["geometry"] = geom
        rows.append(row)
    out = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
    return out.sort_values(by=[c for c in ("scene_ids", "landslide_id") if c in out.columns], kind="stable").reset_index(drop=True)


def merge_scene_layers(paths: Sequence[Path], out_path: Path, *, region: str) -> int:
    """Read scene GeoPackages, merge them and write ``out_path`` atomically; return feature count."""
    frames = []
    for path in paths:
        try:
            with no_sidecars():  # nothing written beside the scene GeoPackages
                layer = pyogrio.list_layers(path)[0][0]
                frames.append(gpd.read_file(path, layer=layer))
        except Exception as exc:  # noqa: BLE001 - report which file
            raise InputError(f"{path}: cannot read scene layer for the regional merge: {exc}") from None
    merged = merge_frames(frames)
    from postprocess.gpkg import write_geopackage

    write_geopackage(
        merged,
        out_path,
        layer="landslides",
        metadata={"region": region, "scenes": [str(p) for p in paths], "crs": "EPSG:4326"},
    )
    log.info("regional layer %s: %d polygon(s) from %d scene(s)", out_path, len(merged), len(paths))
    return len(merged)
