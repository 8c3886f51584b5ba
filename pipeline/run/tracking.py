"""Landslides tracked across nights: the regional layers rebuilt from every completed scene run.

Each night the regional GeoPackage is rebuilt from the per-scene outputs of every completed scene
run the region has recorded (its state file keeps them all), never updated in place, so the result
depends only on those outputs: not on the order in which the scenes finished, nor on how many
times the job ran. Runs are read in a fixed order (acquisition date, scene id, run folder).

Detections of different scene runs (another tile on the same night, the same tile on another
night) whose polygons share area (not only a boundary or a corner,
:func:`pipeline.run.merge.overlapping_pairs`) are one landslide; so are chains of such overlaps.
A landslide's ``landslide_id`` is the id of its first detection (earliest date, then scene id,
then detection id); its geometry is the union of all its detections (what was ever seen of it);
its other attributes are those of its latest detection (the most confident one on its last
night). See ``docs/regional.md`` for every column.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from pipeline.core.errors import InputError
from pipeline.io.gdal import no_sidecars
from pipeline.run.merge import components, overlapping_pairs
from pipeline.run.observed import geodesic_area, geodesic_area_perimeter, not_observed_frame, scene_coverage
from postprocess.gpkg import to_lonlat

log = logging.getLogger(__name__)

#: The tracking columns, first in the ``landslides`` and ``new_landslides`` layers; the latest
#: detection's other attributes follow.
TRACK_COLUMNS: dict[str, str] = {
    "landslide_id": "object",
    "first_seen": "object",
    "last_seen": "object",
    "n_detections": "int64",
    "n_nights": "int64",
    "scene_ids": "object",
    "dates": "object",
    "landslide_ids": "object",
    "area_m2": "float64",
    "perimeter_m": "float64",
    "last_area_m2": "float64",
}
#: The ``dates`` entry of a scene without an acquisition date.
UNDATED = "unknown"


@dataclass(frozen=True)
class SceneRun:
    """A completed scene run as the regional layers read it: its ``report.json`` and GeoPackage."""

    scene_id: str
    night: str | None  # the acquisition date, YYYY-MM-DD
    run_dir: Path
    geopackage: Path
    report: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def order(self) -> tuple[bool, str, str, str]:
        """The order the layers read runs in: dated first, by date, scene id, run folder."""
        return self.night is None, self.night or "", self.scene_id, str(self.run_dir)


@dataclass
class RegionalLayers:
    """The regional GeoPackage's layers, the runs they were built from, and the newest night of the job."""

    landslides: gpd.GeoDataFrame
    new_landslides: gpd.GeoDataFrame
    not_observed: gpd.GeoDataFrame
    newest_night: str | None
    runs: list[SceneRun]


def night_of(value: Any) -> str | None:
    """The night (``YYYY-MM-DD``) of an acquisition date or time given as ISO text; None if unknown."""
    if not value:
        return None
    try:
        return dt.date.fromisoformat(str(value)[:10]).isoformat()
    except ValueError:
        return None


def _read_report(run_dir: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("grid"), dict) else None


def load_runs(records: Iterable[Mapping[str, Any]]) -> list[SceneRun]:
    """The recorded runs (dicts with ``run_dir`` or ``geopackage``) whose folder still holds a
    readable report, in :attr:`SceneRun.order`. Two runs of one scene on one grid (a rerun with
    another model or config) are one: the one that finished last is kept."""
    by_coverage: dict[tuple[str, str], tuple[tuple[str, str], SceneRun]] = {}
    for rec in records:
        gpkg = Path(str(rec["geopackage"])) if rec.get("geopackage") else None
        run_dir = Path(str(rec.get("run_dir") or (gpkg.parent if gpkg else "")))
        report = _read_report(run_dir)
        if report is None or gpkg is None or not gpkg.is_file():
            log.warning("recorded run %s has no readable report.json or GeoPackage any more; left out of "
                        "the regional layers", run_dir)
            continue
        if (changed := _changed_since_recorded(run_dir, gpkg, report)) is not None:
            log.warning("recorded run %s: %s; left out of the regional layers (run its scene again)", run_dir,
                        changed)
            continue
        scene_id = str(report.get("scene_id") or rec.get("scene_id") or run_dir.parent.name)
        run = SceneRun(scene_id, night_of(report.get("acquisition_date")), run_dir, gpkg, report)
        key = (scene_id, json.dumps(report["grid"], sort_keys=True))
        rank = (str(report.get("finished") or ""), str(run_dir))
        if key not in by_coverage or rank > by_coverage[key][0]:
            by_coverage[key] = (rank, run)
    return sorted((run for _, run in by_coverage.values()), key=lambda r: r.order)


