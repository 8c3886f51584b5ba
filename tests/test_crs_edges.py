"""Nothing lost, nothing leaked at the edges of the map: UTM zone edges and the antimeridian.

Probability rasters on UTM grids that cross a zone edge (18 deg E, seen from zones 33 and 34) or
the antimeridian (zones 60 and 1, north and south) go through the public postprocessing path
(:func:`postprocess.polygons_from_probability`); every painted object must come back as one valid
polygon with its pixel area and a centroid in [-180, 180] that PROJ, asked here directly, puts at
the mean of the object's pixel centres. The same polygons then go through the EPSG:4326 outputs
(the GeoPackage's ``output.crs`` and the regional merge), and small per-band scenes on those grids
go through the stacking stage (``grid.crs: auto`` and an explicit UTM zone) into polygons.

Expected values are computed here from the painted pixels and pyproj, never by the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
import xarray as xr
from affine import Affine
from pyproj import CRS as PyCRS
from pyproj import Geod, Transformer
from rasterio.crs import CRS
from small_scene import write_raster

from pipeline.core.config import PostprocessSection, SceneConfig
from pipeline.core.grid import Grid
from postprocess.gpkg import write_geopackage
from postprocess.polygons import polygons_from_probability

RES = 10.0
SIZE = 96   # px; the scene is 960 m across, the edge meridian runs through its middle
CHUNK = 45  # dask blocks of the probability raster: block edges at rows/cols 45 and 90
PLAIN = PostprocessSection(opening_radius_m=0, closing_radius_m=0, min_area_m2=0, max_hole_m2=0,
                           min_mean_slope_deg=None, simplify_m=0)
GEOD = Geod(ellps="WGS84")


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


@dataclass(frozen=True)
class Edge:
    """A 96 x 96 px grid of ``epsg`` whose middle column lies on the meridian ``edge_lon``."""

    epsg: int
    x0: float  # left edge (a multiple of 60 m, like a Sentinel-2 tile)
    y0: float  # top edge
    edge_lon: float  # the zone edge (18) or the antimeridian (180)

    @property
    def grid(self) -> Grid:
        return Grid(CRS.from_epsg(self.epsg), Affine(RES, 0, self.x0, 0, -RES, self.y0), SIZE, SIZE)

    def to_lonlat(self) -> Transformer:
        return Transformer.from_crs(PyCRS.from_epsg(self.epsg), PyCRS.from_epsg(4326), always_xy=True)


# At 45 deg N/S the meridians 18 E and 180 lie 236 446 m east of the central meridian of zones 33
# and 60 and as far west of the central meridian of zones 34 and 1 (x = 736 446 and 263 554).
EDGES = {
    "zone33-east-edge-18E": Edge(32633, 735960.0, 4987800.0, 18.0),
    "zone34-west-edge-18E": Edge(32634, 263100.0, 4987800.0, 18.0),
    "zone60-antimeridian": Edge(32660, 735960.0, 4987800.0, 180.0),
    "zone01-antimeridian": Edge(32601, 263100.0, 4987800.0, 180.0),
    "zone60S-antimeridian": Edge(32760, 735960.0, 5013180.0, 180.0),
}
ANTIMERIDIAN = {name for name, e in EDGES.items() if e.edge_lon == 180.0}


def _east_of(lon: np.ndarray | float, edge_lon: float) -> np.ndarray:
    """True east of the meridian ``edge_lon`` (longitudes wrapped: -179.9 is east of 180)."""
    return ((np.asarray(lon) - edge_lon + 180.0) % 360.0 - 180.0) > 0


def _objects() -> list[np.ndarray]:
    """Boolean masks (SIZE x SIZE) of the painted objects: one west of the edge meridian, one east
    of it, one across it and across a block corner, an L-shape across it and across a block edge."""
    shapes = []
    west = np.zeros((SIZE, SIZE), bool)
    west[10:17, 4:13] = True  # 63 px
    shapes.append(west)
    east = np.zeros((SIZE, SIZE), bool)
    east[70:81, 80:92] = True  # 132 px
    shapes.append(east)
    across = np.zeros((SIZE, SIZE), bool)
    across[40:52, 42:55] = True  # 156 px, across rows/cols 45 (a block corner)
    shapes.append(across)
    ell = np.zeros((SIZE, SIZE), bool)
    ell[80:94, 40:45] = True
    ell[89:94, 45:58] = True  # 70 + 65 px, across row 90 (a block edge)
    shapes.append(ell)
    return shapes


def _pixel_centres(edge: Edge, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(mask)
    return edge.x0 + (cols + 0.5) * RES, edge.y0 - (rows + 0.5) * RES


def _probability(shapes: list[np.ndarray]) -> np.ndarray:
    prob = np.full((SIZE, SIZE), 0.1, np.float32)
    for mask in shapes:
        prob[mask] = 0.9
    return prob


def _polygons(edge: Edge, shapes: list[np.ndarray]) -> gpd.GeoDataFrame:
    def lazy(a: np.ndarray) -> xr.DataArray:
        return xr.DataArray(da.from_array(a, chunks=CHUNK), dims=("y", "x"))

    gdf, _ = polygons_from_probability(lazy(_probability(shapes)), lazy(np.ones((SIZE, SIZE), bool)), edge.grid,
                                       PLAIN, threshold=0.5, context={"scene_id": "S2_EDGE"})
    return gdf


def _match(gdf: gpd.GeoDataFrame, edge: Edge, shapes: list[np.ndarray]) -> list[int]:
    """The row of ``gdf`` holding each painted object (the polygon that holds its pixel centres)."""
    rows = []
    for mask in shapes:
        xs, ys = _pixel_centres(edge, mask)
        hits = [i for i, g in enumerate(gdf.geometry) if shapely.contains_xy(g, xs, ys).all()]
        assert len(hits) == 1, f"object of {mask.sum()} px is in {len(hits)} polygons"
        rows.append(hits[0])
    assert sorted(rows) == list(range(len(gdf))), "a polygon that holds no painted object"
    return rows


@pytest.mark.parametrize("name", list(EDGES))
def test_polygons_at_zone_edges_and_the_antimeridian_keep_area_and_place(name: str) -> None:
    edge, shapes = EDGES[name], _objects()
    to_lonlat = edge.to_lonlat()
    # the set-up crosses the edge: the painted objects lie on both sides of it, one across it
    sides = []
    for mask in shapes:
        xs, ys = _pixel_centres(edge, mask)
        sides.append(set(_east_of(to_lonlat.transform(xs, ys)[0], edge.edge_lon).tolist()))
    assert sides[0] == {False} and sides[1] == {True} and sides[2] == sides[3] == {False, True}

    gdf = _polygons(edge, shapes)
    assert len(gdf) == len(shapes)
    assert gdf.crs.to_epsg() == edge.epsg
    for mask, row in zip(shapes, _match(gdf, edge, shapes), strict=True):
        feature = gdf.iloc[row]
        geom = feature.geometry
        count = int(mask.sum())
        assert geom.is_valid and geom.geom_type == "Polygon"
        assert feature["n_pixels"] == count
        assert abs(feature["area_m2"] - count * RES * RES) <= RES * RES  # within one pixel
        assert abs(geom.area - count * RES * RES) <= RES * RES
        # the centroid of equal pixels is the mean of their centres, transformed by PROJ
        xs, ys = _pixel_centres(edge, mask)
        lon, lat = to_lonlat.transform(xs.mean(), ys.mean())
        assert -180.0 <= feature["centroid_lon"] <= 180.0 and -90.0 <= feature["centroid_lat"] <= 90.0
        assert feature["centroid_lon"] == pytest.approx(lon, abs=1e-9)
        assert feature["centroid_lat"] == pytest.approx(lat, abs=1e-9)


@pytest.mark.parametrize("name", list(EDGES))
def test_geographic_geopackage_keeps_each_polygon_where_it_is(name: str, tmp_path: Path) -> None:
    """``output.crs: EPSG:4326``: each written polygon (or each part of it) spans metres, not the
    globe, and its geodesic area is the pixel area (UTM's scale there is within 0.1 %)."""
    edge, shapes = EDGES[name], _objects()
    gdf = _polygons(edge, shapes)
    path = write_geopackage(gdf, tmp_path / "landslides.gpkg", crs="EPSG:4326", metadata={"test": name})
    back = pyogrio.read_dataframe(path, layer="landslides")
    assert back.crs.to_epsg() == 4326 and len(back) == len(shapes)
    for _, feature in back.iterrows():
        geom = feature.geometry
        assert geom.is_valid
        parts = list(shapely.get_parts(geom))
        for part in parts:
            minx, miny, maxx, maxy = part.bounds
            assert -180.0 <= minx <= maxx <= 180.0
            assert maxx - minx < 0.01 and maxy - miny < 0.01, f"a part spans {maxx - minx:.3f} deg of longitude"
        area = sum(abs(GEOD.geometry_area_perimeter(p)[0]) for p in parts)
        assert area == pytest.approx(feature["n_pixels"] * RES * RES, rel=2e-3)
        # the centroid attribute lies on the polygon it describes
        lon, lat = feature["centroid_lon"], feature["centroid_lat"]
        assert min(part.distance(shapely.Point(lon, lat)) for part in parts) < 1e-3


def test_regional_merge_across_the_antimeridian_keeps_separate_landslides() -> None:
    """Scenes in zones 60 and 1 both see the landslide across the antimeridian (one feature after
    the merge); a landslide 4 km away, seen only by the zone 1 scene, stays a feature of its own."""
    from pipeline.run.merge import merge_frames

    zone60, zone01 = EDGES["zone60-antimeridian"], EDGES["zone01-antimeridian"]
    shapes = _objects()
    a = _polygons(zone60, [shapes[2]])
    a["scene_id"] = "S2_T60"
    # the same landslide in zone 1 (its polygon transformed by PROJ), and a 100 m square 4 km east
    # of it at the same latitude
    in_zone01 = gpd.GeoSeries(a.geometry, crs=a.crs).to_crs(zone01.epsg).iloc[0]
    lat = float(a["centroid_lat"].iloc[0])
    x, y = Transformer.from_crs(4326, zone01.epsg, always_xy=True).transform(-179.95, lat)
    apart = shapely.box(x - 50.0, y - 50.0, x + 50.0, y + 50.0)
    b = gpd.GeoDataFrame({"landslide_id": ["b-0", "b-1"], "scene_id": "S2_T01", "mean_prob": [0.8, 0.9]},
                         geometry=[in_zone01, apart], crs=f"EPSG:{zone01.epsg}")
    merged = merge_frames([a, b])
    assert len(merged) == 2
    assert sorted(merged["n_merged"]) == [1, 2]
    alone = merged[merged["n_merged"] == 1].iloc[0]
    assert alone["area_m2"] == pytest.approx(100.0 * 100.0, rel=2e-3)


# -- per-band scenes through the stacking stage ------------------------------------------------
SCENE = 64  # px


def _scene_origin(edge: Edge) -> tuple[int, int]:
    """(row, col) of the scene in the 96 px grid: its centre 80 to 110 m inside the grid's own zone."""
    return 16, (8 if edge.x0 > 500000 else 24)


def _bright(edge: Edge) -> tuple[slice, slice]:
    """An 11 x 11 px square across the edge meridian, in the 96 px grid's rows and columns."""
    return slice(36, 47), (slice(43, 54) if edge.x0 > 500000 else slice(40, 51))


def _write_scene(root: Path, edge: Edge) -> Path:
    """B02, B03, B04 (uint16 DN, 64 x 64 px) and a DEM in the grid's CRS, a bright square in B04."""
    (root / "bands").mkdir(parents=True)
    r0, c0 = _scene_origin(edge)
    rows, cols = _bright(edge)
    transform = edge.grid.transform * Affine.translation(c0, r0)
    crs = f"EPSG:{edge.epsg}"
    for band in ("B02", "B03", "B04"):
        dn = np.full((SCENE, SCENE), 1000, np.uint16)
        if band == "B04":
            dn[rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0] = 8000
        write_raster(root / "bands" / f"T01XXX_{band}.tif", dn, transform, crs=crs)
    dem = np.full((SCENE + 10, SCENE + 10), 500.0, np.float32)
    write_raster(root / "dem.tif", dem, transform * Affine.translation(-5, -5), crs=crs)
    return root


def _scene_centre_zone(edge: Edge) -> int:
    """EPSG code of the UTM zone holding the scene's centre (lon/lat from PROJ, the zone by hand)."""
    r0, c0 = _scene_origin(edge)
    lon, lat = edge.to_lonlat().transform(edge.x0 + (c0 + SCENE / 2) * RES, edge.y0 - (r0 + SCENE / 2) * RES)
    zone = int(np.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


@pytest.mark.parametrize("setting", ["explicit", "auto"])
@pytest.mark.parametrize("name", ["zone33-east-edge-18E", "zone34-west-edge-18E", "zone60-antimeridian",
                                  "zone01-antimeridian"])
def test_stacked_scene_across_an_edge_gives_its_polygon(name: str, setting: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    """A per-band scene stacked on its own UTM zone (``grid.crs`` that zone, or ``auto``: the zone
    of the scene's centre), then thresholded: the bright square across the edge comes back whole,
    where it was."""
    from pipeline.stack.layers import stack_scene

    edge = EDGES[name]
    expected_epsg = _scene_centre_zone(edge)
    assert expected_epsg == edge.epsg  # the set-up: the scene's centre lies in the files' own zone
    root = _write_scene(tmp_path, edge)
    cfg = SceneConfig.model_validate(
        {"scene": {"bands_dir": str(root / "bands")}, "dem": {"path": str(root / "dem.tif")},
         "grid": {"crs": "auto" if setting == "auto" else f"EPSG:{edge.epsg}", "block_size": 256}})
    stack = stack_scene(cfg, ["B02", "B03", "B04", "DEM"])
    assert stack.grid.crs.to_epsg() == expected_epsg
    gdf, _ = polygons_from_probability(stack.data.sel(band="B04"), stack.valid, stack.grid, PLAIN, threshold=0.5,
                                       context={"scene_id": stack.scene_id})
    assert len(gdf) == 1
    feature = gdf.iloc[0]
    assert feature.geometry.is_valid and feature["n_pixels"] == 121
    assert abs(feature["area_m2"] - 121 * RES * RES) <= RES * RES
    assert abs(feature.geometry.area - 121 * RES * RES) <= RES * RES
    # the square's centre and its west and east edges in the files' CRS, transformed by PROJ
    rows, cols = _bright(edge)
    cx, cy = edge.x0 + (cols.start + cols.stop) / 2 * RES, edge.y0 - (rows.start + rows.stop) / 2 * RES
    to_lonlat = edge.to_lonlat()
    west, east = to_lonlat.transform([edge.x0 + cols.start * RES, edge.x0 + cols.stop * RES], [cy, cy])[0]
    assert not _east_of(west, edge.edge_lon) and _east_of(east, edge.edge_lon)  # the set-up: across the edge
    lon, lat = to_lonlat.transform(cx, cy)
    assert -180.0 <= feature["centroid_lon"] <= 180.0
    assert feature["centroid_lon"] == pytest.approx(lon, abs=1e-7)
    assert feature["centroid_lat"] == pytest.approx(lat, abs=1e-7)
