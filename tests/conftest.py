"""Shared fixtures: the real data beside the repository, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LANDSLIDE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test with a clear reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set LANDSLIDE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    """Keep tests polite on small machines."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="module")
def client():
    """A local Dask cluster with one worker process of 2 threads, shared by a module's runs."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scene.yaml of a small demo scene (318 px, seed 3), written once per module."""
    from pipeline.demo.write import write_demo_data

    out = tmp_path_factory.mktemp("demo") / "demo"
    paths = write_demo_data(out, size=318, seed=3)
    return Path(paths.scene_yaml)


def demo_config(scene_yaml: Path, tmp_path: Path, **updates):  # noqa: ANN201
    """The scene config of ``scene_yaml`` writing under ``tmp_path/out`` (with the mask COG), with
    ``updates`` per section (``postprocess={"min_area_m2": 0}``)."""
    from pipeline.core.config import load_scene_config

    cfg = load_scene_config(scene_yaml)
    out = cfg.output.model_copy(update={"dir": tmp_path / "out", "mask_cog": True})
    cfg = cfg.model_copy(update={"output": out})
    for section, values in updates.items():
        cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})
    return cfg