def _changed_since_recorded(run_dir: Path, gpkg: Path, report: Mapping[str, Any]) -> str | None:
    """What the rebuild reads of a run that is no longer what its ``report.json`` records: the
    GeoPackage (size and SHA-256: a few MB) and the probability raster (size: it can be large);
    None when both are as recorded, or the report records no checksums."""
    from pipeline.core.fsutil import file_record

    recorded = report.get("output_files")
    if not isinstance(recorded, Mapping):
        return None
    try:
        rec = recorded.get(gpkg.name)
        if isinstance(rec, Mapping) and file_record(gpkg) != {"bytes": rec.get("bytes"), "sha256": rec.get("sha256")}:
            return f"{gpkg.name} is not what its report.json records"
        prob = recorded.get("probability.tif")
        if isinstance(prob, Mapping) and (run_dir / "probability.tif").stat().st_size != prob.get("bytes"):
            return "probability.tif does not have the size its report.json records"
    except OSError as exc:
        return f"its outputs cannot be read ({exc.strerror or exc})"
    return None


def read_detections(run: SceneRun) -> gpd.GeoDataFrame:
    """The run's landslide polygons (layer ``landslides``, else its first layer), in its CRS."""
    try:
        with no_sidecars():  # nothing written beside the scene GeoPackages
            names = [str(n) for n, _ in pyogrio.list_layers(run.geopackage)]
            layer = "landslides" if "landslides" in names else names[0]
            return gpd.read_file(run.geopackage, layer=layer)
    except Exception as exc:  # noqa: BLE001 - report which file
        raise InputError(f"{run.geopackage}: cannot read the scene layer for the regional layers: {exc}") from None


def empty_tracked() -> gpd.GeoDataFrame:
    """The tracked layer's schema without features."""
    from postprocess.attributes import COLUMNS

    schema = {**TRACK_COLUMNS, **{k: v for k, v in COLUMNS.items() if k not in TRACK_COLUMNS}}
    data = {name: pd.Series([], dtype=dtype) for name, dtype in schema.items()}
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries([], crs="EPSG:4326"), crs="EPSG:4326")


def _detections(runs: Sequence[SceneRun], frames: Sequence[gpd.GeoDataFrame]) -> gpd.GeoDataFrame | None:
    """All detections in EPSG:4326, run by run in ``runs``' order, by detection id within a run."""
    parts = []
    for i, (run, frame) in enumerate(zip(runs, frames, strict=True)):
        if len(frame) == 0:
            continue
        f = to_lonlat(frame)
        ids = f["landslide_id"].astype(str) if "landslide_id" in f.columns else \
            pd.Series([f"{run.scene_id}-{k}" for k in range(len(f))], index=f.index)
        f = f.assign(landslide_id=ids, _run=i).sort_values("landslide_id", kind="stable")
        parts.append(f)
    if not parts:
        return None
    return gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), geometry="geometry", crs="EPSG:4326")


@dataclass(frozen=True)
class _Detections:
    """The detections' values a landslide is built from, as plain arrays (in reading order)."""

    runs: Sequence[SceneRun]
    run: np.ndarray
    ids: np.ndarray
    probs: np.ndarray
    geoms: np.ndarray

    @classmethod
    def of(cls, gdf: gpd.GeoDataFrame, runs: Sequence[SceneRun]) -> _Detections:
        probs = gdf["mean_prob"].to_numpy(dtype=np.float64) if "mean_prob" in gdf else np.zeros(len(gdf))
        return cls(runs, gdf["_run"].to_numpy(), gdf["landslide_id"].to_numpy(dtype=object),
                   np.nan_to_num(probs, nan=-np.inf), np.asarray(gdf.geometry.values))


