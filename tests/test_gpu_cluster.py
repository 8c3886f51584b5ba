"""One worker per GPU, and inference tasks only on GPU workers: tested with fake GPUs on the CPU."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import demo_config

from pipeline.core.config import DaskSection
from pipeline.run.cluster import ClusterError, dask_client
from pipeline.run.gpus import GPU_RESOURCE, gpu_workers, gpus_for, visible_gpus


def _fake_smi(tmp_path: Path, n: int) -> str:
    """An ``nvidia-smi`` that lists ``n`` GPUs as the real one does with ``-L``."""
    exe = tmp_path / "nvidia-smi"
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})"\n' for i in range(n))
    exe.write_text("#!/bin/sh\n" + lines)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_visible_gpus_follow_cuda_visible_devices_then_nvidia_smi(tmp_path: Path) -> None:
    smi = _fake_smi(tmp_path, 4)
    assert visible_gpus({}, smi) == ["0", "1", "2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, smi) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b, GPU-3c4d"}, smi) == ["GPU-1a2b", "GPU-3c4d"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, smi) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, smi) == []
    assert visible_gpus({}, str(tmp_path / "missing")) == []  # no driver


def test_the_device_setting_decides_which_gpus_a_local_cluster_uses(tmp_path: Path) -> None:
    smi = _fake_smi(tmp_path, 2)
    assert gpus_for("cuda", {}, smi) == ["0", "1"]
    assert gpus_for("auto", {}, smi) == ["0", "1"]
    assert gpus_for("cpu", {}, smi) == [] and gpus_for("mps", {}, smi) == []
    assert gpus_for("auto", {}, str(tmp_path / "missing")) == []
    with pytest.raises(ClusterError, match="model.device is cuda but no GPU is visible"):
        gpus_for("cuda", {"CUDA_VISIBLE_DEVICES": ""}, smi)


@pytest.mark.slow
def test_a_local_cluster_has_one_worker_per_gpu_each_seeing_only_its_own() -> None:
    with dask_client(DaskSection(), gpus=["0", "1"]) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        assert sorted(gpu_workers(client)) == sorted(info)
        assert all(w["resources"] == {GPU_RESOURCE: 1} for w in info.values())
        # the CPU cores are shared among the GPUs' workers
        assert {w["nthreads"] for w in info.values()} == {max(1, (os.cpu_count() or 1) // 2)}


@pytest.fixture(scope="module")
def mixed_client():
    """One worker that offers a GPU and one that does not (both run on the CPU here)."""
    import logging

    from distributed import Client, Nanny, Scheduler, SpecCluster

    workers = {name: {"cls": Nanny, "options": {"nthreads": 1, "silence_logs": logging.WARNING,
                                                 "resources": res}}
               for name, res in (("gpu-worker", {GPU_RESOURCE: 1}), ("cpu-worker", {}))}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    with SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        yield client


@pytest.mark.slow
def test_a_gpu_runs_inference_only_on_the_gpu_workers(demo: Path, tmp_path: Path, mixed_client) -> None:
    from distributed import get_task_stream

    from pipeline.run.scene import run_scene

    gpu_addr = gpu_workers(mixed_client)
    assert len(gpu_addr) == 1
    cfg = demo_config(demo, tmp_path, model={"device": "auto"})
    with get_task_stream(client=mixed_client) as stream:
        result = run_scene(cfg, client=mixed_client)
    assert result.status == "completed"
    by_worker: dict[str, set[str]] = {}
    for task in stream.data:
        by_worker.setdefault(task["worker"], set()).add(task["key"][0] if isinstance(task["key"], tuple)
                                                           else task["key"])
    inference = [w for w, keys in by_worker.items() if any("predict" in k or "infer" in k for k in keys)]
    assert inference == gpu_addr, by_worker


def test_cuda_on_a_cluster_without_gpu_workers_is_refused_before_anything_is_written(
        demo: Path, tmp_path: Path, client) -> None:
    from pipeline.run.scene import run_scene

    cfg = demo_config(demo, tmp_path, model={"device": "cuda"})
    with pytest.raises(ClusterError, match="no worker of the Dask cluster offers a GPU"):
        run_scene(cfg, client=client)
    assert not list((tmp_path / "out").rglob("*.gpkg")) and not list((tmp_path / "out").rglob("report.json"))
