"""GeoPackage output: atomic, indexed, styled for QGIS, described.

:func:`write_geopackage` writes the layer with pyogrio (GDAL) to a temporary
file beside the target, adds the QGIS style the way QGIS itself stores it
(the ``layer_styles`` table, registered in ``gpkg_contents``, with the
layer's row marked ``useAsDefault``, so QGIS applies it on opening), checks
the result (:func:`verify_geopackage`: SQLite's ``quick_check``, the feature
count, the style row), then moves it into place with :func:`os.replace`. A
failure at any step leaves no file at the final path and no temporary file;
a full disk raises :class:`~pipeline.core.errors.DiskFull` naming the folder,
whatever GDAL or SQLite said (:func:`pipeline.core.fsutil.write_failure`).

Run metadata go three ways: the layer DESCRIPTION (``gpkg_contents``), GDAL
layer and dataset metadata items (``gpkg_metadata``), and the full run
description as one JSON blob in the metadata item ``landslide_run``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import geopandas as gpd
import numpy as np
import pyogrio
import pyogrio.errors
import shapely
import shapely.affinity

from pipeline.core import fsutil
from pipeline.core.errors import OutputError
from pipeline.core.fsutil import WriteCheckFailed
from postprocess.style import default_qml, default_sld

log = logging.getLogger(__name__)

#: GDAL metadata item holding the JSON description of the run.
METADATA_ITEM = "landslide_run"

#: GeoPackage version written: 1.2 opens without warnings in every GDAL/QGIS still in use.
GPKG_VERSION = "1.2"

#: The ``layer_styles`` table exactly as QGIS creates it in a GeoPackage.
LAYER_STYLES_DDL = (
    'CREATE TABLE IF NOT EXISTS "layer_styles" ( "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, '
    '"f_table_catalog" TEXT(256), "f_table_schema" TEXT(256), "f_table_name" TEXT(256), '
    '"f_geometry_column" TEXT(256), "styleName" TEXT(30), "styleQML" TEXT, "styleSLD" TEXT, '
    '"useAsDefault" BOOLEAN, "description" TEXT, "owner" TEXT(30), "ui" TEXT(30), '
    "\"update_time\" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
)

_TRIGGERS = (
    'CREATE TRIGGER "trigger_insert_feature_count_layer_styles" AFTER INSERT ON "layer_styles" BEGIN '
    "UPDATE gpkg_ogr_contents SET feature_count = feature_count + 1 "
    "WHERE lower(table_name) = lower('layer_styles'); END",
    'CREATE TRIGGER "trigger_delete_feature_count_layer_styles" AFTER DELETE ON "layer_styles" BEGIN '
    "UPDATE gpkg_ogr_contents SET feature_count = feature_count - 1 "
    "WHERE lower(table_name) = lower('layer_styles'); END",
)


def _output_dir(path: Path) -> Path:
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fsutil.folder_failure(
            exc, path, f"output directory {directory} cannot be created: {exc.strerror or exc}") from exc
    if not directory.is_dir():
        raise OutputError(f"output directory {directory} is not a directory")
    return directory


def _temporary_path(directory: Path, name: str) -> Path:
    try:
        fd, tmp = fsutil.mkstemp(prefix=f".{name}.", suffix=".tmp.gpkg", dir=directory)
    except OSError as exc:
        raise fsutil.folder_failure(
            exc, directory / name, f"output directory {directory} is not writable: {exc.strerror or exc}; "
            "choose another output.dir or fix its permissions") from exc
    os.close(fd)
    os.unlink(tmp)  # GDAL creates the file itself
    return Path(tmp)


def _geometry_type(gdf: gpd.GeoDataFrame) -> str:
    if len(gdf) == 0:
        return "Polygon"
    types = set(shapely.get_type_id(gdf.geometry.values))
    return "Polygon" if types <= {3} else "MultiPolygon"


def _description(metadata: Mapping[str, Any], count: int) -> str:
    if "description" in metadata:
        return str(metadata["description"])
    parts = [f"{count} landslide polygons"]
    for key, label in (("scene_id", "scene"), ("acq_date", "acquired"), ("model_name", "model"), ("run_id", "run")):
        if metadata.get(key):
            parts.append(f"{label} {metadata[key]}")
    return "; ".join(parts)


def add_qgis_style(
    path: Path | str,
    layer: str,
    qml: str,
    *,
    sld: str = "",
    name: str | None = None,
    description: str = "",
) -> None:
    """Store ``qml`` as the default QGIS style of ``layer`` in the GeoPackage at ``path``."""
    con = sqlite3.connect(str(path))
    try:
        with con:
            row = con.execute(
                "SELECT column_name FROM gpkg_geometry_columns WHERE lower(table_name) = lower(?)", (layer,)
            ).fetchone()
            if row is None:
                raise OutputError(f"{path}: layer {layer!r} has no geometry column to style")
            geometry_column = row[0]
            if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'layer_styles'").fetchone():
                _create_layer_styles(con)
            con.execute(
                "UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ? AND f_geometry_column = ?",
                (layer, geometry_column),
            )
            con.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                "VALUES ('', '', ?, ?, ?, ?, ?, 1, ?, '', NULL)",
                (layer, geometry_column, name or layer, qml, sld, description),
            )
    finally:
        con.close()


def _create_layer_styles(con: sqlite3.Connection) -> None:
    """The ``layer_styles`` table, registered in ``gpkg_contents`` (and counted in
    ``gpkg_ogr_contents`` when the file has it), as QGIS creates it."""
    con.execute(LAYER_STYLES_DDL)
    con.execute(
        "INSERT INTO gpkg_contents (table_name, data_type, identifier, description, last_change, srs_id) "
        "VALUES ('layer_styles', 'attributes', 'layer_styles', '', "
        "strftime('%Y-%m-%dT%H:%M:%fZ','now'), 0)"
    )
    has_counts = con.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'gpkg_ogr_contents'"
    ).fetchone()
    if has_counts:
        con.execute("INSERT INTO gpkg_ogr_contents (table_name, feature_count) VALUES ('layer_styles', 0)")
        for trigger in _TRIGGERS:
            con.execute(trigger)


def split_antimeridian(geom: Any) -> Any:
    """A lon/lat polygon whose rings jump across the antimeridian (a longitude extent over 180
    degrees) as a MultiPolygon of its parts west and east of it; other geometries unchanged."""
    if geom is None or geom.is_empty or geom.bounds[2] - geom.bounds[0] <= 180.0:
        return geom
    shifted = shapely.transform(geom, lambda xy: np.column_stack(
        [np.where(xy[:, 0] < 0.0, xy[:, 0] + 360.0, xy[:, 0]), xy[:, 1]]))
    west = shapely.clip_by_rect(shifted, 0.0, -90.0, 180.0, 90.0)
    east = shapely.affinity.translate(shapely.clip_by_rect(shifted, 180.0, -90.0, 360.0, 90.0), -360.0)
    parts = [p for g in (west, east) for p in shapely.get_parts(g) if p.geom_type == "Polygon" and not p.is_empty]
    return shapely.MultiPolygon(parts)


def to_lonlat(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """``gdf`` in EPSG:4326, polygons across the antimeridian split there (never drawn around the world)."""
    out = gdf.to_crs("EPSG:4326")
    return out.set_geometry(out.geometry.map(split_antimeridian))


def write_geopackage(
    gdf: gpd.GeoDataFrame,
    path: Path | str,
    *,
    layer: str = "landslides",
    style_qml: str | None = None,
    style_sld: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    crs: Literal["grid", "EPSG:4326"] = "grid",
) -> Path:
    """Write ``gdf`` as a styled, indexed GeoPackage layer, atomically.

    ``crs="grid"`` keeps the frame's CRS, ``"EPSG:4326"`` reprojects.
    ``style_qml`` defaults to :func:`postprocess.style.default_qml`.
    ``metadata`` describes the run (JSON-serializable values; others are
    written with ``str``). An empty frame gives a valid layer with its
    schema and no features. Raises :class:`OutputError` naming the directory
    when it cannot be created or written.
    """
    path = Path(path)
    if crs not in ("grid", "EPSG:4326"):
        raise OutputError(f"output.crs: expected 'grid' or 'EPSG:4326', got {crs!r}")
    if gdf.crs is None:
        raise OutputError(f"{path}: the polygons have no CRS")
    meta = dict(metadata or {})
    directory = _output_dir(path)
    tmp = _temporary_path(directory, path.name)
    frame = to_lonlat(gdf) if crs == "EPSG:4326" else gdf
    try:
        _write_layer(frame, tmp, layer, meta)
        add_qgis_style(
            tmp,
            layer,
            style_qml if style_qml is not None else default_qml(),
            sld=style_sld if style_sld is not None else default_sld(name=layer),
            name=f"{layer} (probability classes)",
            description="Landslide polygons by mean probability",
        )
        verify_geopackage(tmp, layer, len(frame))
        os.replace(tmp, path)
    except WriteCheckFailed as exc:
        failure = fsutil.write_failure(path, f"{tmp.name} read back: {exc}", written=_files(tmp),
                                       what="cannot write the GeoPackage")
        _remove(tmp)
        raise failure from None
    except OutputError:
        _remove(tmp)
        raise
    except (OSError, sqlite3.Error, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        # a full disk surfaces as any of these: GDAL's "Failed to commit transaction", SQLite's
        # "database or disk is full", "[Errno 28] No space left on device"
        failure = fsutil.write_failure(path, str(exc), exc, written=_files(tmp),
                                       what="cannot write the GeoPackage")
        _remove(tmp)
        raise failure from None
    except BaseException:
        _remove(tmp)
        raise
    log.info("wrote %d features to %s (layer %s)", len(frame), path, layer)
    return path


def _write_layer(frame: gpd.GeoDataFrame, tmp: Path, layer: str, metadata: Mapping[str, Any]) -> None:
    """The layer with its spatial index, description and run metadata, written by GDAL to ``tmp``."""
    blob = json.dumps(metadata, default=str, sort_keys=True)
    description = _description(metadata, len(frame))
    pyogrio.write_dataframe(
        frame,
        tmp,
        layer=layer,
        driver="GPKG",
        geometry_type=_geometry_type(frame),
        promote_to_multi=_geometry_type(frame) == "MultiPolygon",
        layer_options={"SPATIAL_INDEX": "YES", "DESCRIPTION": description, "IDENTIFIER": layer},
        layer_metadata={METADATA_ITEM: blob, "DESCRIPTION": description},
        dataset_metadata={METADATA_ITEM: blob},
        dataset_options={"VERSION": GPKG_VERSION},
    )


def verify_geopackage(path: Path | str, layer: str, features: int) -> None:
    """Read back a GeoPackage just written, before it moves into place: SQLite's
    ``PRAGMA quick_check`` (every page and record readable; a truncated file fails), the number
    of rows of ``layer`` and GDAL's feature count, both ``features``, and the layer's default
    style. Opened read-only. Raises :class:`~pipeline.core.fsutil.WriteCheckFailed`."""
    path = Path(path)
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            problems = [row[0] for row in con.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise WriteCheckFailed(f"SQLite quick_check: {'; '.join(map(str, problems[:3]))}")
            rows = con.execute(f'SELECT count(*) FROM "{layer.replace(chr(34), chr(34) * 2)}"').fetchone()[0]
            styled = con.execute("SELECT count(*) FROM layer_styles WHERE f_table_name = ? AND useAsDefault",
                                 (layer,)).fetchone()[0]
        finally:
            con.close()
        info = pyogrio.read_info(path, layer=layer)
    except WriteCheckFailed:
        raise
    except (OSError, sqlite3.Error, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        raise WriteCheckFailed(f"cannot read it back ({exc})") from None
    if rows != features or info["features"] != features:
        raise WriteCheckFailed(f"{rows} rows ({info['features']} features for GDAL) read back, expected {features}")
    if not styled:
        raise WriteCheckFailed(f"layer {layer!r} has no default style")


def _files(path: Path) -> list[Path]:
    return [path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")]


def _remove(path: Path) -> None:
    for p in _files(path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - best effort cleanup
            log.warning("could not remove temporary file %s: %s", p, exc)


def read_run_metadata(path: Path | str, layer: str = "landslides") -> dict[str, Any]:
    """The run description stored by :func:`write_geopackage`."""
    info = pyogrio.read_info(path, layer=layer)
    items = info.get("layer_metadata") or {}
    return json.loads(items[METADATA_ITEM]) if METADATA_ITEM in items else {}
