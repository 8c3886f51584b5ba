"""Nothing lost, nothing leaked: reruns verify the outputs by checksum, the run folder's lock keeps a
second run of the same config out, and the temporaries of dead runs are removed by the lock holder.

One demo run (size 318) is shared by the tests of this module; a test that damages it leaves it
complete again (each rerun that redoes it is part of the test).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyogrio
import pytest
from conftest import ROOT, demo_config

from pipeline.core import fsutil
from pipeline.core.errors import OutputError
from pipeline.run.folder import LOCK, REPORT, RunFolderBusy, is_leftover, verify_run
from pipeline.run.scene import run_scene

pytestmark = pytest.mark.slow


_config = demo_config


def _features(gpkg: Path) -> tuple[pd.DataFrame, list[bytes]]:
    """The attributes and polygons of the GeoPackage, without the run's id (the one thing a redo changes)."""
    gdf = pyogrio.read_dataframe(gpkg, layer="landslides").sort_values("landslide_id").reset_index(drop=True)
    return pd.DataFrame(gdf.drop(columns=["geometry", "run_id"])), list(gdf.geometry.to_wkb())


def _assert_same_features(gpkg: Path, expected: tuple[pd.DataFrame, list[bytes]]) -> None:
    attributes, polygons = _features(gpkg)
    assert len(polygons) > 0 and polygons == expected[1]
    pd.testing.assert_frame_equal(attributes, expected[0])


