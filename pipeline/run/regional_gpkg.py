"""The regional GeoPackage: its three layers written into one file atomically.

:func:`postprocess.gpkg.write_geopackage` writes one layer per file (each call moves a new file
into place), so the regional file is built as a hidden temporary beside the target: the
``landslides`` layer by ``write_geopackage`` (styled, indexed, read back), then ``new_landslides``
and ``not_observed`` added with pyogrio, each styled and read back
(:func:`postprocess.gpkg.verify_geopackage`), then the temporary is renamed over the target. A
reader sees the previous night's file or this night's, never a mix; a failure leaves the previous
file and no temporary; a full disk raises :class:`~pipeline.core.errors.DiskFull` naming the folder.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import geopandas as gpd
import pyogrio
import pyogrio.errors

from pipeline.core import fsutil
from pipeline.core.errors import OutputError
from pipeline.core.fsutil import WriteCheckFailed
from pipeline.io.gdal import no_sidecars
from pipeline.run.tracking import RegionalLayers

log = logging.getLogger(__name__)

LAYERS = ("landslides", "new_landslides", "not_observed")

_FILL = ('<Option type="QString" value="110,110,110,255" name="color"/>'
         '<Option type="QString" value="b_diagonal" name="style"/>'
         '<Option type="QString" value="70,70,70,255" name="outline_color"/>'
         '<Option type="QString" value="solid" name="outline_style"/>'
         '<Option type="QString" value="0.26" name="outline_width"/>'
         '<Option type="QString" value="MM" name="outline_width_unit"/>')
#: The QGIS style of ``not_observed``: grey diagonal hatching, one symbol.
NOT_OBSERVED_QML = f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="Symbology|Labeling|Fields" hasScaleBasedVisibilityFlag="0" minScale="100000000" maxScale="0" labelsEnabled="0">
  <renderer-v2 type="singleSymbol" symbollevels="0" forceraster="0" enableorderby="0" referencescale="-1">
    <symbols>
      <symbol alpha="0.8" force_rhr="0" type="fill" clip_to_extent="1" name="0">
        <layer class="SimpleFill" enabled="1" locked="0" pass="0">
          <Option type="Map">{_FILL}</Option>
        </layer>
      </symbol>
    </symbols>
    <rotation/>
    <sizescale/>
  </renderer-v2>
  <previewExpression>"date"</previewExpression>
  <layerGeometryType>2</layerGeometryType>
</qgis>
"""
NOT_OBSERVED_SLD = """<?xml version="1.0" encoding="UTF-8"?>
<StyledLayerDescriptor xmlns="http://www.opengis.net/sld" version="1.1.0" xmlns:se="http://www.opengis.net/se">
  <NamedLayer><se:Name>not_observed</se:Name><UserStyle><se:Name>not_observed</se:Name><se:FeatureTypeStyle>
    <se:Rule><se:Name>not observed</se:Name><se:PolygonSymbolizer>
      <se:Fill><se:SvgParameter name="fill">#6e6e6e</se:SvgParameter><se:SvgParameter name="fill-opacity">0.35</se:SvgParameter></se:Fill>
      <se:Stroke><se:SvgParameter name="stroke">#464646</se:SvgParameter></se:Stroke>
    </se:PolygonSymbolizer></se:Rule>
  </se:FeatureTypeStyle></UserStyle></NamedLayer>
</StyledLayerDescriptor>
"""


def _temporary(path: Path) -> Path:
    """A new name for the temporary file beside ``path`` (``.<name>.<random>.tmp.gpkg``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = fsutil.mkstemp(prefix=f".{path.name}.", suffix=".tmp.gpkg", dir=path.parent)
    except OSError as exc:
        raise fsutil.folder_failure(exc, path, f"{path.parent}: cannot write the regional GeoPackage "
                                    f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)  # GDAL creates it
    return Path(tmp)


def _files(tmp: Path) -> list[Path]:
    return [tmp, *(Path(f"{tmp}{s}") for s in ("-journal", "-wal", "-shm"))]


def _remove(tmp: Path) -> None:
    for p in _files(tmp):
        try:
            p.unlink(missing_ok=True)
        except OSError as exc:  # pragma: no cover - best effort
            log.warning("could not remove temporary file %s: %s", p, exc)


def remove_stale_temporaries(path: Path) -> list[str]:
    """Remove the temporaries an interrupted job left beside the regional GeoPackage ``path``
    (its own and :func:`~postprocess.gpkg.write_geopackage`'s); call only while holding the
    region's lock. Returns the names removed."""
    removed = []
    for pattern in (f".{path.name}.*", f"..{path.name}.*"):
        for p in sorted(path.parent.glob(pattern)):
            if ".tmp.gpkg" in p.name and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p.name)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted regional write: %s", len(removed), ", ".join(removed))
    return removed


