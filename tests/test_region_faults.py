"""Faults a nightly region survives, each on a local cluster of 2 worker processes: a worker killed
in the middle of a scene, the whole job killed at a random moment and run again, a corrupt product
among good ones; the regional layers then equal an undisturbed night's, feature by feature."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyogrio
import pytest
from conftest import ROOT

from pipeline.core.region_config import load_region_config
from pipeline.demo.product_layers import scene_layers, scene_summary
from pipeline.demo.safe_writer import write_safe
from pipeline.demo.scene import make_scene

pytestmark = pytest.mark.slow

SIZE = 318
DAYS = (10, 12, 14)


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three L2A demo products of different nights and a corrupt one (a band file cut short), the
    DEM and a template with the shipped model."""
    import numpy as np

    from pipeline.demo.dem import write_dem

    root = tmp_path_factory.mktemp("faults")
    inc = root / "incoming"
    inc.mkdir()
    for seed, day in enumerate(DAYS, 1):
        scene = make_scene(SIZE, seed)
        write_safe(inc, scene_layers(scene, "L2A", "05.10"), product="L2A", baseline="05.10",
                   sensing_time=dt.datetime(2018, 9, day, 1, 56, 19, tzinfo=dt.UTC), summary=scene_summary(scene))
    scene = make_scene(SIZE, 9)
    bad = write_safe(inc, scene_layers(scene, "L2A", "05.10"), product="L2A", baseline="05.10",
                     sensing_time=dt.datetime(2018, 9, 16, 1, 56, 19, tzinfo=dt.UTC), summary=scene_summary(scene))
    band = next(bad.rglob("*_B04_10m.jp2"))
    band.write_bytes(band.read_bytes()[: band.stat().st_size // 3])
    write_dem(make_scene(SIZE, 1), root / "dem.tif", np.random.default_rng([1, 2]))
    (root / "template.yaml").write_text("dem:\n  path: dem.tif\n")
    return root


def _region(root: Path, out: Path, name: str = "faults") -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(f"name: {name}\ntemplate: {root / 'template.yaml'}\n"
                    f"products:\n  paths: ['{root / 'incoming'}/S2*.SAFE']\n"
                    f"output:\n  dir: {out}\n  quicklook: false\n"
                    "dask:\n  n_workers: 2\n  threads_per_worker: 1\nretries: 1\n")
    return path


def _features(gpkg: Path, out: Path) -> dict[str, list]:
    """Every layer's features, rows in id order, the output folder's path replaced, without the run ids."""
    import geopandas as gpd

    layers = {}
    for name, kind in pyogrio.list_layers(gpkg):
        if kind is None:  # layer_styles: the QGIS styles, with the time they were written
            continue
        frame = gpd.read_file(gpkg, layer=name)
        key = "landslide_id" if "landslide_id" in frame else frame.columns[0]
        frame = frame.sort_values(key)
        geoms = list(frame.geometry) if isinstance(frame, gpd.GeoDataFrame) and frame._geometry_column_name in frame \
            else [None] * len(frame)
        # run_id names the run that wrote a detection (its start time): the one column that differs
        values = frame.drop(columns=[c for c in frame.columns
                                     if c in ("run_id", getattr(frame, "_geometry_column_name", None))])
        rows = []
        for g, (_, row) in zip(geoms, values.iterrows(), strict=True):
            rows.append([g.wkb_hex if g is not None else None, *(str(v).replace(str(out), "<out>") for v in row)])
        layers[name] = rows
    return layers


def _diff(got: dict[str, list], expected: dict[str, list]) -> str:
    """Where two layer dumps differ first: layer, row, column and both values."""
    for layer in sorted(set(got) | set(expected)):
        a, b = got.get(layer, []), expected.get(layer, [])
        if len(a) != len(b):
            return f"{layer}: {len(a)} features, expected {len(b)}"
        for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
            for j, (va, vb) in enumerate(zip(ra, rb, strict=True)):
                if va != vb:
                    return f"{layer} row {i} column {j}: {va[:200]!r} != {vb[:200]!r}"
    return "equal"


def _cli(config: Path, **kwargs) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "region", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def undisturbed(products: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, float, Path]:
    """The regional layers of a night nothing disturbed, the night's wall time and its config."""
    out = tmp_path_factory.mktemp("undisturbed") / "out"
    config = _region(products, out)
    t0 = time.perf_counter()
    proc = _cli(config)
    stdout, stderr = proc.communicate(timeout=600)
    seconds = time.perf_counter() - t0
    # the corrupt product fails, named with its file; the others complete; the exit code says partial
    assert proc.returncode == 1, stderr[-3000:]
    assert "3 scene(s) processed" in stdout and "1 failed" in stdout, stdout
    failed = [line for line in stdout.splitlines() if line.strip().startswith("failed:")]
    assert len(failed) == 1 and "20180916" in failed[0] and "B04" in failed[0], stdout
    layers = _features(out / "faults.gpkg", out)
    assert len(layers["landslides"]) > 3
    return layers, seconds, config


def test_a_worker_killed_in_the_middle_of_a_scene(products: Path, undisturbed, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from pipeline.run.region import run_region

    expected, _, _ = undisturbed
    out = tmp_path / "out"
    cfg = load_region_config(_region(products, out))
    killed: list[str] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        stop = threading.Event()

        def killer() -> None:  # the worker running the second scene's block, once it has run a while
            seen = 0
            while not stop.is_set() and not killed:
                for key, ts in list(cluster.scheduler.tasks.items()):
                    if str(key).startswith("predict-windows") and ts.state == "processing" and ts.processing_on:
                        seen += 1
                        if seen > 20 and ts.processing_on.address in pids:  # ~1 s into the block
                            os.kill(pids[ts.processing_on.address], signal.SIGKILL)
                            killed.append(str(key))
                            return
                time.sleep(0.05)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            result = run_region(cfg, client=client)
        finally:
            stop.set()
            thread.join()
    assert killed, "no block task ran long enough to kill its worker"
    assert sorted(o.status for o in result.outcomes) == ["completed"] * 3 + ["failed"]
    got = _features(out / "faults.gpkg", out)
    assert got == expected, _diff(got, expected)


def test_the_whole_job_killed_at_a_random_moment_then_run_again(products: Path, undisturbed, tmp_path: Path) -> None:
    expected, seconds, _ = undisturbed
    out = tmp_path / "out"
    config = _region(products, out)
    moment = random.Random(int(time.time())).uniform(0.15, 0.85) * seconds
    proc = _cli(config, start_new_session=True)
    time.sleep(moment)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its cluster's processes
    proc.communicate(timeout=60)
    rerun = _cli(config)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 1, f"killed after {moment:.1f} s: {stderr[-3000:]}"
    assert "1 failed" in stdout, stdout
    got = _features(out / "faults.gpkg", out)
    assert got == expected, f"killed after {moment:.1f} s of {seconds:.1f}: {_diff(got, expected)}"
    ids = [row for row in got["landslides"]]
    assert len(ids) == len({tuple(r) for r in ids})  # no duplicates
    assert not list(out.glob(".*.tmp*")) and not list(out.rglob("*.tiles.tif"))
