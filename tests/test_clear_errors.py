"""Clear errors instead of tracebacks: bad settings are caught when the config is read (with its
file and line), tiny areas of interest are refused with their size and the minimum, repeated
worker deaths name the stage and what to try, and ``validate`` exits like ``run``."""

from __future__ import annotations

import argparse
from pathlib import Path

import dask
import numpy as np
import pytest
import yaml
from small_scene import X0, Y0, scene_yaml, write_scene

from pipeline.cli.validate import BAD_INPUT, add_validate_arguments, cli_validate
from pipeline.core.config import DEFAULT_MODEL, load_scene_config, model_tile_size
from pipeline.core.errors import ConfigError, GridError, PipelineError
from pipeline.run.validate import validate_scene
from pipeline.stack.layers import stack_scene
from pipeline.stack.masks import scl_exclusion
from pipeline.stack.scene_grid import minimum_grid_size

SIZE = 64
RGB_MODEL = DEFAULT_MODEL.parent / "rgb_terrain.safetensors"

MINIMAL = """\
scene:
  bands_dir: bands
dem:
  path: dem.tif
"""


def _write_yaml(tmp_path: Path, text: str, name: str = "scene.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path




@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """B02, B03, B04 (64 x 64 px at 10 m) and a DEM in EPSG:32633."""
    return write_scene(tmp_path, SIZE)


def _validate(config: Path) -> int:
    parser = argparse.ArgumentParser()
    add_validate_arguments(parser)
    return cli_validate(parser.parse_args([str(config)]))


# -- settings caught when the config is read ---------------------------------------------------
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "0", "-10"])
def test_a_resolution_that_is_not_finite_and_positive_names_file_line_and_field(tmp_path: Path, value: str) -> None:
    """``grid.resolution: .inf`` failed in the grid with ``cannot convert float NaN to integer``."""
    path = _write_yaml(tmp_path, MINIMAL + f"grid:\n  resolution: {value}\n")
    with pytest.raises(ConfigError, match=r"scene.yaml:6: grid.resolution: "):
        load_scene_config(path)


@pytest.mark.parametrize("field", ["opening_radius_m", "closing_radius_m", "min_area_m2", "max_hole_m2",
                                   "simplify_m"])
def test_infinite_distances_and_areas_are_refused(tmp_path: Path, field: str) -> None:
    path = _write_yaml(tmp_path, MINIMAL + f"postprocess:\n  {field}: .inf\n")
    with pytest.raises(ConfigError, match=rf"scene.yaml:6: postprocess.{field}: .*finite"):
        load_scene_config(path)


@pytest.mark.parametrize("value", ["0", "-4"])
def test_a_batch_size_below_one_names_file_line_and_field(tmp_path: Path, value: str) -> None:
    path = _write_yaml(tmp_path, MINIMAL + f"model:\n  batch_size: {value}\n")
    with pytest.raises(ConfigError, match=r"scene.yaml:6: model.batch_size: .*positive integer or 'auto'"):
        load_scene_config(path)


@pytest.mark.parametrize("value", ["auto", "1", "16"])
def test_valid_batch_sizes_pass(tmp_path: Path, value: str) -> None:
    cfg = load_scene_config(_write_yaml(tmp_path, MINIMAL + f"model:\n  batch_size: {value}\n"))
    assert cfg.model.batch_size == (value if value == "auto" else int(value))


def test_an_overlap_as_wide_as_the_window_is_caught_with_the_config(tmp_path: Path) -> None:
    """It used to be found at inference, after the stack and the cluster were set up."""
    tile = model_tile_size(DEFAULT_MODEL)
    assert tile == 128
    path = _write_yaml(tmp_path, MINIMAL + f"model:\n  tta: false\n  overlap: {tile}\n")
    with pytest.raises(ConfigError) as err:
        load_scene_config(path)
    msg = str(err.value)
    assert f"scene.yaml:7: model.overlap: {tile} px must be smaller than the model's window of {tile} px" in msg
    assert str(DEFAULT_MODEL) in msg
    assert load_scene_config(_write_yaml(tmp_path, MINIMAL + f"model:\n  overlap: {tile - 1}\n")).model.overlap == 127
    # odd overlaps work (the inference tests blend with 9 px): only the range is checked
    assert load_scene_config(_write_yaml(tmp_path, MINIMAL + "model:\n  overlap: 9\n")).model.overlap == 9


def test_an_ensemble_overlap_is_checked_against_every_member(tmp_path: Path) -> None:
    path = _write_yaml(tmp_path, MINIMAL + f"model:\n  path: [{DEFAULT_MODEL}, {RGB_MODEL}]\n  overlap: 200\n")
    with pytest.raises(ConfigError, match=r"scene.yaml:7: model.overlap: 200 px"):
        load_scene_config(path)


def test_an_unreadable_model_is_left_to_the_model_loader(tmp_path: Path) -> None:
    """Without a readable artefact the window size is unknown: the config loads, the models' loader
    reports the file (with its own message)."""
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    for model in ("missing.safetensors", "junk.safetensors"):
        cfg = load_scene_config(_write_yaml(tmp_path, MINIMAL + f"model:\n  path: {model}\n  overlap: 500\n"))
        assert cfg.model.overlap == 500
    assert model_tile_size(tmp_path / "junk.safetensors") is None