def _add_layer(tmp: Path, name: str, frame: gpd.GeoDataFrame, description: str, style: tuple[str, str],
               metadata: Mapping[str, Any]) -> None:
    """Add ``frame`` as layer ``name`` (MultiPolygon, indexed, described, styled) to the GeoPackage ``tmp``."""
    from postprocess.gpkg import METADATA_ITEM, add_qgis_style

    blob = json.dumps(metadata, default=str, sort_keys=True)
    pyogrio.write_dataframe(
        frame, tmp, layer=name, driver="GPKG", geometry_type="MultiPolygon", promote_to_multi=True,
        layer_options={"SPATIAL_INDEX": "YES", "DESCRIPTION": description, "IDENTIFIER": name},
        layer_metadata={METADATA_ITEM: blob, "DESCRIPTION": description},
    )
    add_qgis_style(tmp, name, style[0], sld=style[1], name=name, description=description)


def _layers_into(tmp: Path, layers: RegionalLayers, metadata: Mapping[str, Any]) -> None:
    """Write the three layers into the new file ``tmp`` and read each back."""
    from postprocess.gpkg import verify_geopackage, write_geopackage
    from postprocess.style import default_qml, default_sld

    night = layers.newest_night or "none"
    write_geopackage(layers.landslides, tmp, layer="landslides",
                     metadata={**metadata, "description": f"{len(layers.landslides)} landslides tracked over "
                               f"{len({r.night for r in layers.runs if r.night})} night(s)"})
    _add_layer(tmp, "new_landslides", layers.new_landslides,
               f"{len(layers.new_landslides)} landslides first seen on {night}, the newest night of the job",
               (default_qml(), default_sld(name="new_landslides")), metadata)
    _add_layer(tmp, "not_observed", layers.not_observed,
               "per night: the part of the region's scene footprints that no valid pixel covered",
               (NOT_OBSERVED_QML, NOT_OBSERVED_SLD), metadata)
    for name in LAYERS:
        verify_geopackage(tmp, name, len(getattr(layers, name)))


def write_regional_geopackage(layers: RegionalLayers, path: Path, *, region: str) -> Path:
    """Write ``layers`` to the regional GeoPackage ``path`` (layers :data:`LAYERS`), atomically."""
    path = Path(path)
    metadata = {"region": region, "crs": "EPSG:4326", "newest_night": layers.newest_night,
                "runs": [str(r.run_dir) for r in layers.runs]}
    tmp = _temporary(path)
    try:
        with no_sidecars():  # no .aux.xml beside the temporary
            _layers_into(tmp, layers, metadata)
        os.replace(tmp, path)
    except WriteCheckFailed as exc:
        failure = fsutil.write_failure(path, f"{tmp.name} read back: {exc}", written=_files(tmp),
                                       what="cannot write the regional GeoPackage")
        _remove(tmp)
        raise failure from None
    except OutputError:
        _remove(tmp)
        raise
    except (OSError, sqlite3.Error, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        failure = fsutil.write_failure(path, str(exc), exc, written=_files(tmp),
                                       what="cannot write the regional GeoPackage")
        _remove(tmp)
        raise failure from None
    except BaseException:
        _remove(tmp)
        raise
    log.info("regional GeoPackage %s: %d landslide(s), %d new on %s, %d night(s) in not_observed", path,
             len(layers.landslides), len(layers.new_landslides), layers.newest_night,
             len(layers.not_observed))
    return path
