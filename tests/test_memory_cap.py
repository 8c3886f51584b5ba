"""A worker memory limit that cannot hold the run's blocks stops the run before it starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, demo_config

from pipeline.core.config import DaskSection
from pipeline.core.errors import ConfigError
from pipeline.run.memory import check_worker_memory, lower_bound_bytes, worker_limit_bytes


def test_the_limit_is_read_as_dask_reads_it() -> None:
    assert worker_limit_bytes(DaskSection()) is None  # auto: Dask's share of the machine
    assert worker_limit_bytes(DaskSection(memory_limit="2GiB")) == 2 * 1024**3
    assert worker_limit_bytes(DaskSection(memory_limit="600MB")) == 600_000_000
    assert worker_limit_bytes(DaskSection(memory_limit="0")) is None  # no limit


def test_a_limit_below_the_blocks_is_refused_naming_the_settings() -> None:
    need = lower_bound_bytes((2016, 2016), 13, 2)
    assert need > 2 * 2016 * 2016 * 13 * 4  # the base comes on top of the blocks
    with pytest.raises(ConfigError, match="dask.memory_limit: 600MB.*2016 x 2016 px x 13 channels") as err:
        check_worker_memory(DaskSection(memory_limit="600MB"), (2016, 2016), 13, 2)
    assert "grid.block_size" in str(err.value) and "dask.threads_per_worker" in str(err.value)
    # the same limit holds smaller blocks, or one thread's
    check_worker_memory(DaskSection(memory_limit="600MB"), (1008, 1008), 13, 1)
    check_worker_memory(DaskSection(memory_limit=str(need)), (2016, 2016), 13, 2)


def test_a_run_under_a_too_small_cap_stops_before_anything_is_started_or_written(
        demo: Path, tmp_path: Path) -> None:
    """The command exits 2 with one line naming the settings; no run folder, no partial output."""
    cfg = demo_config(demo, tmp_path, dask={"memory_limit": "420MB", "threads_per_worker": 2})
    config = tmp_path / "capped.yaml"
    data = yaml.safe_load(Path(demo).read_text())
    data["output"] = {**data.get("output", {}), "dir": str(cfg.output.dir)}
    data["dask"] = {"memory_limit": "420MB", "threads_per_worker": 2}
    data = _absolute_paths(data, Path(demo).parent)
    config.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "dask.memory_limit: 420MB" in proc.stderr and "Traceback" not in proc.stderr
    out = Path(cfg.output.dir)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def _absolute_paths(data: dict, base: Path) -> dict:
    """The demo config's relative paths made absolute (the copy lives elsewhere)."""
    scene = dict(data["scene"])
    for key in ("safe", "bands_dir", "scl"):
        if key in scene:
            scene[key] = str(base / scene[key])
    data = {**data, "scene": scene, "dem": {**data["dem"], "path": str(base / data["dem"]["path"])}}
    if "reference" in data:
        data["reference"] = {**data["reference"], "path": str(base / data["reference"]["path"])}
    return data
