"""Reading polygon files for object metrics: GeoPackages, shapefiles and members of zip archives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.io.gdal import no_sidecars


def read_polygons(path: Path, layer: str | None = None) -> Any:
    """Read a polygon file (GeoPackage, shapefile, zipped shapefile) as a GeoDataFrame.

    Reading leaves nothing beside the file: GDAL would write the GeoPackage's dataset metadata to a
    ``.aux.xml`` sidecar on closing it (its persistent auxiliary metadata, switched off here).
    """
    import geopandas as gpd

    target = _vector_source(Path(path))
    with no_sidecars():
        try:
            if layer is None:
                layer = _polygon_layer(path, target)
            return gpd.read_file(target, layer=layer) if layer else gpd.read_file(target)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyogrio raises many types
            raise InputError(f"{path}: cannot read polygons: {exc}") from None


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