def test_the_run_meets_the_window_size_before_its_cluster_starts() -> None:
    """Configs built in code skip the loader's check: the block size the run computes right after
    reading the models' metadata refuses the overlap, before the cluster starts."""
    from pipeline.inference.options import inference_block_size

    assert inference_block_size(2048, 128, 32) % 96 == 0
    for overlap in (128, 300, -1):
        with pytest.raises(ConfigError, match="model.overlap"):
            inference_block_size(2048, 128, overlap)


# -- tiny areas of interest ------------------------------------------------------------------
@pytest.mark.parametrize("px", [1, 3])
def test_an_aoi_of_a_few_pixels_is_refused_with_its_size_and_the_minimum(scene: Path, px: int) -> None:
    """It failed after the inference with ``The overlapping depth 4 is larger than your array 1``."""
    x, y = X0 + 200, Y0 - 200
    config = scene_yaml(scene, aoi={"bbox": [x, y - px * 10 + 1, x + px * 10 - 1, y], "crs": "EPSG:32633"})
    cfg = load_scene_config(config)
    assert minimum_grid_size(cfg)[0] == 4
    with pytest.raises(GridError) as err:
        stack_scene(cfg)
    msg = str(err.value)
    assert "aoi.bbox" in msg and f"grid of {px} x {px} px" in msg and "minimum of 4 x 4 px" in msg
    assert "opening" in msg and "larger area of interest" in msg
    assert any(f"grid of {px} x {px} px" in p for p in validate_scene(cfg))
    assert _validate(config) == BAD_INPUT == 2


def test_the_minimum_follows_the_postprocessing_radii(scene: Path) -> None:
    x, y = X0 + 200, Y0 - 200
    radii = {"opening_radius_m": 30, "closing_radius_m": 20}  # halo 2 x 3 + 2 x 2 px
    small = load_scene_config(scene_yaml(scene, aoi={"bbox": [x, y - 89, x + 89, y], "crs": "EPSG:32633"},
                                      postprocess=radii))
    assert minimum_grid_size(small)[0] == 10
    with pytest.raises(GridError, match=r"grid of 9 x 9 px .* minimum of 10 x 10 px .*opening_radius_m 30"):
        stack_scene(small)
    enough = load_scene_config(scene_yaml(scene, aoi={"bbox": [x, y - 99, x + 99, y], "crs": "EPSG:32633"},
                                       postprocess=radii))
    assert stack_scene(enough).grid.shape == (10, 10)
    # no halo at all: still a floor of a few pixels
    none = load_scene_config(scene_yaml(scene, postprocess={"opening_radius_m": 0, "closing_radius_m": 0}))
    assert minimum_grid_size(none) == (4, "the pipeline")


def test_an_aoi_at_the_minimum_is_stacked(scene: Path) -> None:
    x, y = X0 + 200, Y0 - 200
    cfg = load_scene_config(scene_yaml(scene, aoi={"bbox": [x, y - 39, x + 39, y], "crs": "EPSG:32633"}))
    stack = stack_scene(cfg)
    assert stack.grid.shape == (4, 4)
    with dask.config.set(scheduler="synchronous"):
        data, valid = dask.compute(stack.data, stack.valid)
    assert np.isfinite(np.asarray(data)).all() and np.asarray(valid).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (5, 300)])
def test_the_cloud_buffer_works_on_arrays_smaller_than_its_radius(shape: tuple[int, int]) -> None:
    """The SCL cloud buffer (a dilation with a halo of its radius) was the first step to fail on a tiny
    grid; it now gives the same result as on the whole array."""
    import dask.array as da
    from scipy.ndimage import binary_dilation

    from postprocess.morphology import disk as _disk

    rng = np.random.default_rng(1)
    scl = rng.choice(np.array([4.0, 5.0, 8.0], np.float32), size=shape, p=[0.6, 0.3, 0.1])
    scl[0, 0] = 8.0
    lazy = da.from_array(scl, chunks=(2, 128))
    got = scl_exclusion(lazy, [0, 1, 8], [8], 4.0).compute()
    expected = binary_dilation(scl == 8.0, structure=_disk(4.0))
    np.testing.assert_array_equal(got, expected)


def test_a_tiny_aoi_fails_the_run_before_anything_is_started_or_written(scene: Path) -> None:
    from pipeline.run.scene import run_scene

    x, y = X0 + 200, Y0 - 200
    config = scene_yaml(scene, aoi={"bbox": [x, y - 9, x + 9, y], "crs": "EPSG:32633"},
                     model={"path": str(RGB_MODEL)})
    data = yaml.safe_load(config.read_text())
    del data["channels"]
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(GridError, match="grid of 1 x 1 px"):
        run_scene(load_scene_config(config))
    out = scene / "out"
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