def _files(run_dir: Path) -> dict[str, tuple[int, int, str]]:
    """Every file in the run folder: size, modification time and SHA-256."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, str(fsutil.file_record(p)["sha256"]))
            for p in sorted(run_dir.iterdir())}


class Completed:
    def __init__(self, cfg, result, temporaries: list[str]) -> None:  # noqa: ANN001
        self.cfg = cfg
        self.result = result
        self.run_dir: Path = result.run_dir
        self.gpkg: Path = result.geopackage
        self.temporaries = temporaries  # names of the temporaries the run created in its folder
        self.features = _features(result.geopackage)


@pytest.fixture(scope="module")
def completed(demo: Path, client, tmp_path_factory: pytest.TempPathFactory) -> Completed:
    """A completed demo run, and the name of every temporary file it created in its run folder
    (recorded where the code names them: fsutil.mkstemp, pipeline.io.cog's temporary rasters)."""
    import pipeline.io.cog as cog

    cfg = _config(demo, tmp_path_factory.mktemp("integrity"))
    created: list[Path] = []
    real_mkstemp, real_start, real_copy = fsutil.mkstemp, cog._start, cog._copy_as_cog

    def mkstemp(**kwargs):  # noqa: ANN003, ANN202
        fd, path = real_mkstemp(**kwargs)
        created.append(Path(path))
        return fd, path

    def start(out, grid):  # noqa: ANN001, ANN202
        plan = real_start(out, grid)
        created.extend([plan["path"], plan["tmp_tiff"]])  # the path: the run's hidden intermediates
        return plan

    def copy_as_cog(source, dest, path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        created.append(Path(dest))
        return real_copy(source, dest, path, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fsutil, "mkstemp", mkstemp)
        mp.setattr(cog, "_start", start)
        mp.setattr(cog, "_copy_as_cog", copy_as_cog)
        res = run_scene(cfg, client=client)
    assert res.status == "completed"
    temporaries = sorted({p.name for p in created if p.parent == res.run_dir and p.name.startswith(".")})
    return Completed(cfg, res, temporaries)


def test_report_records_size_and_sha256_of_every_output(completed: Completed) -> None:
    report = json.loads((completed.run_dir / REPORT).read_text())
    files = report["output_files"]
    # reading the GeoPackage (here: the fixture) makes GDAL write its .aux.xml sidecar: not an output
    names = sorted(p.name for p in completed.run_dir.iterdir() if not p.name.endswith(".aux.xml"))
    assert (completed.run_dir / f"{completed.gpkg.name}.aux.xml").is_file()
    assert report["outputs"] == names  # still the list of names; the lock file is gone with the run
    assert sorted(files) == [n for n in names if n not in (REPORT, "report.html")]  # the page is a view, rebuilt
    assert completed.gpkg.name in files and "probability.tif" in files and "mask.tif" in files
    for name, record in files.items():
        assert record == fsutil.file_record(completed.run_dir / name), name
    assert "checksums" in report["timings_s"]
    assert verify_run(completed.run_dir, completed.gpkg) == (report, [])


def test_the_temporaries_a_run_creates_are_known_as_leftovers(completed: Completed) -> None:
    """Every temporary name the code created in the run folder is one the lock holder removes;
    outputs and the lock file are not."""
    gpkg = completed.gpkg.name
    shapes = {
        ".probability.tif", ".layers.tif",  # the run's intermediates
        "..probability.tif.<id>.tiles.tif", "..layers.tif.<id>.tiles.tif",  # cog.write_rasters
        ".mask.tif.<id>.tiles.tif", ".mask.tif.<id>.cog.tif",
        ".probability.tif.<id>.cog.tif",  # cog.cog_from_tiff
        f".{gpkg}.<id>.tmp.gpkg", ".quicklook.png.<id>.tmp", ".report.json.<id>.tmp", ".report.html.<id>.tmp",
        ".probability.qml.<id>.tmp",  # postprocess.raster_style: QGIS's style beside the raster
    }
    seen = set()
    for name in completed.temporaries:
        parts = name.split(".")
        for i, part in enumerate(parts):  # the random part: 8 characters between known ones
            if len(part) == 8 and i > 1:
                parts[i] = "<id>"
        seen.add(".".join(parts))
    assert seen == shapes, completed.temporaries
    for name in [*completed.temporaries, f".{gpkg}.abcd1234.tmp.gpkg-journal", ".probability.tif.aux.xml"]:
        assert is_leftover(name), name
    for name in [LOCK, REPORT, "report.html", gpkg, "probability.tif", "mask.tif", "quicklook.png", "uncertainty.tif",
                 "stack.tif", ".notes.txt"]:
        assert not is_leftover(name), name


def test_rerun_redoes_a_run_whose_geopackage_was_truncated(completed: Completed, client, caplog) -> None:
    gpkg = completed.gpkg
    size = gpkg.stat().st_size
    with open(gpkg, "r+b") as fh:
        fh.truncate(size // 2)
    with caplog.at_level("WARNING", logger="pipeline.run"):
        res = run_scene(completed.cfg, client=client)
    assert res.status == "completed" and res.run_dir == completed.run_dir
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{gpkg.name} has {size // 2} bytes, {REPORT} recorded {size}" in m and "redoing the run" in m
               for m in warning), warning
    assert pyogrio.read_info(gpkg, layer="landslides")["features"] == completed.result.n_polygons
    _assert_same_features(gpkg, completed.features)
    assert not [p.name for p in res.run_dir.iterdir() if p.name.startswith(".")]
    assert run_scene(completed.cfg, client=client).status == "skipped"  # complete and verified again


def test_rerun_redoes_a_run_with_a_missing_output(completed: Completed, client, caplog) -> None:
    mask = completed.run_dir / "mask.tif"
    mask.unlink()
    with caplog.at_level("WARNING", logger="pipeline.run"):
        res = run_scene(completed.cfg, client=client)
    assert res.status == "completed"
    assert "mask.tif is missing" in caplog.text and "redoing the run" in caplog.text
    assert mask.is_file()
    assert res.report["output_files"]["mask.tif"] == fsutil.file_record(mask)
    _assert_same_features(completed.gpkg, completed.features)


def test_verification_finds_changed_bytes_and_unreadable_reports(completed: Completed, tmp_path: Path) -> None:
    """Same size, other content; an unreadable report; a report without checksums (an older
    version's): none is trusted (checked on a copy of the run folder)."""
    run_dir = tmp_path / completed.run_dir.name
    shutil.copytree(completed.run_dir, run_dir)
    gpkg = run_dir / completed.gpkg.name
    assert verify_run(run_dir, gpkg)[0] is not None

    look = run_dir / "quicklook.png"
    data = bytearray(look.read_bytes())
    data[len(data) // 2] ^= 0xFF
    look.write_bytes(bytes(data))
    report, problems = verify_run(run_dir, gpkg)
    assert report is None and problems == [f"quicklook.png does not have the SHA-256 that {REPORT} recorded "
                                           "(its content changed)"]
    shutil.copy2(completed.run_dir / "quicklook.png", look)

    text = (run_dir / REPORT).read_text()
    (run_dir / REPORT).write_text(text[: len(text) // 2])
    report, problems = verify_run(run_dir, gpkg)
    assert report is None and len(problems) == 1 and problems[0].startswith(f"{REPORT} is unreadable")

    old = json.loads(text)
    del old["output_files"]
    (run_dir / REPORT).write_text(json.dumps(old))
    assert verify_run(run_dir, gpkg) == (None, [f"{REPORT} has no output checksums (written by an older version)"])

    (run_dir / REPORT).unlink()
    assert verify_run(run_dir, gpkg) == (None, [])  # no completed run: nothing to say


def test_rerun_removes_the_leftovers_of_a_dead_run(completed: Completed, client) -> None:
    run_dir = completed.run_dir
    before = _files(run_dir)
    gpkg_tmp = next(n for n in completed.temporaries if n.endswith(".tmp.gpkg"))
    planted = [*completed.temporaries, f"{gpkg_tmp}-journal"]
    for name in planted:
        (run_dir / name).write_bytes(b"written by a run that died")
    (run_dir / ".notes.txt").write_text("not the pipeline's: kept")
    res = run_scene(completed.cfg, client=client)
    assert res.status == "skipped"  # the outputs are intact: verified, not redone
    assert (run_dir / ".notes.txt").is_file()
    (run_dir / ".notes.txt").unlink()
    assert _files(run_dir) == before  # every leftover gone, the outputs untouched, no lock file


def test_a_second_run_refuses_while_the_lock_is_held(completed: Completed, client, demo: Path) -> None:
    """The lock held as a running ``python -m pipeline run`` holds it: the CLI says which folder and
    why, without a traceback, and writes nothing; the live run's temporary file stays. Released (the
    lock file left behind, as by a process that was killed), the next run works and removes both."""
    run_dir = completed.run_dir
    live = run_dir / "..probability.tif.0123abcd.tiles.tif"
    live.write_bytes(b"being written by the live run")
    yaml = demo.parent / "integrity_scene.yaml"
    text = demo.read_text()
    assert "  dir: output\n" in text
    yaml.write_text(text.replace("  dir: output\n", f"  dir: {completed.cfg.output.dir}\n  mask_cog: true\n"))
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _files(run_dir)
        for force in ([], ["--force"]):
            proc = subprocess.run([sys.executable, "-m", "pipeline", "run", *force, str(yaml)], capture_output=True,
                                  text=True, cwd=ROOT, timeout=600)
            assert proc.returncode == 2, proc.stderr
            assert f"error: {run_dir}: another run is writing this run folder now" in proc.stderr
            assert "Traceback" not in proc.stderr + proc.stdout
        with pytest.raises(RunFolderBusy, match="another run is writing") as info:
            run_scene(completed.cfg, force=True, client=client)
        assert isinstance(info.value, OutputError)
        assert _files(run_dir) == before  # nothing written, nothing removed
    finally:
        os.close(fd)
    assert (run_dir / LOCK).exists() and live.exists()
    res = run_scene(completed.cfg, force=True, client=client)
    assert res.status == "completed"
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    _assert_same_features(completed.gpkg, completed.features)


def test_lock_is_exclusive_and_survives_its_file_being_replaced(tmp_path: Path) -> None:
    path = tmp_path / LOCK
    fd = fsutil.acquire_lock(path)
    with pytest.raises(fsutil.LockHeld):
        fsutil.acquire_lock(path)
    stale = os.open(path, os.O_RDWR)  # opened before the holder releases (and removes) the file
    fsutil.release_lock(fd, path)
    assert not path.exists()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a lock on the removed file locks nothing
    try:
        fd = fsutil.acquire_lock(path)
        assert path.exists()
        with pytest.raises(fsutil.LockHeld):
            fsutil.acquire_lock(path)
        fsutil.release_lock(fd, path)
    finally:
        os.close(stale)


def test_a_folder_that_cannot_be_locked_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    """No lock support (ENOLCK, as on some network file systems): the run goes on, says so, and
    removes no temporaries (they may be a live run's)."""
    import errno

    import pipeline.run.folder as folder_module

    def no_locks(path):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fsutil, "acquire_lock", no_locks)
    with caplog.at_level("WARNING", logger="pipeline.run"), folder_module.run_folder_lock(tmp_path) as locked:
        assert locked is False
    assert "cannot lock" in caplog.text and "not detected" in caplog.text