def _tracked(det: _Detections, idx: np.ndarray) -> tuple[int, dict[str, Any]]:
    """One landslide from its detections ``idx`` (in reading order): the index of its latest
    detection (whose attributes it keeps) and its tracking values."""
    seen = list(dict.fromkeys(det.run[idx].tolist()))  # the runs that saw it, in reading order
    nights = [det.runs[r].night for r in seen]
    dated = [n for n in nights if n]
    last = max(dated) if dated else None
    latest = [int(i) for i in idx if det.runs[det.run[i]].night == last]
    best = max(latest, key=lambda i: (det.probs[i], -i))  # the most confident on the last night
    geom = det.geoms[idx[0]] if len(idx) == 1 else shapely.union_all(det.geoms[idx])
    area, perimeter = geodesic_area_perimeter(geom)
    last_area = area if len(latest) == len(idx) else geodesic_area(shapely.union_all(det.geoms[latest]))
    return best, {
        "landslide_id": det.ids[idx[0]], "first_seen": min(dated) if dated else None, "last_seen": last,
        "n_detections": len(seen), "n_nights": len(set(dated)),
        "scene_ids": ",".join(det.runs[r].scene_id for r in seen), "dates": ",".join(n or UNDATED for n in nights),
        "landslide_ids": ",".join(det.ids[idx]), "area_m2": area, "perimeter_m": perimeter,
        "last_area_m2": last_area, "geometry": geom,
    }


def track_landslides(runs: Sequence[SceneRun], frames: Sequence[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    """One feature per landslide from the runs' detections ``frames`` (any CRSs), in EPSG:4326,
    ordered by ``first_seen`` then ``landslide_id``."""
    gdf = _detections(runs, frames)
    if gdf is None:
        return empty_tracked()
    det = _Detections.of(gdf, runs)
    comp = components(len(gdf), overlapping_pairs(det.geoms, det.run))
    order = np.argsort(comp, kind="stable")  # members of a landslide stay in reading order
    groups = np.split(order, np.flatnonzero(np.diff(comp[order])) + 1)
    best, tracked = zip(*(_tracked(det, idx) for idx in groups), strict=True)
    rest = [c for c in gdf.columns if c not in TRACK_COLUMNS and c not in ("geometry", "_run")]
    attributes = pd.DataFrame(gdf[rest].iloc[list(best)]).reset_index(drop=True)
    out = pd.concat([pd.DataFrame(list(tracked)), attributes], axis=1)
    out = gpd.GeoDataFrame(out[[*TRACK_COLUMNS, *rest, "geometry"]], geometry="geometry", crs="EPSG:4326")
    out = out.astype(TRACK_COLUMNS).sort_values(["first_seen", "landslide_id"], na_position="last", kind="stable")
    return out.reset_index(drop=True)


def new_landslides(landslides: gpd.GeoDataFrame, night: str | None) -> gpd.GeoDataFrame:
    """The landslides first seen on ``night`` (none when it is None)."""
    keep = landslides["first_seen"] == night if night else np.zeros(len(landslides), dtype=bool)
    return landslides[np.asarray(keep, dtype=bool)].reset_index(drop=True)


def build_layers(records: Iterable[Mapping[str, Any]], job_scene_ids: Iterable[str]) -> RegionalLayers:
    """The regional layers from the recorded runs ``records`` (see :func:`load_runs`).

    ``job_scene_ids``: the scenes this job ran or found up to date; the newest of their nights
    is the one whose first detections make ``new_landslides``."""
    runs = load_runs(records)
    job = set(job_scene_ids)
    newest = max((r.night for r in runs if r.scene_id in job and r.night), default=None)
    landslides = track_landslides(runs, [read_detections(r) for r in runs])
    coverages = [scene_coverage(r.run_dir, r.report, r.scene_id, r.night) for r in runs]
    return RegionalLayers(landslides, new_landslides(landslides, newest), not_observed_frame(coverages),
                          newest, runs)
