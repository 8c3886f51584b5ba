"""The main job end to end on the built-in demo scene: outputs, reruns, faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from conftest import ROOT, demo_config

from pipeline.core.config import DEFAULT_MODEL, load_scene_config
from pipeline.core.errors import OutputError
from pipeline.model.artefact import load_artefact
from pipeline.run.folder import REPORT
from pipeline.run.scene import run_scene

pytestmark = pytest.mark.slow


_config = demo_config


def test_run_writes_all_outputs_and_rerun_does_nothing(demo: Path, tmp_path: Path, client,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.stack.layers as layers_module

    stacked_again: list[str] = []
    original_aux = layers_module.aux_layers

    def recording_aux(cfg, stack, wanted):  # noqa: ANN001, ANN202
        stacked_again.extend(wanted)
        return original_aux(cfg, stack, wanted)

    monkeypatch.setattr(layers_module, "aux_layers", recording_aux)
    import pipeline.stack.coarse as stack_module

    read_again: list[object] = []
    original_coarse = stack_module.read_coarse

    def recording_coarse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        read_again.append(args)
        return original_coarse(*args, **kwargs)

    monkeypatch.setattr(stack_module, "read_coarse", recording_coarse)
    cfg = _config(demo, tmp_path)
    res = run_scene(cfg, client=client)
    assert res.status == "completed"
    # slope and elevation for the attributes come with the probability, and the quicklook's true
    # colour is averaged onto its coarse grid by the inference blocks that read the bands: nothing
    # stacks or reads the scene a second time
    assert stacked_again == [] and read_again == []
    assert not [p.name for p in res.run_dir.iterdir() if p.name.startswith(".")]  # intermediates removed
    report = json.loads((res.run_dir / REPORT).read_text())
    for stage in ("stack-graph", "infer", "postprocess", "write"):
        assert stage in report["timings_s"]
    assert "scene-stats" not in report["timings_s"]  # a model's statistics are its own, never the scene's
    # the worker-thread time spent in the model's forward pass, from Dask's performance metrics
    inference = report["inference"]
    from tiling.windows import WindowGrid

    art = load_artefact(DEFAULT_MODEL)
    grid = report["grid"]
    assert inference["windows"] == len(WindowGrid(grid["height"], grid["width"], art.tile_size, cfg.model.overlap))
    threads = sum(client.nthreads().values())
    assert inference["worker_threads"] == threads
    assert 0 < inference["model_forward_seconds"] <= threads * report["timings_s"]["infer"]
    assert inference["model_forward_share"] is None  # a cluster the run did not start may work for others
    assert inference["precision"] == "fp32" and inference["chunks_redone_fp32"] == 0  # the CPU's precision
    # the demo is an L2A SAFE product: its level comes from the product metadata and is checked
    # against the levels the shipped model was trained for
    assert "scene_statistics" not in report
    served = "L2A" in art.levels
    assert report["processing_level"] == {
        "scene": "L2A", "source": "product metadata", "models": {art.name or art.architecture: art.levels},
        "served": served, "unserved": [] if served else [art.name or art.architecture],
    }
    # the demo's manifest lists no checksums: the report says the inputs were not verified, and why
    assert report["input_checksums"]["verified"] is False and report["input_checksums"]["reason"]
    for name in ("probability.tif", "mask.tif", "quicklook.png", "report.html", res.geopackage.name):
        assert (res.run_dir / name).is_file(), name
    assert "report.html" in report["outputs"] and "report.html" not in report["output_files"]  # a view, rebuilt

    # outputs are readable like any file the user writes (temporary files are 0600)
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (res.geopackage, res.run_dir / REPORT, res.run_dir / "quicklook.png", res.run_dir / "probability.tif"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path

    info = pyogrio.read_info(res.geopackage, layer="landslides")
    assert info["features"] == res.n_polygons == report["counts"]["polygons"]
    with rasterio.open(res.run_dir / "probability.tif") as src:
        assert src.crs.to_string() == report["grid"]["crs"]
        assert src.profile["tiled"]  # blocks are tiles, not strips
        assert src.dtypes[0] == "uint8" and src.nodata == 255
        # a COG (made from the run's plain intermediate while postprocessing ran; the demo is too
        # small for overviews)
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert float(src.tags()["scale"]) == pytest.approx(1 / 254)
        prob = src.read(1, masked=True)
        assert int(prob.min()) >= 0 and int(prob.max()) <= 254
    if res.n_polygons:
        gdf = pyogrio.read_dataframe(res.geopackage, layer="landslides")
        assert gdf.geometry.is_valid.all()
        assert gdf["landslide_id"].is_unique
        assert sorted(gdf["label"]) == list(range(1, len(gdf) + 1))
        assert (gdf["area_m2"] >= cfg.postprocess.min_area_m2).all()
        assert gdf[["mean_slope", "max_slope", "mean_elev"]].notna().all().all()

    stamp = res.geopackage.stat().st_mtime_ns
    page = (res.run_dir / "report.html").read_bytes()
    (res.run_dir / "report.html").unlink()
    again = run_scene(cfg, client=client)
    assert again.status == "skipped"
    assert again.run_dir == res.run_dir
    assert res.geopackage.stat().st_mtime_ns == stamp
    assert (res.run_dir / "report.html").read_bytes() == page  # a missing page is drawn again, the same

    forced = run_scene(cfg, force=True, client=client)
    assert forced.status == "completed"
    assert forced.n_polygons == res.n_polygons  # recomputed in place, never appended
    assert pyogrio.read_info(forced.geopackage, layer="landslides")["features"] == res.n_polygons

    changed = run_scene(_config(demo, tmp_path, postprocess={"min_area_m2": 2000.0}), client=client)
    assert changed.status == "completed"
    assert changed.run_dir != res.run_dir and res.geopackage.is_file()
    assert (res.run_dir.parent / "LATEST").read_text().strip() == changed.run_dir.name


#: The CLI's main(), then whether this (the main) process imported PyTorch or the model library.
_CLI_THEN_IMPORTS = (
    "import sys\n"
    "from pipeline.__main__ import main\n"
    "code = main(sys.argv[1:])\n"
    "print('main-process-imports:', 'torch' in sys.modules, 'segmentation_models_pytorch' in sys.modules)\n"
    "sys.exit(code)\n"
)


def test_cli_run_prints_outputs_and_summary(demo: Path, tmp_path: Path) -> None:
    """The command line's run and its no-op rerun; the main process reads model metadata only and
    never imports PyTorch (the workers run the model): seconds and hundreds of MB saved per run."""
    text = demo.read_text()
    cfg_path = demo.parent / "cli_scene.yaml"
    cfg_path.write_text(text.replace("dir: output", f"dir: {tmp_path / 'cli_out'}") if "dir: output" in text
                        else text + f"\noutput:\n  dir: {tmp_path / 'cli_out'}\n")
    command = [sys.executable, "-c", _CLI_THEN_IMPORTS, "run", str(cfg_path)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "GeoPackage:" in proc.stdout
    assert "landslide polygon(s)" in proc.stdout
    assert "main-process-imports: False False" in proc.stdout
    proc2 = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc2.returncode == 0
    assert "nothing to do" in proc2.stdout
    assert "main-process-imports: False False" in proc2.stdout


def test_unwritable_output_dir_is_a_clear_error(demo: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = _config(demo, tmp_path)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": blocker / "out"})})
    with pytest.raises(OutputError, match=r"output.dir: output directory .*a_file/out is not writable"):
        run_scene(cfg)


def test_weights_that_do_not_fit_the_architecture_fail_the_run_naming_the_file(
    demo: Path, tmp_path: Path, client
) -> None:
    """The main process reads only the artefact's metadata; the worker that loads the weights
    checks them against the declared architecture, and the run fails with that error (type and
    file named) and leaves no report and no GeoPackage."""
    from safetensors.torch import save_file

    from pipeline.core.errors import ModelError
    from pipeline.model.artefact import FORMAT, FORMAT_VERSION, read_metadata
    from pipeline.model.registry import build_model

    meta = read_metadata(DEFAULT_MODEL).metadata()
    other = build_model("PlainUnet", None, len(meta["channels"]), base_channels=4, depth=2)  # not the declared size
    bad = tmp_path / "mismatched.safetensors"
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "metadata": json.dumps({**meta, "weights_dtype": "float32"})}
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(bad), metadata=header)
    cfg = _config(demo, tmp_path, model={"path": bad})
    with pytest.raises(ModelError, match=r"mismatched\.safetensors: weights do not match the declared architecture"):
        run_scene(cfg, client=client)
    assert not list(cfg.output.dir.rglob(REPORT))
    assert not list(cfg.output.dir.rglob("*.gpkg"))


def test_interrupted_run_leaves_no_partial_geopackage_and_rerun_completes(
    demo: Path, tmp_path: Path, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    import postprocess.gpkg as gpkg

    real = gpkg.write_geopackage

    def crash(gdf, path, **kwargs):
        # write the real file under the temporary name, then die before the rename
        def boom(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(gpkg.os, "replace", boom)
        try:
            return real(gdf, path, **kwargs)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(gpkg, "write_geopackage", crash)
    cfg = _config(demo, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_scene(cfg, client=client)
    run_dirs = list((cfg.output.dir).rglob("run-*"))
    assert run_dirs
    assert not list(cfg.output.dir.rglob("*.gpkg"))
    assert not list(cfg.output.dir.rglob(REPORT))

    monkeypatch.undo()
    res = run_scene(cfg, client=client)
    assert res.status == "completed"
    assert res.geopackage.is_file()


def test_water_and_vegetation_rules_get_their_bands_in_a_run(demo: Path, tmp_path: Path, client, caplog) -> None:
    """The NDWI and NDVI rules read B03/B04/B08 of the scene: limits that every real surface exceeds
    drop every detection, and the run says so; without the rules the same run keeps them."""
    plain = run_scene(_config(demo, tmp_path / "plain"), client=client)
    assert plain.n_polygons > 0
    rules = ({"max_mean_ndwi": -1.0}, {"max_mean_ndvi": -1.0}, {"max_mean_ndwi": -1.0, "max_mean_ndvi": 1.0})
    for n, rule in enumerate(rules):  # the last: both rules, B08 shared, only the water rule bites
        caplog.clear()
        with caplog.at_level("INFO", logger="postprocess"):
            res = run_scene(_config(demo, tmp_path / f"rule{n}", postprocess=rule), client=client)
        assert res.status == "completed" and res.n_polygons == 0, rule
        assert "were not given" not in caplog.text
        assert "terrain rules:" in caplog.text and " objects dropped" in caplog.text
        assert pyogrio.read_info(res.geopackage, layer="landslides")["features"] == 0


def test_failing_mask_raster_fails_the_run_without_a_report(demo: Path, tmp_path: Path, client,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The mask raster is written in a thread beside the GeoPackage: its error is the run's error,
    the run directory stays incomplete (no report) and the next run completes it."""
    import pipeline.io.cog as cog_module
    from pipeline.core.errors import OutputError

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OutputError("mask.tif: disk full (test)")

    cfg = _config(demo, tmp_path)
    monkeypatch.setattr(cog_module, "write_cog", failing)
    with pytest.raises(OutputError, match="disk full"):
        run_scene(cfg, client=client)
    assert not list(cfg.output.dir.rglob(REPORT))
    assert not list(cfg.output.dir.rglob("mask.tif"))
    monkeypatch.undo()
    res = run_scene(cfg, client=client)
    assert res.status == "completed" and (res.run_dir / "mask.tif").is_file()


