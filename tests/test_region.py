"""The nightly regional job on a real local Dask cluster (worker processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyogrio
import pytest
import torch
from conftest import ROOT

from pipeline.core.channels import L4S_CHANNELS
from pipeline.core.region_config import load_region_config
from pipeline.model.artefact import save_artefact
from pipeline.model.registry import build_model
from pipeline.run.region import run_region, state_path

pytestmark = pytest.mark.slow


def _bias_model(path: Path, bias: float) -> Path:
    """A small real artefact whose output is dominated by a bias (predictable detections)."""
    torch.manual_seed(0)
    module = build_model("PlainUnet", None, len(L4S_CHANNELS), base_channels=4, depth=2)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.01)
        last = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias.fill_(bias)
    save_artefact(path, module, {
        "architecture": "PlainUnet", "encoder": None, "channels": list(L4S_CHANNELS),
        "arch_kwargs": {"base_channels": 4, "depth": 2},
        # fixed statistics in physical units: reflectance, slope (degrees), elevation (metres)
        "normalization": {"method": "fixed", "mean": [0.1] * 12 + [20.0, 1000.0], "std": [0.1] * 12 + [10.0, 500.0],
                          "clip": 10.0}, "tile_size": 128,
        "threshold": 0.5, "version": "test",
    })
    return path


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.demo.write import write_demo_data

    root = tmp_path_factory.mktemp("region")
    model = _bias_model(root / "always.safetensors", bias=5.0)  # every valid pixel is "landslide"
    scenes = []
    for seed in (1, 2):
        paths = write_demo_data(root / f"scene{seed}", size=186, seed=seed, product="L1C")
        text = Path(paths.scene_yaml).read_text()
        cfg = paths.scene_yaml.parent / "scene.yaml"
        cfg.write_text(text.replace("scene:\n", f"scene:\n  id: demo{seed}\n", 1)
                       + f"\nmodel:\n  path: {model}\npostprocess:\n  min_area_m2: 0\n  max_hole_m2: 0\n")
        scenes.append(cfg)
    bad = root / "bad.yaml"
    bad.write_text(f"scene:\n  bands_dir: does_not_exist\ndem:\n  path: nope.tif\nmodel:\n  path: {model}\n")
    (root / "region.yaml").write_text(
        "name: test_region\nscenes:\n"
        + "".join(f"  - {p}\n" for p in [*scenes, bad])
        + f"output:\n  dir: {root / 'out'}\n  quicklook: false\ndask:\n  n_workers: 2\n  threads_per_worker: 1\n"
    )
    return root / "region.yaml"


def test_region_runs_scenes_records_failures_and_merges_without_duplicates(region: Path) -> None:
    cfg = load_region_config(region)
    result = run_region(cfg)
    statuses = [o.status for o in result.outcomes]
    assert statuses == ["completed", "completed", "failed"]
    assert "does_not_exist" in result.outcomes[2].error
    state = json.loads(state_path(cfg).read_text())
    assert set(state["scenes"]) == {str(p) for p in cfg.scenes}
    assert result.page is not None and result.page.is_file()  # the region's HTML map report
    assert "bad.yaml" in result.page.read_text()  # the failed scene is listed with its reason

    # Both demo scenes cover the same tile area: their polygons overlap and merge.
    per_scene = [pyogrio.read_info(o.geopackage, layer="landslides")["features"] for o in result.outcomes[:2]]
    assert all(n >= 1 for n in per_scene)
    merged = pyogrio.read_dataframe(result.merged, layer="landslides")
    assert len(merged) == result.n_merged
    assert len(merged) < sum(per_scene)
    assert (merged["scene_ids"] == "demo1,demo2").any()
    assert {"landslides", "new_landslides", "not_observed"} <= {str(n) for n, _ in pyogrio.list_layers(result.merged)}

    # Rerun: nothing recomputed, the merged layer rebuilt to the same content (no appended duplicates).
    again = run_region(cfg)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped", "failed"]
    assert len(pyogrio.read_dataframe(again.merged, layer="landslides")) == len(merged)


def test_cli_region_exit_code_reflects_failures(region: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "region", str(region)], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 1
    assert "1 failed" in proc.stdout
    assert "failed: " in proc.stdout and "bad.yaml" in proc.stdout


def test_region_uses_an_existing_scheduler_when_configured(region: Path, tmp_path: Path) -> None:
    from distributed import LocalCluster

    cfg = load_region_config(region)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0") as cluster:
        cfg = cfg.model_copy(update={
            "scenes": cfg.scenes[:1],
            "output": cfg.output.model_copy(update={"dir": tmp_path / "out"}),
            "dask": cfg.dask.model_copy(update={"scheduler": cluster.scheduler_address}),
        })
        result = run_region(cfg)
        assert [o.status for o in result.outcomes] == ["completed"]
        # the work ran on the external cluster's worker
        assert cluster.scheduler.transition_counter > 0, "no task reached the configured scheduler"


def test_unreachable_scheduler_is_a_clear_error(region: Path, tmp_path: Path) -> None:
    from pipeline.run.cluster import ClusterError

    cfg = load_region_config(region)
    cfg = cfg.model_copy(update={
        "output": cfg.output.model_copy(update={"dir": tmp_path / "out"}),
        "dask": cfg.dask.model_copy(update={"scheduler": "tcp://127.0.0.1:9"}),
    })
    with pytest.raises(ClusterError, match=r"cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        run_region(cfg)


def _worker_settings() -> tuple[str | None, str | None, int]:
    import os

    import torch

    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


def _profiling(dask_worker) -> tuple[bool, bool]:  # noqa: ANN001 - runs on a worker
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled")), "profile" in dask_worker.periodic_callbacks


def _imported(names: tuple[str, ...]) -> list[bool]:
    import sys

    return [name in sys.modules for name in names]


def test_local_workers_import_the_task_modules_as_they_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first inference task must not pay for importing PyTorch: a new local cluster imports the
    task modules on every worker in a task of its own, and is handed out once they are imported
    (no task arrives during those imports)."""
    from distributed import wait

    from pipeline.core.config import DaskSection
    from pipeline.run import cluster as cluster_module

    started: list[object] = []
    real = cluster_module._warm_workers

    def spy(client, names):  # noqa: ANN001, ANN202
        futures = real(client, names)
        started.extend(futures)
        return futures

    monkeypatch.setattr(cluster_module, "_warm_workers", spy)
    with cluster_module.dask_client(DaskSection(n_workers=2, threads_per_worker=1)) as client:
        assert len(started) == 2  # one per worker
        assert all(f.done() for f in started)  # finished before the client was handed out
        wait(started, timeout=120)
        assert [f.result() for f in started] == [list(cluster_module.WORKER_IMPORTS)] * 2
        # PyTorch included (the main process leaves it to the workers); the model library only when
        # asked for (`imports`: a run whose models need it)
        wanted = (*cluster_module.WORKER_IMPORTS, "torch", "segmentation_models_pytorch")
        flags = client.run(_imported, wanted)
        assert sorted(flags.values()) == [[True] * (len(wanted) - 1) + [False]] * 2
        assert {f.key for f in started} == {"warm-imports-0", "warm-imports-1"}
        # the scheduler's HTTP endpoint (health, metrics) listens on this machine only
        http = client.cluster.scheduler.http_server
        assert {sock.getsockname()[0] for sock in http._sockets.values()} == {"127.0.0.1"}


