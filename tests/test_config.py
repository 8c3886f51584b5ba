"""Scene/region config parsing: strict, typed, with errors that point at the YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.core.config import load_scene_config
from pipeline.core.errors import ConfigError
from pipeline.core.region_config import load_region_config

MINIMAL = """\
scene:
  bands_dir: bands
dem:
  path: dem/dem.tif
"""


def _write(tmp_path: Path, text: str, name: str = "scene.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_has_sensible_defaults(tmp_path: Path) -> None:
    cfg = load_scene_config(_write(tmp_path, MINIMAL))
    assert cfg.grid.resolution == 10
    assert cfg.grid.crs == "auto"
    assert cfg.model.overlap == 32
    assert cfg.model.device == "auto"
    assert cfg.postprocess.threshold is None  # taken from the model artefact
    assert cfg.mask.excluded_scl_classes() == [0, 1, 3, 8, 9, 10, 11]


def test_paths_are_relative_to_the_yaml_file(tmp_path: Path) -> None:
    sub = tmp_path / "cfgs"
    sub.mkdir()
    cfg = load_scene_config(_write(sub, MINIMAL))
    assert cfg.scene.bands_dir == sub / "bands"
    assert cfg.dem.path == sub / "dem" / "dem.tif"
    assert cfg.output.dir == sub / "output"
    assert cfg.source == (sub / "scene.yaml").resolve()


def test_unknown_key_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "postprocess:\n  min_area: 100\n")
    with pytest.raises(ConfigError) as err:
        load_scene_config(path)
    msg = str(err.value)
    assert f"{path}:6" in msg
    assert "postprocess.min_area" in msg
    assert "unknown key" in msg


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "dem:\n  path: other.tif\n")
    with pytest.raises(ConfigError, match=r"scene.yaml:5: duplicate key 'dem' \(first given on line 3\)"):
        load_scene_config(path)


def test_python_object_tag_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "grid: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=r"scene.yaml:5: unsupported YAML tag"):
        load_scene_config(path)


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "scene:\n  bands_dir: [a, b\ndem:\n  path: x\n")
    with pytest.raises(ConfigError, match=r"scene.yaml:\d+: malformed YAML"):
        load_scene_config(path)


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "grid:\n  resolution: ten\n")
    with pytest.raises(ConfigError, match=r"scene.yaml:6: grid.resolution: "):
        load_scene_config(path)


def test_missing_required_section(tmp_path: Path) -> None:
    path = _write(tmp_path, "scene:\n  bands_dir: b\n")
    with pytest.raises(ConfigError, match=r"dem: required field missing"):
        load_scene_config(path)


def test_exactly_one_band_source(tmp_path: Path) -> None:
    path = _write(tmp_path, "scene:\n  bands_dir: b\n  safe: x.SAFE\ndem:\n  path: d.tif\n")
    with pytest.raises(ConfigError, match="exactly one of scene.safe, scene.bands_dir or scene.bands"):
        load_scene_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_scene_config(_write(tmp_path, "- a\n- b\n"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_scene_config(tmp_path / "nope.yaml")


def test_aoi_needs_exactly_one_form(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "aoi:\n  crs: EPSG:4326\n")
    with pytest.raises(ConfigError, match="exactly one of aoi.bbox or aoi.path"):
        load_scene_config(path)


def test_region_config_expands_globs(tmp_path: Path) -> None:
    (tmp_path / "scenes").mkdir()
    for name in ("b.yaml", "a.yaml"):
        _write(tmp_path / "scenes", MINIMAL, name)
    region = _write(tmp_path, "scenes: ['scenes/*.yaml']\n", "region.yaml")
    cfg = load_region_config(region)
    assert [p.name for p in cfg.scenes] == ["a.yaml", "b.yaml"]


def test_region_glob_without_match_is_an_error(tmp_path: Path) -> None:
    region = _write(tmp_path, "scenes: ['none/*.yaml']\n", "region.yaml")
    with pytest.raises(ConfigError, match="matches no file"):
        load_region_config(region)


@pytest.mark.parametrize(
    "extra",
    [
        "grid:\n  resolution: ten\n",
        "bogus: 1\n",
        "grid: !!python/object/apply:os.system ['echo pwned']\n",
    ],
)
def test_cli_validate_rejects_bad_config_with_nonzero_exit(tmp_path: Path, extra: str) -> None:
    path = _write(tmp_path, MINIMAL + extra)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode != 0
    assert str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "output").exists()
