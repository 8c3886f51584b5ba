"""The demo's reference: the painted scars as a 10 m mask and as polygons in a GeoPackage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio

from pipeline.demo.scene import DemoScene

if TYPE_CHECKING:
    import geopandas as gpd


def write_truth(scene: DemoScene, mask_path: Path, gpkg_path: Path) -> None:
    """``truth_mask.tif`` (uint8, 1 = scar) and ``truth_scars.gpkg`` (layer ``truth_scars``)."""
    with rasterio.open(
        mask_path, "w", driver="GTiff", width=scene.size, height=scene.size, count=1, dtype="uint8",
        crs=scene.crs, transform=scene.transform, compress="deflate", tiled=True,
        blockxsize=256, blockysize=256,
    ) as dst:
        dst.write(scene.truth_mask(), 1)
        dst.set_band_description(1, "landslide scar (1) or not (0)")
    _scar_polygons(scene).to_file(gpkg_path, layer="truth_scars", driver="GPKG")


def _scar_polygons(scene: DemoScene) -> gpd.GeoDataFrame:
    """One row per scar: id, area, length, mean slope and its polygon, in the scene's CRS."""
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape
    from shapely.ops import unary_union

    labels = scene.scar_labels
    parts: dict[int, list[Any]] = {}
    for geom, value in shapes(labels, mask=labels > 0, transform=scene.transform):
        parts.setdefault(int(value), []).append(shape(geom))
    rows = []
    for scar in scene.scars:
        sel = labels == scar.scar_id
        rows.append({
            "scar_id": scar.scar_id,
            "area_m2": float(sel.sum() * 100.0),
            "length_m": round(scar.length_m, 1),
            "mean_slope_deg": round(float(scene.slope[sel].mean()), 2),
            "geometry": unary_union(parts.get(scar.scar_id, [])),
        })
    if rows:
        return gpd.GeoDataFrame(rows, geometry="geometry", crs=scene.crs.to_wkt())
    return gpd.GeoDataFrame(
        {"scar_id": np.array([], np.int64), "area_m2": np.array([], float),
         "length_m": np.array([], float), "mean_slope_deg": np.array([], float)},
        geometry=gpd.GeoSeries([], crs=scene.crs.to_wkt()),
    )
