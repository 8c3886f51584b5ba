"""The shipped example configs parse, validate and run as they are on the real scenes."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pyogrio
import pytest
from conftest import ROOT

from pipeline.core.config import load_scene_config
from pipeline.core.region_config import load_region_config
from pipeline.run.scene import run_scene

SCENE_CONFIGS = ["slovenia.yaml", "iburi_2018.yaml"]


@pytest.mark.parametrize("name", SCENE_CONFIGS)
def test_scene_config_validates(name: str, shared_data: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(ROOT / "configs" / name)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_region_config_lists_the_scene_configs() -> None:
    cfg = load_region_config(ROOT / "configs" / "region.yaml")
    assert [p.name for p in cfg.scenes] == SCENE_CONFIGS


def test_region_products_config_finds_the_demo_product(tmp_path: Path) -> None:
    """The shipped region that finds its products, with the demo written where it looks (../demo)."""
    import shutil

    from pipeline.demo.write import write_demo_data
    from pipeline.run.region_products import night_work

    root = tmp_path / "project"
    shutil.copytree(ROOT / "configs", root / "configs")
    write_demo_data(root / "demo", size=186, seed=1)
    cfg = load_region_config(root / "configs" / "region_products.yaml")
    work, excluded = night_work(cfg, dt.date(2026, 12, 8))
    assert excluded == [] and len(work) == 1 and work[0].product is not None
    assert work[0].product.kind == "safe" and work[0].product.sensing.date() == dt.date(2023, 6, 15)
    assert cfg.output.dir.resolve() == root / "output" / "region_products"


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENE_CONFIGS)
def test_scene_config_runs_end_to_end(name: str, shared_data: Path, tmp_path: Path) -> None:
    cfg = load_scene_config(ROOT / "configs" / name)
    # as shipped, except that outputs go to a temporary folder
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": tmp_path})})
    res = run_scene(cfg)
    assert res.status == "completed"
    info = pyogrio.read_info(res.geopackage, layer="landslides")
    assert info["features"] == res.n_polygons
    assert info["crs"].startswith("EPSG:326")  # the scene's UTM zone
    assert (res.run_dir / "probability.tif").is_file()
    assert (res.run_dir / "quicklook.png").is_file()


def test_fourteen_channel_model_is_refused_on_iburi_naming_the_missing_bands(shared_data: Path) -> None:
    cfg = load_scene_config(ROOT / "configs" / "iburi_2018.yaml")
    from pipeline.core.config import DEFAULT_MODEL
    from pipeline.run.validate import validate_scene

    assert DEFAULT_MODEL.is_file()
    problems = validate_scene(cfg, ["B01", "B02", "B03", "B04", "B05", "B08", "SLOPE", "DEM"])
    assert any("B01" in p and "B05" in p and "B08" in p for p in problems), problems


def test_the_readmes_region_is_a_valid_region_config(tmp_path: Path) -> None:
    """The region YAML the README shows (products found by the job) is one the job accepts."""
    import re

    from pipeline.core.configbase import validate_data
    from pipeline.core.region_config import RegionConfig
    from pipeline.core.yamlio import load_yaml

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The nightly regional job"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block is not None
    (tmp_path / "region.yaml").write_text(block.group(1))
    cfg = validate_data(RegionConfig, load_yaml(tmp_path / "region.yaml"), tmp_path / "region.yaml")
    assert cfg.products is not None and cfg.products.last_days == 10 and cfg.template is not None
    assert cfg.dask.scheduler == "tcp://scheduler:8786"