def _exit_marker(path: str) -> None:
    import atexit
    from pathlib import Path

    atexit.register(Path(path).write_text, "the interpreter was torn down")


def test_local_cluster_workers_skip_the_slow_interpreter_teardown(tmp_path: Path) -> None:
    """With PyTorch loaded a worker process took seconds to exit after closing (the nanny killed it
    after a full tile, with a warning in every run's log): a closed local worker ends at once, before
    the exit handlers registered earlier than its fast exit."""
    from distributed import wait

    from pipeline.core.config import DaskSection
    from pipeline.run import cluster as cluster_module

    marker = tmp_path / "torn-down"
    with cluster_module.dask_client(DaskSection(n_workers=1, threads_per_worker=1)) as client:
        wait(client.submit(_exit_marker, str(marker), pure=False), timeout=60)
        # registered after the marker: at exit it runs first and ends the process
        wait(client.submit(cluster_module._exit_fast_after_close, pure=False), timeout=60)
        (nanny,) = client.cluster.workers.values()
        process = nanny.process.process
    assert process.exitcode == 0  # ended by itself, with success (the nanny kills with a signal)
    assert not marker.exists()


_FAST_EXIT = """
import atexit, sys
import distributed
from distributed.core import Status
import pipeline.run.cluster as cluster
marker, status, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
worker = type("FakeWorker", (), {"status": Status[status]})()
distributed.get_worker = lambda: worker
atexit.register(lambda: open(marker, "w").write("torn down"))
cluster._exit_fast_after_close()
sys.exit(code)
"""


@pytest.mark.parametrize(("status", "code", "fast"), [("closed", 0, True), ("closed", 3, False), ("running", 0, False)])
def test_fast_exit_only_after_a_clean_close(tmp_path: Path, status: str, code: int, fast: bool) -> None:
    """The fast exit is taken only when the worker has closed and the process ends with status 0;
    an error's status, or a worker that did not close, takes the normal exit with its own status."""
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", _FAST_EXIT, str(marker), status, str(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert marker.exists() is not fast