def test_mask_raster_is_computed_while_the_polygons_are_merged(demo: Path, tmp_path: Path, client,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers would idle while this process builds and merges the polygons: the mask raster
    starts before that, and is the same raster as the polygons' cleaned mask."""
    import threading

    import pipeline.io.cog as cog_module
    import postprocess.polygons as pp

    mask_started = threading.Event()
    seen: list[bool] = []
    real_cog, real_merge = cog_module.write_cog, pp.merge_pieces

    def recording_cog(data, grid, path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if Path(path).name == "mask.tif":
            mask_started.set()
        return real_cog(data, grid, path, **kwargs)

    def merge_after_mask_started(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(mask_started.wait(timeout=60))  # never set when the mask waits for the polygons
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(cog_module, "write_cog", recording_cog)
    monkeypatch.setattr(pp, "merge_pieces", merge_after_mask_started)
    res = run_scene(_config(demo, tmp_path), client=client)
    assert res.status == "completed" and seen == [True]
    with rasterio.open(res.run_dir / "mask.tif") as src:
        mask = src.read(1)
    assert int((mask == 1).sum()) * 100 == round(res.total_area_m2)  # 10 m pixels
    assert res.report["counts"]["valid_pixels"] > 0


def test_run_without_the_probability_raster(demo: Path, tmp_path: Path, client) -> None:
    """output.probability_cog: false keeps no probability raster (the intermediate the later stages
    read is removed), and everything else is written as usual."""
    cfg = _config(demo, tmp_path, output={"probability_cog": False, "quicklook": True})
    res = run_scene(cfg, client=client)
    assert res.status == "completed" and res.n_polygons > 0
    names = sorted(p.name for p in res.run_dir.iterdir())
    assert "probability.tif" not in names and not [n for n in names if n.startswith(".")]
    assert {"mask.tif", "quicklook.png", REPORT, res.geopackage.name} <= set(names)
    assert res.report["outputs"] == names


def test_fully_cloudy_scene_gives_valid_empty_geopackage(demo: Path, tmp_path: Path, client, caplog) -> None:
    import shutil

    cloudy = tmp_path / "cloudy"
    shutil.copytree(demo.parent, cloudy)
    scl = next(cloudy.rglob("*_SCL_20m.jp2"))
    with rasterio.open(scl) as src:
        profile = src.profile
        data = np.full((src.height, src.width), 9, dtype=src.dtypes[0])  # cloud, high probability
    scl.unlink()
    with rasterio.open(scl, "w", **profile) as dst:
        dst.write(data, 1)
    cfg = _config(cloudy / demo.name, tmp_path)
    with caplog.at_level("WARNING"):
        res = run_scene(cfg, client=client)
    assert res.status == "completed"
    assert res.n_polygons == 0
    assert pyogrio.read_info(res.geopackage, layer="landslides")["features"] == 0
    assert "no valid pixels" in caplog.text


def test_inference_reads_each_band_once_per_block(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The valid mask comes from the pixels the block reads, not from a second read of every band."""
    import dask

    from pipeline.inference.options import InferenceOptions
    from pipeline.inference.tiled import predict
    from pipeline.run.plan import model_channels
    from pipeline.run.scene import load_models
    from pipeline.stack import layers as stack_module

    reads = []
    original = stack_module.StackLayer.read

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        reads.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(stack_module.StackLayer, "read", counted)
    cfg = load_scene_config(demo)
    models = load_models(cfg)
    stack = stack_module.stack_scene(cfg, model_channels(models))
    assert stack.mask is not None  # the demo is an L2A product: the SCL masks clouds
    pred = predict(stack.data, stack.mask, stack.grid, models, InferenceOptions(overlap=32))
    assert reads == []  # building the inference reads nothing (no statistics are sampled from the scene)
    # in this process (a distributed client of another test may be the default)
    dask.compute(pred.probability.data, scheduler="sync")
    assert len(reads) == 1  # one 318 px scene, one block


def test_inference_over_many_blocks_reads_each_pixel_about_once(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks read their own chunk and thin strips of their neighbours, never a chunk twice."""
    import dask
    from rasterio.windows import Window

    from pipeline.inference.options import InferenceOptions, inference_block_size
    from pipeline.inference.tiled import predict
    from pipeline.run.plan import model_channels
    from pipeline.run.scene import load_models
    from pipeline.stack import layers as stack_module
    from tiling.windows import WindowGrid, block_spans

    areas: list[int] = []
    original = stack_module.StackLayer.read

    def counted(self, bands, window: Window):  # noqa: ANN001, ANN202
        areas.append(int(window.width) * int(window.height))
        return original(self, bands, window)

    monkeypatch.setattr(stack_module.StackLayer, "read", counted)
    cfg = load_scene_config(demo)
    models = load_models(cfg)
    tile, overlap = models[0].tile_size, 33  # stride 95: windows at 0, 95, 190 cover the 318 px scene
    block = inference_block_size(200, tile, overlap)  # 190 px: two blocks per axis
    cfg = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"block_size": block})})
    stack = stack_module.stack_scene(cfg, model_channels(models))
    opts = InferenceOptions(overlap=overlap, block_size=block)
    pred = predict(stack.data, stack.mask, stack.grid, models, opts)
    assert areas == []  # building the inference reads nothing
    out = dask.compute(pred.probability.data, scheduler="sync")[0]
    assert np.isfinite(out).any()
    wg = WindowGrid(*stack.grid.shape, tile, overlap)
    extents = 0
    for rows in block_spans(wg.height, block):
        for cols in block_spans(wg.width, block):
            (y0, y1), (x0, x1) = wg.block_read_extent(rows, cols)
            extents += (y1 - y0) * (x1 - x0)
    scene = wg.height * wg.width
    assert block == 190 and scene <= sum(areas) <= extents < 1.25 * scene