# -- worker deaths ---------------------------------------------------------------------------
class _Worker:
    address = "tcp://127.0.0.1:40123"


def _killed(key: object = ("predict-0123456789abcdef", 2, 3)) -> Exception:
    from distributed import KilledWorker

    return KilledWorker(key, _Worker(), 3)


def test_a_task_that_kills_its_workers_is_explained(caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.core.progress import WorkerDeathError, compute

    def boom() -> None:
        raise _killed()

    with pytest.raises(WorkerDeathError) as err:
        compute(dask.delayed(boom)(), "inference")
    msg = str(err.value)
    assert isinstance(err.value, PipelineError)
    assert "stage 'inference'" in msg and "task predict" in msg and "predict-0123456789abcdef" in msg
    assert "4 workers" in msg and "3 retries" in msg and "allowed-failures" in msg
    assert "grid.block_size" in msg and "model.batch_size" in msg and "dask.memory_limit" in msg
    assert "tcp://127.0.0.1:40123" in msg


def test_worker_deaths_on_a_distributed_client_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the client path of :func:`pipeline.core.progress.compute` (futures' results)."""
    from pipeline.core import progress

    class Future:
        def result(self) -> None:
            raise _killed(("write-block-ffff", 0))

    class Client:
        def compute(self, obj: object) -> object:
            return [Future(), Future()] if isinstance(obj, list) else Future()

    monkeypatch.setattr(progress, "_client", lambda: Client())
    monkeypatch.setattr(progress, "_interactive", lambda: False)
    with pytest.raises(progress.WorkerDeathError, match="stage 'write probability': task write-block"):
        progress.compute(dask.delayed(int)(1), "write probability")
    with pytest.raises(progress.WorkerDeathError):
        progress.compute([dask.delayed(int)(1), dask.delayed(int)(2)], "two")


def test_a_worker_death_outside_the_progress_computations_names_its_stage(
        demo: Path, tmp_path: Path, client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``KilledWorker`` raised by any computation of a stage (here while the GeoPackage is
    written) fails the run with a :class:`WorkerDeathError` naming the stage, which the nightly job
    retries; no report marks the run complete."""
    import postprocess.gpkg
    from pipeline.core.progress import WorkerDeathError
    from pipeline.run.scene import run_scene

    def dies(*args: object, **kwargs: object) -> None:
        raise _killed(("vectorize-block-0123", 1, 0))

    monkeypatch.setattr(postprocess.gpkg, "write_geopackage", dies)
    from conftest import demo_config

    cfg = demo_config(demo, tmp_path)
    with pytest.raises(WorkerDeathError, match="stage 'write': task vectorize-block") as err:
        run_scene(cfg, client=client)
    assert err.value.transient and "grid.block_size" in str(err.value)
    assert not list(tmp_path.rglob("report.json")) and not list(tmp_path.rglob("*.gpkg"))


def test_other_errors_pass_through_unchanged() -> None:
    from pipeline.core.progress import compute, worker_deaths_explained

    def fail() -> None:
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        compute(dask.delayed(fail)(), "stage")
    with pytest.raises(KeyError), worker_deaths_explained("stage"):
        raise KeyError("x")


# -- validate ----------------------------------------------------------------------------------
def test_validate_exits_2_for_a_bad_config_like_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_yaml(tmp_path, MINIMAL + "grid:\n  resolution: .inf\n")
    assert _validate(path) == 2
    assert "grid.resolution" in capsys.readouterr().err


def test_validate_exits_2_for_bad_inputs(scene: Path) -> None:
    (scene / "dem.tif").unlink()
    assert _validate(scene_yaml(scene)) == 2


def test_a_model_error_comes_without_a_misleading_channel_message(scene: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without a readable model its channels are unknown: validate used to check the 14
    Landslide4Sense channels instead and add "cannot supply channel(s) B01, B05, ... B10"."""
    (scene / "broken.safetensors").write_bytes(b"\x00" * 64)
    config = scene_yaml(scene, model={"path": "broken.safetensors"})
    data = yaml.safe_load(config.read_text())
    del data["channels"]
    config.write_text(yaml.safe_dump(data))
    assert _validate(config) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err
    assert "B10" not in err and "cannot supply" not in err
    # the inputs are still checked: a missing DEM is reported beside the model error
    (scene / "dem.tif").unlink()
    assert _validate(config) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and "dem.tif" in err and "B10" not in err


def test_a_missing_bands_folder_is_named_before_anything_runs(tmp_path: Path) -> None:
    """The run's fingerprint lists the band folder first: a missing folder is an input error with the
    field, not a FileNotFoundError traceback, and the region job does not retry it."""
    from pipeline.core.config import load_scene_config
    from pipeline.core.errors import InputError
    from pipeline.run.scene import run_scene

    cfg_path = tmp_path / "scene.yaml"
    cfg_path.write_text("scene:\n  bands_dir: does_not_exist\ndem:\n  path: nope.tif\n")
    with pytest.raises(InputError, match="scene.bands_dir: folder not found"):
        run_scene(load_scene_config(cfg_path))
    assert not list(tmp_path.rglob("run-*"))
