"""Stacking the real scenes in ../shared/data onto one 10 m grid.

Slovenia: 13 bands + DEM on the same (not quite 10 m) UTM grid.
Virginia: 20 m and 60 m bands to 10 m, with a synthetic EPSG:4326 DEM.
Iburi: EPSG:4326 bands and a 30 m DSM to UTM 54N, only B02-B04.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import yaml
from affine import Affine
from rasterio.warp import transform_bounds
from shapely.geometry import box
from test_slope import gdaldem_slope

from pipeline.cli.stack import add_stack_arguments, cli_stack
from pipeline.core.channels import L4S_CHANNELS
from pipeline.core.config import SceneConfig
from pipeline.core.errors import ChannelError, InputError
from pipeline.core.grid import Grid
from pipeline.run.validate import validate_scene
from pipeline.stack.layers import Stack, save_stack, stack_scene
from pipeline.stack.terrain import horn_slope, horn_slope_dask


def scene_cfg(scene: dict[str, object], dem: str | Path, tmp_path: Path | None = None,
              **extra: object) -> SceneConfig:
    data = {"scene": scene, "dem": {"path": str(dem)}, **extra}
    return SceneConfig.model_validate(data, context={"base_dir": tmp_path} if tmp_path else None)


def read_raw(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def assert_aligned(stack: Stack, epsg: int, res: float = 10.0, block: int = 256) -> None:
    g = stack.grid
    assert g.crs.to_epsg() == epsg
    assert g.res == (res, res)
    assert g.transform.c % res == 0 and g.transform.f % res == 0
    data, valid = stack.data, stack.valid
    assert data.dims == ("band", "y", "x") and valid.dims == ("y", "x")
    assert data.dtype == np.float32 and valid.dtype == bool
    assert data.shape[1:] == g.shape == valid.shape
    assert isinstance(data.data, dask.array.Array) and isinstance(valid.data, dask.array.Array)
    assert data.rio.crs == g.crs and data.rio.transform() == g.transform
    np.testing.assert_allclose(data.x.values[:2], [g.transform.c + res / 2, g.transform.c + 1.5 * res])
    np.testing.assert_allclose(data.y.values[0], g.transform.f - res / 2)
    assert data.data.chunks[0] == (data.shape[0],)
    assert max(data.data.chunks[1]) <= block and data.data.chunks[1:] == valid.data.chunks


# ---------------------------------------------------------------------------
# Slovenia
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slovenia(shared_data: Path) -> Path:
    return shared_data / "scenes" / "slovenia_l1c"


def test_slovenia_14_channels_in_l4s_order(slovenia: Path) -> None:
    cfg = scene_cfg({"bands_dir": str(slovenia)}, slovenia / "dem.tif", grid={"block_size": 256})
    stack = stack_scene(cfg)
    assert list(stack.data.band.values) == list(L4S_CHANNELS)
    assert stack.product == "bands" and stack.scene_id == "slovenia_l1c"
    assert_aligned(stack, 32633)
    with rasterio.open(slovenia / "B02.tif") as ds:
        src_bounds = ds.bounds
    g = stack.grid.bounds
    # the grid covers the source and exceeds it by less than one pixel on each side
    assert g[0] <= src_bounds[0] < g[0] + 10 and g[2] - 10 < src_bounds[2] <= g[2]
    assert g[1] <= src_bounds[1] < g[1] + 10 and g[3] - 10 < src_bounds[3] <= g[3]

    data, valid = dask.compute(stack.data, stack.valid)
    v = valid.values
    src_nodata = (read_raw(slovenia / "B02.tif") == 0).mean()
    assert abs((1 - v.mean()) - src_nodata) < 0.06  # 21 % no-data plus the partly covered edge rows
    for band in L4S_CHANNELS[:12]:
        refl = data.sel(band=band).values[v]
        raw = read_raw(slovenia / f"{band}.tif")
        raw = raw[raw > 0] / 10000.0
        assert np.isfinite(refl).all()
        assert raw.min() - 1e-6 <= refl.min() and refl.max() <= raw.max() + 1e-6, band
        assert abs(refl.mean() - raw.mean()) < 0.02 * raw.mean() + 1e-4, band
    dem = data.sel(band="DEM").values[v]
    assert dem.min() >= 664 and dem.max() <= 801
    slope = data.sel(band="SLOPE").values[v]
    assert slope.min() >= 0 and slope.max() < 60 and slope.mean() > 1


# ---------------------------------------------------------------------------
# Virginia: 20 m and 60 m bands, synthetic lon/lat DEM
# ---------------------------------------------------------------------------
def lonlat_dem(path: Path, bounds_utm: tuple[float, float, float, float], crs: str) -> Path:
    """A 1 arc-second DEM in EPSG:4326 covering ``bounds_utm``: a tilted plane with a hill."""
    w, s, e, n = transform_bounds(crs, "EPSG:4326", *bounds_utm)
    res = 1 / 3600
    left, top = w - 0.01, n + 0.01
    cols, rows = int((e - w + 0.02) / res), int((n - s + 0.02) / res)
    r, c = np.mgrid[0:rows, 0:cols]
    z = 200 + 0.5 * c + 0.2 * r + 150 * np.exp(-((r - rows / 2) ** 2 + (c - cols / 2) ** 2) / (0.1 * rows * cols))
    z[rows // 3:rows // 3 + 10, cols // 3:cols // 3 + 10] = -32768  # a void inside the scene
    with rasterio.open(path, "w", driver="GTiff", width=cols, height=rows, count=1, dtype="int16",
                       nodata=-32768, crs="EPSG:4326", transform=Affine(res, 0, left, 0, -res, top)) as ds:
        ds.write(np.round(z).astype(np.int16), 1)
    return path


def test_virginia_20m_and_60m_bands_to_10m(shared_data: Path, tmp_path: Path) -> None:
    vdir = shared_data / "scenes" / "virginia_18SVG_l1c"
    with rasterio.open(vdir / "B05.tif") as b20, rasterio.open(vdir / "B01.tif") as b60:
        common = (max(b20.bounds[0], b60.bounds[0]), max(b20.bounds[1], b60.bounds[1]),
                  min(b20.bounds[2], b60.bounds[2]), min(b20.bounds[3], b60.bounds[3]))
    dem = lonlat_dem(tmp_path / "dem_4326.tif", common, "EPSG:32618")
    channels = ["B01", "B05", "B8A", "B09", "B11", "B12", "SLOPE", "DEM"]
    cfg = scene_cfg({"bands_dir": str(vdir)}, dem, grid={"block_size": 512})
    stack = stack_scene(cfg, channels)
    assert_aligned(stack, 32618, block=512)
    # the footprint all bands share, at 10 m: exactly the common bounds (multiples of 60 m)
    assert stack.grid == Grid.from_bounds(common, "EPSG:32618", 10)
    assert stack.grid.width == round((common[2] - common[0]) / 10)

    data, valid = dask.compute(stack.data, stack.valid)
    v = valid.values
    assert v.mean() > 0.97
    b05 = read_raw(vdir / "B05.tif")
    up = data.sel(band="B05").values
    # a 10 m pixel inside a 20 m pixel interpolates its neighbours: the 2x2 means follow the 20 m source
    rows, cols = up.shape[0] // 2, up.shape[1] // 2
    col0 = int((common[0] - 435720) / 20)
    row0 = int((4179460 - common[3]) / 20)
    means = up[: rows * 2, : cols * 2].reshape(rows, 2, cols, 2).mean(axis=(1, 3))
    src = b05[row0:row0 + rows, col0:col0 + cols] / 10000.0
    inner = np.s_[1:-1, 1:-1]
    assert np.corrcoef(means[inner].ravel(), src[inner].ravel())[0, 1] > 0.97
    assert abs(np.nanmean(means) - src.mean()) < 0.005
    for band in ("B01", "B09"):  # 60 m
        got = data.sel(band=band).values[v]
        raw = read_raw(vdir / f"{band}.tif")
        assert raw.min() / 1e4 - 1e-6 <= got.min() and got.max() <= raw.max() / 1e4 + 1e-6
    d = data.sel(band="DEM").values
    assert np.nanmin(d) >= 200 and np.nanmax(d) < 200 + 0.5 * 4000 + 150
    assert np.isnan(d).any() and not v[np.isnan(d)].any()  # the void is invalid
    s = data.sel(band="SLOPE").values[v]
    assert s.min() >= 0 and s.max() < 45


# ---------------------------------------------------------------------------
# Iburi: EPSG:4326 bands and DSM to UTM 54N
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iburi(shared_data: Path) -> Path:
    return shared_data / "scenes" / "iburi_2018"


IBURI_CHANNELS = ["B02", "B03", "B04", "SLOPE", "DEM"]


def iburi_cfg(iburi: Path, phase: str = "post", block: int = 256, **extra: object) -> SceneConfig:
    return scene_cfg({"bands_dir": str(iburi / phase)}, iburi / "dem" / "aw3d30_dsm.tif",
                     grid={"block_size": block}, **extra)


def test_iburi_lonlat_bands_and_dsm_to_utm54(iburi: Path) -> None:
    stack = stack_scene(iburi_cfg(iburi), IBURI_CHANNELS)
    assert_aligned(stack, 32654)
    lon0, lat0, lon1, lat1 = stack.grid.bounds_in("EPSG:4326")
    assert 141.88 < lon0 < 141.90 and 142.02 < lon1 < 142.04
    assert 42.67 < lat0 < 42.69 and 42.76 < lat1 < 42.78
    data, valid = dask.compute(stack.data, stack.valid)
    v = valid.values
    assert v.mean() > 0.9
    for band in ("B02", "B03", "B04"):
        raw = read_raw(iburi / "post" / f"{band}.tif") / 1e4
        got = data.sel(band=band).values[v]
        assert raw.min() - 1e-6 <= got.min() and got.max() <= raw.max() + 1e-6
        assert abs(got.mean() - raw.mean()) < 0.03 * raw.mean()
    dem = data.sel(band="DEM").values[v]
    raw_dem = read_raw(iburi / "dem" / "aw3d30_dsm.tif")
    assert raw_dem.min() <= dem.min() and dem.max() <= raw_dem.max()
    slope = data.sel(band="SLOPE").values[v]
    assert slope.min() >= 0 and 25 < slope.max() < 80   # steep earthquake-scarred hills


def test_iburi_pre_event_nodata_is_invalid(iburi: Path) -> None:
    stack = stack_scene(iburi_cfg(iburi, "pre"), IBURI_CHANNELS)
    data, valid = dask.compute(stack.data, stack.valid)
    raw_nodata = (read_raw(iburi / "pre" / "B02.tif") == 0).mean()
    assert abs((1 - valid.values.mean()) - raw_nodata) < 0.06
    b02 = data.sel(band="B02").values
    assert not valid.values[np.isnan(b02)].any()
    assert np.isfinite(data.values[:, valid.values]).all()


def test_iburi_all_l4s_channels_is_a_channel_error(iburi: Path) -> None:
    with pytest.raises(ChannelError) as err:
        stack_scene(iburi_cfg(iburi))
    msg = str(err.value)
    for band in ("B01", "B05", "B08", "B10", "B12"):
        assert band in msg.split("it has")[0]
    assert "it has B02, B03, B04, SLOPE, DEM" in msg
    assert str(iburi / "post") in msg


def test_slope_matches_gdaldem_on_the_reprojected_dem(iburi: Path, tmp_path: Path) -> None:
    stack = stack_scene(iburi_cfg(iburi, block=256), ["SLOPE", "DEM"])
    dem, slope = dask.compute(stack.data.sel(band="DEM"), stack.data.sel(band="SLOPE"))
    path = tmp_path / "dem_utm.tif"
    with rasterio.open(path, "w", driver="GTiff", width=stack.grid.width, height=stack.grid.height, count=1,
                       dtype="float32", nodata=-9999, crs=stack.grid.crs, transform=stack.grid.transform) as ds:
        ds.write(np.nan_to_num(dem.values, nan=-9999), 1)
    ref = gdaldem_slope(path, tmp_path / "slope.tif")
    ours = slope.values
    interior = np.zeros(ref.shape, bool)
    interior[1:-1, 1:-1] = True
    both = interior & np.isfinite(ref) & np.isfinite(ours)
    assert both.mean() > 0.9   # gdaldem leaves the edges and void borders empty
    diff = np.abs(ref[both] - ours[both])
    assert diff.mean() < 0.1
    assert np.percentile(diff, 99.9) < 0.1


def test_result_does_not_depend_on_block_size(iburi: Path) -> None:
    small = stack_scene(iburi_cfg(iburi, "pre", block=256), IBURI_CHANNELS)
    large = stack_scene(iburi_cfg(iburi, "pre", block=2048), IBURI_CHANNELS)
    assert small.grid == large.grid
    (a, va), (b, vb) = dask.compute((small.data, small.valid), (large.data, large.valid))
    np.testing.assert_array_equal(va.values, vb.values)
    # the bands go through GDAL's warper (finer than 10 m across): equal to float precision
    for band in ("B02", "B03", "B04"):
        x, y = a.sel(band=band).values, b.sel(band=band).values
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        assert np.nanmax(np.abs(x - y)) < 1e-4, band
    # the 30 m DEM is upsampled by pipeline.io.reproject: bit for bit the same in any block, and so is
    # the slope computed from it
    for band in ("DEM", "SLOPE"):
        np.testing.assert_array_equal(a.sel(band=band).values, b.sel(band=band).values, err_msg=band)


def test_the_stack_reader_reads_any_window_as_the_chunks_give_it(iburi: Path) -> None:
    from rasterio.windows import Window

    stack = stack_scene(iburi_cfg(iburi, "pre", block=256), IBURI_CHANNELS)
    assert stack.reader is not None and stack.reader.shape == stack.data.shape
    # a window across four chunks, as an inference block with its windows' reach reads it
    r0, c0, h, w = 200, 230, 170, 150
    whole = stack.data[:, r0 : r0 + h, c0 : c0 + w].compute().values
    bands = [0, 3, 4]  # B02, SLOPE, DEM
    read = stack.reader.read(bands, Window(c0, r0, w, h))
    assert read.shape == (3, h, w) and read.dtype == np.float32
    # B02 goes through GDAL's warper from EPSG:4326: exact to float precision; the DEM's upsampling
    # (and so the slope) is bit for bit the same in any window
    np.testing.assert_array_equal(np.isnan(read[0]), np.isnan(whole[0]))
    assert np.nanmax(np.abs(read[0] - whole[0])) < 1e-4
    np.testing.assert_array_equal(read[1:], whole[bands[1:]])


def test_aoi_bbox_and_vector_cut_the_grid(iburi: Path, tmp_path: Path) -> None:
    bbox = [141.93, 42.70, 141.97, 42.74]
    cfg = iburi_cfg(iburi, aoi={"bbox": bbox, "crs": "EPSG:4326"})
    stack = stack_scene(cfg, IBURI_CHANNELS)
    assert stack.grid.crs.to_epsg() == 32654 and stack.grid.transform.c % 10 == 0
    lon0, lat0, lon1, lat1 = stack.grid.bounds_in("EPSG:4326")
    assert lon0 <= bbox[0] + 1e-3 and lon1 >= bbox[2] - 1e-3 and lon1 - lon0 < 0.05
    full = stack_scene(iburi_cfg(iburi), IBURI_CHANNELS)
    assert stack.grid.width < full.grid.width / 2
    # the cut grid is a window of the full grid: same pixel edges, same values
    col = round((stack.grid.transform.c - full.grid.transform.c) / 10)
    row = round((full.grid.transform.f - stack.grid.transform.f) / 10)
    sub = full.data.isel(x=slice(col, col + stack.grid.width), y=slice(row, row + stack.grid.height))
    np.testing.assert_allclose(stack.data.sel(band=["B02", "B03", "B04"]).values,
                               sub.sel(band=["B02", "B03", "B04"]).values, atol=1e-4, equal_nan=True)
    np.testing.assert_allclose(stack.data.sel(band="DEM").values, sub.sel(band="DEM").values, atol=0.01)
    # slope at the cut edge misses its outer neighbours; inside it is the same
    np.testing.assert_allclose(stack.data.sel(band="SLOPE").values[1:-1, 1:-1],
                               sub.sel(band="SLOPE").values[1:-1, 1:-1], atol=0.01)

    poly = box(141.94, 42.71, 141.96, 42.73)
    gpkg = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame({"name": ["a"]}, geometry=[poly], crs="EPSG:4326").to_file(gpkg)
    vec = stack_scene(iburi_cfg(iburi, aoi={"path": str(gpkg)}), IBURI_CHANNELS)
    valid = vec.valid.values
    inside = gpd.GeoSeries([poly], crs="EPSG:4326").to_crs(vec.grid.crs).iloc[0]
    assert abs(valid.sum() * 100 - inside.area) < 0.05 * inside.area
    rows, cols = np.nonzero(valid)
    xs, ys = vec.data.x.values[cols], vec.data.y.values[rows]
    assert shapely.contains_xy(inside, xs, ys).all()
    assert not valid.all()  # the rotated lon/lat box does not fill its UTM bounding grid


# ---------------------------------------------------------------------------
# COG output and the stack command
# ---------------------------------------------------------------------------
def test_save_stack_writes_a_tiled_cog(iburi: Path, tmp_path: Path) -> None:
    stack = stack_scene(iburi_cfg(iburi, "pre"), IBURI_CHANNELS)
    out = save_stack(stack, tmp_path / "out" / "stack.tif")
    data, valid = dask.compute(stack.data, stack.valid)
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.count == 5 and ds.dtypes[0] == "float32"
        assert ds.descriptions == tuple(IBURI_CHANNELS)
        assert ds.crs == stack.grid.crs and ds.transform == stack.grid.transform
        assert ds.block_shapes[0] == (512, 512)
        assert ds.overviews(1)
        written = ds.read()
    expected = np.where(valid.values, data.values, np.nan)
    np.testing.assert_array_equal(written, expected)
    assert sorted(p.name for p in out.parent.iterdir()) == ["stack.tif"]  # no temporary files left


def test_cli_stack_and_validate_on_a_yaml_config(iburi: Path, tmp_path: Path) -> None:
    config = tmp_path / "scene.yaml"
    config.write_text(yaml.safe_dump({
        "scene": {"bands_dir": str(iburi / "post"), "id": "iburi-post"},
        "dem": {"path": str(iburi / "dem" / "aw3d30_dsm.tif")},
        "aoi": {"bbox": [141.95, 42.72, 141.96, 42.73]},
        "channels": ["B04", "B03", "B02", "DEM"],
        "output": {"dir": "results"},
    }))
    from pipeline.core.config import load_scene_config

    assert validate_scene(load_scene_config(config)) == []
    parser = argparse.ArgumentParser()
    add_stack_arguments(parser)
    assert cli_stack(parser.parse_args([str(config)])) == 0
    out = tmp_path / "results" / "iburi-post_stack.tif"
    with rasterio.open(out) as ds:
        assert ds.descriptions == ("B04", "B03", "B02", "DEM")
    assert cli_stack(parser.parse_args([str(config), "--channels", "B02,SLOPE", "-o", str(tmp_path / "x.tif")])) == 0
    with rasterio.open(tmp_path / "x.tif") as ds:
        assert ds.descriptions == ("B02", "SLOPE")


@pytest.mark.slow
def test_stack_and_cog_on_a_distributed_process_cluster(iburi: Path, tmp_path: Path) -> None:
    """Tasks pickle to worker processes, the COG writer locks across them, errors keep their type."""
    distributed = pytest.importorskip("distributed")
    stack = stack_scene(iburi_cfg(iburi, "pre", block=512), IBURI_CHANNELS)
    expected = stack.data.where(stack.valid).compute(scheduler="threads").values
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for band in ("B02", "B03", "B04"):
        shutil.copy(iburi / "pre" / f"{band}.tif", bad_dir / f"{band}.tif")
    victim = bad_dir / "B03.tif"
    with rasterio.open(victim) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_2_2", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_2_2", "TIFF", bidx=1))
    raw = bytearray(victim.read_bytes())
    raw[offset:offset + size] = b"\xff" * size
    victim.write_bytes(bytes(raw))
    bad = stack_scene(scene_cfg({"bands_dir": str(bad_dir)}, iburi / "dem" / "aw3d30_dsm.tif",
                                grid={"block_size": 512}), IBURI_CHANNELS)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                  dashboard_address="127.0.0.1:0") as cluster, distributed.Client(cluster):
        out = save_stack(stack, tmp_path / "stack.tif")
        with pytest.raises(InputError, match="B03.tif"):
            save_stack(bad, tmp_path / "bad.tif")
    with rasterio.open(out) as ds:
        np.testing.assert_array_equal(ds.read(), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "stack.tif"]


def test_precomputed_slope_layer_is_reprojected_not_recomputed(iburi: Path) -> None:
    base = iburi_cfg(iburi, block=512)
    given = base.model_copy(update={"dem": base.dem.model_copy(
        update={"slope": iburi / "dem" / "aw3d30_slope.tif"})})
    computed = stack_scene(base, ["SLOPE"]).data.values[0]
    from_file = stack_scene(given, ["SLOPE"]).data.values[0]
    raw = read_raw(iburi / "dem" / "aw3d30_slope.tif")
    finite = np.isfinite(from_file)
    assert finite.mean() > 0.9
    assert raw.min() <= from_file[finite].min() and from_file[finite].max() <= raw.max()
    # 30 m slopes are gentler than 10 m Horn slopes of the interpolated surface: different layers
    assert not np.allclose(from_file[finite], computed[finite], atol=0.5)
    assert np.corrcoef(from_file[finite], np.nan_to_num(computed[finite]))[0, 1] > 0.5


def test_write_cog_masks_and_integer_rasters(tmp_path: Path) -> None:
    """The writer is general: (y, x) numpy input, float NaN to integer nodata, categorical overviews."""
    from pipeline.io.cog import write_cog

    grid = Grid.from_bounds((500000, 4000000, 500000 + 7000, 4000000 + 5000), "EPSG:32633", 10)
    rng = np.random.default_rng(0)
    prob = rng.random(grid.shape).astype(np.float32)
    prob[:50, :70] = np.nan
    mask = np.where(np.isnan(prob), np.nan, (prob > 0.5).astype(np.float32))
    lazy = dask.array.from_array(mask, chunks=(256, 256))
    out = write_cog(lazy, grid, tmp_path / "mask.tif", dtype="uint8", nodata=255,
                    overview_resampling="nearest", tags={"threshold": "0.5"})
    with rasterio.open(out) as ds:
        assert ds.count == 1 and ds.dtypes[0] == "uint8" and ds.nodata == 255
        assert ds.tags()["threshold"] == "0.5"
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        got = ds.read(1)
        assert set(np.unique(ds.read(1, out_shape=(grid.height // 4, grid.width // 4)))) <= {0, 1, 255}
    np.testing.assert_array_equal(got, np.where(np.isnan(mask), 255, mask).astype(np.uint8))
    plain = write_cog(prob, grid, tmp_path / "prob.tif", dtype="float32", nodata=float("nan"), overview=False)
    with rasterio.open(plain) as ds:
        np.testing.assert_array_equal(ds.read(1), prob)
        assert ds.overviews(1) == []


def test_cog_from_a_plain_tiled_intermediate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain tiled GeoTIFF (cog=False) becomes a COG with overviews, the same pixels, tags and
    no-data; the intermediate stays; a failed conversion leaves nothing at the final path."""
    import rasterio.shutil as rshutil

    from pipeline.core.errors import OutputError
    from pipeline.io.cog import RasterOutput, cog_from_tiff, write_rasters

    grid = Grid.from_bounds((500000, 4000000, 500000 + 9000, 4000000 + 6000), "EPSG:32633", 10)
    rng = np.random.default_rng(1)
    values = rng.integers(0, 255, grid.shape, dtype=np.uint8)
    lazy = dask.array.from_array(values, chunks=(256, 256))
    plain, = write_rasters([RasterOutput(lazy, tmp_path / ".p.tif", "uint8", 255, tags={"scale": "0.5"}, cog=False)],
                           grid)
    with rasterio.open(plain) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG" and ds.overviews(1) == []
    out = cog_from_tiff(plain, tmp_path / "p.tif")
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and ds.overviews(1)
        assert ds.tags()["scale"] == "0.5" and ds.nodata == 255
        np.testing.assert_array_equal(ds.read(1), values)
    assert plain.is_file()

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise rasterio.errors.RasterioError("disk full (test)")

    monkeypatch.setattr(rshutil, "copy", broken)
    with pytest.raises(OutputError, match=r"q\.tif: cannot write the COG"):
        cog_from_tiff(plain, tmp_path / "q.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".p.tif", "p.tif"]


def test_plain_intermediate_is_created_without_writing_its_tiles_first(tmp_path: Path) -> None:
    """The temporary tiled GeoTIFF is created sparse (GDAL would otherwise write every tile of an
    uncompressed file as zeros before the first block is computed); once stored, every tile is in
    the file, even blocks of zeros, and the values read back exactly."""
    from pipeline.io.cog import RasterOutput, _start, write_rasters

    grid = Grid.from_bounds((500000, 4000000, 500000 + 20480, 4000000 + 20480), "EPSG:32633", 10)
    values = np.zeros((2, *grid.shape), np.float32)
    values[0, :1024] = 1.5  # the other blocks stay zero: they must be written all the same
    lazy = dask.array.from_array(values, chunks=(2, 512, 512))
    out = RasterOutput(lazy, tmp_path / ".layers.tif", "float32", None, cog=False)
    plan = _start(out, grid)
    full = 2 * grid.height * grid.width * 4
    assert plan["tmp_tiff"].stat().st_size < full // 100  # nothing but the header and tile index
    plan["tmp_tiff"].unlink()
    plain, = write_rasters([out], grid)
    assert plain.stat().st_size >= full
    with rasterio.open(plain) as ds:
        assert ds.block_shapes == [(512, 512)] * 2
        np.testing.assert_array_equal(ds.read(), values)
        offsets = [ds.get_tag_item(f"BLOCK_OFFSET_{i}_{j}", "TIFF", bidx=b)
                   for b in (1, 2) for i in range(ds.width // 512) for j in range(ds.height // 512)]
    assert all(o is not None and int(o) > 0 for o in offsets)  # no tile left out as sparse


def test_blockwise_slope_with_halo_equals_whole_grid_slope(iburi: Path) -> None:
    """Per-block slope from the DEM grown by one pixel equals Horn on the whole reprojected DEM."""
    stack = stack_scene(iburi_cfg(iburi, "pre", block=256), ["DEM", "SLOPE"])
    assert len(stack.data.data.chunks[1]) > 2 and len(stack.data.data.chunks[2]) > 2
    values = stack.data.values
    dem, slope = values[0], values[1]
    whole = horn_slope(dem, *stack.grid.res)
    # the DEM warp is exact per pixel (pipeline.io.reproject): no tolerance needed
    np.testing.assert_array_equal(slope, whole)
    overlap = horn_slope_dask(stack.data.data[0], *stack.grid.res).compute()
    np.testing.assert_array_equal(slope, overlap)
    alone = stack.data.sel(band="SLOPE").values  # reading one channel of a block gives the same
    np.testing.assert_array_equal(alone, slope)


def test_files_kept_open_read_the_same_and_are_closed(iburi: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within ``files_kept_open`` each thread opens each file once for all its windows; the values do
    not change, the files are closed at the end, and a pickled layer carries no open file."""
    import pickle

    from rasterio.windows import Window

    stack = stack_scene(iburi_cfg(iburi, "pre", block=256), IBURI_CHANNELS)
    reader = stack.reader
    assert reader is not None
    windows = [Window(c, r, 256, 256) for r in (0, 256, 512) for c in (0, 256, 512)]
    bands = range(len(IBURI_CHANNELS))
    opened: list = []
    real_open = rasterio.open

    def counting(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        ds = real_open(path, *args, **kwargs)
        opened.append(ds)
        return ds

    monkeypatch.setattr(rasterio, "open", counting)
    each = [reader.read(bands, w) for w in windows]
    per_window = len(opened)
    assert per_window == len(windows) * 4  # three bands and the DEM, every window
    opened.clear()
    with reader.files_kept_open():
        kept = [reader.read(bands, w) for w in windows]
        assert len(opened) == 4 and not any(ds.closed for ds in opened)
        assert pickle.loads(pickle.dumps(reader))._opener is None
    assert all(ds.closed for ds in opened)
    for a, b in zip(each, kept, strict=True):
        np.testing.assert_array_equal(a, b)
    opened.clear()
    reader.read(bands, windows[0])  # after the block: one open per file again
    assert len(opened) == 4 and all(ds.closed for ds in opened)