def test_quicklook_bands_follow_the_block_mean_of_the_stacked_bands(demo: Path) -> None:
    """read_coarse on the demo's JPEG 2000 bands (read from their resolution levels) follows averaging
    the 10 m stack by the factor; GDAL's average warp (grids not on the band's pixels) matches it."""
    import dask
    from scipy import ndimage

    from pipeline.io.raster_source import RasterSource
    from pipeline.stack.coarse import read_coarse
    from pipeline.stack.layers import stack_scene

    cfg = load_scene_config(demo)
    names = ["B04", "B03", "B02"]
    stack = stack_scene(cfg, names)
    with dask.config.set(scheduler="sync"):
        full = np.asarray(stack.data.values)
    factor = 4  # 318 px: 79 coarse pixels, the last two rows and columns dropped
    n = 318 // factor
    blocks = full[:, : n * factor, : n * factor].reshape(3, n, factor, n, factor)
    complete = np.isfinite(blocks).all(axis=(2, 4))
    expected = np.where(complete, blocks.mean(axis=(2, 4)), np.nan)
    inner = np.stack([ndimage.binary_erosion(c, iterations=2) for c in complete])  # away from no-data edges
    assert inner.mean() > 0.5

    small = read_coarse(cfg, names, stack.grid, factor)
    assert small.shape == (3, n, n)
    assert np.isfinite(small[inner]).all()
    spread = np.nanpercentile(expected, 98) - np.nanpercentile(expected, 2)
    # a resolution level is a wavelet low-pass, close to the block mean, not equal to it
    diff = np.abs(small[inner] - expected[inner])
    # edges of scars and the demo's 12-20 m roads differ most (measured: 99th percentile 0.36 of the spread)
    assert np.median(diff) < 0.02 * spread and np.percentile(diff, 99) < 0.45 * spread
    assert np.corrcoef(small[inner], expected[inner])[0, 1] > 0.95

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RasterSource, "_aligned_offsets", lambda self, grid: None)
        warped = read_coarse(cfg, names, stack.grid, factor, strip_rows=10)  # several strips
    np.testing.assert_allclose(warped[inner], expected[inner], rtol=1e-4)