def test_local_cluster_workers_keep_adaptive_malloc_and_one_thread_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dask's default MALLOC_TRIM_THRESHOLD_ slows the model 1.6x: local workers start without it."""
    from pipeline.core.config import DaskSection
    from pipeline.run.cluster import dask_client

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as an earlier nanny in this process leaves it
    with dask_client(DaskSection(n_workers=1, threads_per_worker=2)) as client:
        settings = list(client.run(_worker_settings).values())
        import os

        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is left as it was
        # and without Dask's statistical profiler (a stack sample of every thread every 10 ms)
        profiling = list(client.run(_profiling).values())
    assert settings == [(None, "1", 1)]
    assert profiling == [(False, False)]
    import dask

    assert dask.config.get("distributed.worker.profile.enabled") is True  # this process's settings untouched


def test_a_scene_whose_workers_died_is_retried_and_bad_input_is_not(region: Path, monkeypatch) -> None:
    """Worker deaths (out of memory, say) are transient: the scene is retried (region.retries) and
    completes; a bad input fails at once."""
    import pipeline.run.scene as run_mod
    from pipeline.core.progress import WorkerDeathError

    real = run_mod.run_scene
    calls: list[str] = []

    def flaky(cfg, **kwargs):  # noqa: ANN001, ANN003
        calls.append(cfg.scene.id)
        if cfg.scene.id == "demo1" and calls.count("demo1") == 1:
            raise WorkerDeathError("stage infer: task block-0-0 killed 3 workers")
        return real(cfg, **kwargs)

    monkeypatch.setattr(run_mod, "run_scene", flaky)  # the region job imports it when it starts
    cfg = load_region_config(region)
    result = run_region(cfg.model_copy(update={"retries": 1}))
    assert [o.status for o in result.outcomes][:2] in (["completed", "completed"], ["skipped", "skipped"])
    assert calls.count("demo1") == 2 and result.outcomes[0].attempts == 2
    assert result.outcomes[2].status == "failed" and result.outcomes[2].attempts == 1


def test_two_regions_in_one_folder_keep_their_own_state(tmp_path: Path) -> None:
    """Each region's state file is its own: two regions writing to one folder do not overwrite each other."""
    out = tmp_path / "out"
    configs = []
    for name in ("north", "south"):
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\nscenes: [scene.yaml]\noutput:\n  dir: {out}\n")
        configs.append(load_region_config(tmp_path / f"{name}.yaml"))
    paths = [state_path(c) for c in configs]
    assert paths[0] != paths[1] and paths[0].parent == paths[1].parent == out
    assert all(p.name.endswith(".region_state.json") for p in paths)


def test_a_second_job_of_the_same_region_refuses_while_the_first_runs(tmp_path: Path) -> None:
    from pipeline.core.errors import OutputError
    from pipeline.run.region import RegionBusy, region_lock

    (tmp_path / "r.yaml").write_text(f"name: r\nscenes: [scene.yaml]\noutput:\n  dir: {tmp_path / 'out'}\n")
    cfg = load_region_config(tmp_path / "r.yaml")
    (tmp_path / "out").mkdir()
    with region_lock(cfg), pytest.raises(RegionBusy, match="another job of region 'r' is running") as err:
        run_region(cfg, client=object())
    assert isinstance(err.value, OutputError)
    with region_lock(cfg):  # released by the first holder: the next job may run
        pass
    assert not list((tmp_path / "out").glob("*.region_state.json"))


def test_two_scenes_in_flight_give_the_layers_of_one_at_a_time(region: Path, tmp_path: Path) -> None:
    """With scenes_in_flight: 2 the two demo scenes run at the same time on the 2 workers, and the
    regional layers are those of the same night run one scene at a time."""
    import datetime as dt

    import geopandas as gpd

    layers = {}
    outcomes = {}
    for width in (1, 2):
        out = tmp_path / f"out{width}"
        text = region.read_text().replace(f"  dir: {region.parent / 'out'}\n", f"  dir: {out}\n")
        config = tmp_path / f"region{width}.yaml"
        config.write_text(text + f"scenes_in_flight: {width}\n")
        result = run_region(load_region_config(config))
        outcomes[width] = [o for o in result.outcomes if o.status == "completed"]
        assert len(outcomes[width]) == 2 and len(result.failed) == 1
        frame = gpd.read_file(result.merged, layer="landslides").drop(columns=["run_id"])
        layers[width] = frame.sort_values("landslide_id").reset_index(drop=True)
    spans = [(dt.datetime.fromisoformat(o.started), o.seconds) for o in outcomes[2]]
    (a, sa), (b, sb) = spans
    assert a < b + dt.timedelta(seconds=sb) and b < a + dt.timedelta(seconds=sa), spans  # they overlapped
    (c, sc), (d, _) = [(dt.datetime.fromisoformat(o.started), o.seconds) for o in outcomes[1]]
    assert d >= c + dt.timedelta(seconds=sc)  # one after the other
    assert layers[1].drop(columns="geometry").equals(layers[2].drop(columns="geometry"))
    assert layers[1].geometry.to_wkb().tolist() == layers[2].geometry.to_wkb().tolist()