def _forward_labels(dask_scheduler) -> set[str]:  # noqa: ANN001
    return {k[2] for k in dask_scheduler.cumulative_worker_metrics
            if isinstance(k, tuple) and len(k) == 4 and str(k[2]).startswith("model-forward")}


def test_local_cluster_starts_while_the_inference_graphs_are_built(demo: Path, tmp_path: Path, client,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster starts in a background thread, the inference's graphs are built in this process
    meanwhile (the run waits for the cluster only right before it computes), and the cluster is
    closed whether the run succeeds or fails. The run computes on its own cluster although another
    client (the module's, entered with ``with``) is current."""
    import threading
    from contextlib import contextmanager

    import pipeline.inference.tiled as inference_module
    from pipeline.core.errors import InputError
    from pipeline.run import cluster as cluster_module

    events: list[tuple[str, bool]] = []
    real_client = cluster_module.dask_client
    real_predict = inference_module.predict
    real_wait = cluster_module.RunCluster.wait

    @contextmanager
    def recording_client(section, imports=(), gpus=()):  # noqa: ANN001, ANN202
        events.append(("start", threading.current_thread() is threading.main_thread()))
        with real_client(section, imports, gpus) as c:
            yield c
        events.append(("closed", threading.current_thread() is threading.main_thread()))

    order: list[tuple[str, bool]] = []

    def failing_predict(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise InputError("bad band (test)")

    def recording_predict(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        order.append(("predict", threading.current_thread() is threading.main_thread()))
        return real_predict(*args, **kwargs)

    def recording_wait(self, timer):  # noqa: ANN001, ANN202
        order.append(("wait", self.starting))
        return real_wait(self, timer)

    monkeypatch.setattr(cluster_module, "dask_client", recording_client)
    monkeypatch.setattr(cluster_module.RunCluster, "wait", recording_wait)
    cfg = _config(demo, tmp_path, dask={"n_workers": 1, "threads_per_worker": 2})
    monkeypatch.setattr(inference_module, "predict", failing_predict)
    with pytest.raises(InputError, match="bad band"):
        run_scene(cfg)
    assert [e[0] for e in events] == ["start", "closed"]  # waited for and closed despite the error
    assert events[0][1] is False  # started in a thread of its own
    events.clear()
    order.clear()

    monkeypatch.setattr(inference_module, "predict", recording_predict)
    before = client.run_on_scheduler(_forward_labels)
    res = run_scene(cfg)
    assert client.run_on_scheduler(_forward_labels) == before  # nothing ran on the other cluster
    assert res.status == "completed" and res.n_polygons >= 0
    # the graphs were built in this process before the run first waited for the starting cluster
    assert order[:2] == [("predict", True), ("wait", True)]
    assert [e[0] for e in events] == ["start", "closed"]
    assert "start-cluster" in res.report["timings_s"] and "scene-stats" not in res.report["timings_s"]
    # on its own cluster the run reports the forward pass's share of all worker-thread time
    inference = res.report["inference"]
    assert inference["worker_threads"] == 2
    assert inference["model_forward_share"] == pytest.approx(
        inference["model_forward_seconds"] / (2 * res.report["timings_s"]["total"]), abs=1e-3)
    assert 0 < inference["model_forward_share"] < 1


def test_the_processing_level_verdict_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A level a model was not trained for, or an unknown one, is run with a warning naming what to do;
    a SAFE product's own level wins over scene.level."""
    from types import SimpleNamespace

    from pipeline.run.summary import log_processing_level, processing_level

    l1c = SimpleNamespace(name="a", architecture="PlainUnet", levels=["L1C"])
    both = SimpleNamespace(name="", architecture="Unet", levels=["L1C", "L2A"])
    served = processing_level([l1c, both], "S2_L1C", "L2A")
    assert served["scene"] == "L1C" and served["source"] == "product metadata" and served["served"]
    assert served["models"] == {"a": ["L1C"], "Unet": ["L1C", "L2A"]}  # unnamed models by architecture
    l2a = processing_level([l1c, both], "S2_L2A", None)
    unknown = processing_level([l1c, both], "bands", None)
    assert unknown["unserved"] == ["Unet", "a"]
    with caplog.at_level("INFO", logger="pipeline.run"):
        log_processing_level(served)
        assert [r.levelname for r in caplog.records] == ["INFO"]
        caplog.clear()
        log_processing_level(l2a)
        assert caplog.records[0].levelname == "WARNING" and "model(s) a were not trained for it" in caplog.text
        caplog.clear()
        log_processing_level(unknown)
        assert caplog.records[0].levelname == "WARNING" and "set scene.level" in caplog.text


def test_postprocess_mask_in_graphs_raises_no_large_graph_warnings(demo: Path, tmp_path: Path, client,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The bit-packed mask travels in the postprocessing graphs on purpose: distributed's warning about
    large graphs (15 MB for a full tile) is kept out of the run's output, other warnings are not."""
    import contextlib
    import warnings

    import dask

    from pipeline.run import outputs

    cfg = _config(demo, tmp_path)

    def large_graph_warnings() -> int:
        # a threshold this small makes every graph "large", as a full tile's mask graphs are
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1B"}), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_scene(cfg, force=True, client=client)
        return sum("Sending large graph" in str(w.message) for w in caught)

    filtered = large_graph_warnings()
    monkeypatch.setattr(outputs, "mask_in_graphs", lambda grid: contextlib.nullcontext())
    unfiltered = large_graph_warnings()
    assert filtered > 0          # the stacking and model graphs still report
    assert unfiltered > filtered  # postprocessing and the mask raster did, and no longer do


def test_intermediates_are_read_back_exactly_in_whole_tiles(tmp_path: Path) -> None:
    """The later stages read the stored probability codes and float layers as written, chunked on
    whole tiles of the file."""
    import dask
    from affine import Affine
    from rasterio.crs import CRS

    from pipeline.core.grid import Grid
    from pipeline.core.probability import PROB_SCALE
    from pipeline.run.intermediates import open_stored as _open_lazy

    grid = Grid(CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), 300, 200)
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (200, 300), dtype=np.uint8)
    codes[0, :3] = [127, 254, 255]
    layers = rng.normal(100, 10, (2, 200, 300)).astype(np.float32)
    layers[1, 5:9, 7:11] = np.nan
    profile = {"driver": "GTiff", "width": 300, "height": 200, "crs": grid.crs, "transform": grid.transform,
               "tiled": True, "blockxsize": 64, "blockysize": 64}
    with rasterio.open(tmp_path / "p.tif", "w", count=1, dtype="uint8", nodata=255, **profile) as dst:
        dst.write(codes, 1)
    with rasterio.open(tmp_path / "l.tif", "w", count=2, dtype="float32", nodata=float("nan"), **profile) as dst:
        dst.write(layers)
    prob = _open_lazy(tmp_path / "p.tif", grid, 100, probability=True)
    assert prob.chunks == ((128, 72), (128, 128, 44))  # two 64 px tiles, the multiple nearest 100 px
    with dask.config.set(scheduler="threads"):
        p = prob.values
        second = _open_lazy(tmp_path / "l.tif", grid, 100, band=2).values
        window = prob[50:150:3, 10:290].values
    expected = codes.astype(np.float32) / np.float32(PROB_SCALE)
    expected[codes == 255] = np.nan
    np.testing.assert_array_equal(p, expected)
    assert p[0, 0] == 0.5 and p[0, 1] == 1.0 and np.isnan(p[0, 2])  # 127 is exactly 0.5
    np.testing.assert_array_equal(second, layers[1])
    np.testing.assert_array_equal(window, expected[50:150:3, 10:290])
    # another file read in the probability's blocks, whatever its own tiles
    assert _open_lazy(tmp_path / "l.tif", grid, 1000, band=1, like=prob).chunks == prob.chunks
    with pytest.raises(RuntimeError, match="not the run's grid"):
        _open_lazy(tmp_path / "p.tif", Grid(grid.crs, grid.transform, 301, 200), 100)


def test_output_writers_use_one_gdal_thread_and_leave_the_callers_setting_alone() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.io.cog import gdal_threads
    from pipeline.run.outputs import submit as _submit

    with ThreadPoolExecutor(2) as pool:
        threads = _submit(pool, gdal_threads).result()
    assert threads == 1 and gdal_threads() == max(1, min(4, os.cpu_count() or 1))


def test_first_cleaning_step_computed_with_the_inference_equals_the_postprocessing_alone(
        demo: Path, tmp_path: Path, client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run thresholds, opens and closes each block as it is inferred and summarizes it for the
    size and hole steps; the mask, the polygons and the valid count equal what the postprocessing
    gives on the stored probability on its own."""
    import dask
    import xarray as xr

    import postprocess.morphology as morphology
    from pipeline.core.grid import Grid
    from pipeline.core.probability import decode as _decode_probability
    from postprocess.polygons import polygons_from_probability

    built: list[int] = []
    original = morphology.opened_mask

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(morphology, "opened_mask", counting)
    # several blocks: the halos cross them; no terrain rule (the postprocessing alone gets no slope)
    cfg = _config(demo, tmp_path, grid={"block_size": 96}, postprocess={"min_mean_slope_deg": None})
    res = run_scene(cfg, client=client)
    assert len(built) == 1  # built once, with the inference; the postprocessing started from it
    report = json.loads((res.run_dir / REPORT).read_text())
    with rasterio.open(res.run_dir / "probability.tif") as src:
        codes = src.read(1)
        grid = Grid(src.crs, src.transform, src.width, src.height)
    with rasterio.open(res.run_dir / "mask.tif") as src:
        run_mask = src.read(1)
    assert report["counts"]["valid_pixels"] == int((codes != 255).sum())
    prob = xr.DataArray(_decode_probability(codes), dims=("y", "x"))
    with dask.config.set(scheduler="threads"):
        gdf, mask = polygons_from_probability(prob.chunk(128), ~prob.isnull(), grid, cfg.postprocess,
                                              threshold=report["models"][0]["threshold"])
        alone = np.asarray(mask.compute())
    assert alone.any() and 0 < len(gdf) == res.n_polygons
    np.testing.assert_array_equal(run_mask == 1, alone)
    run_gdf = pyogrio.read_dataframe(res.geopackage, layer="landslides")
    assert sorted(run_gdf["area_m2"].round(3)) == sorted(gdf["area_m2"].round(3))
    assert run_gdf.geometry.union_all().symmetric_difference(gdf.geometry.union_all()).area == 0
