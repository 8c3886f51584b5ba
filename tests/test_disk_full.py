"""A full disk (or a file size limit) while writing outputs: nothing lost, nothing leaked.

Every writer reads its file back before renaming it into place (GDAL's COG driver with several
threads reports no failed write: a full disk gave exit 0 and a truncated TIFF at the final
path), and every way a full disk shows (a GDAL "Write failed", SQLite's "database or disk is
full", pyogrio's "Failed to commit transaction", ``[Errno 28]``, a truncated file found on
reading back) becomes one :class:`~pipeline.core.errors.DiskFull` naming the output folder; the
command line prints it on one line and exits non-zero, without a traceback.

The disk fills for real where this process may mount a small tmpfs (root); otherwise those
tests skip and say so. A file size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored: writes beyond it
fail with ``EFBIG``) needs no privileges. The read-back checks are also tested on files
truncated on purpose.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dask.array
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from PIL import Image

from pipeline.core import fsutil
from pipeline.core.errors import DiskFull, FileSizeLimit, OutputError
from pipeline.core.fsutil import WriteCheckFailed
from pipeline.core.grid import Grid
from pipeline.io import cog
from pipeline.io.raster_check import verify_raster
from postprocess.gpkg import verify_geopackage, write_geopackage
from postprocess.quicklook import save_png_atomic, verify_png

ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = "no space left on the device"
SIZE_LIMIT = "file size limit"


# -- helpers ---------------------------------------------------------------------------------
def _mount_refusal(probe: Path) -> str | None:
    """Why a tmpfs cannot be mounted here (``None``: it can; the probe mount is undone)."""
    if sys.platform != "linux":
        return "tmpfs mounts need Linux"
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root (run as root to fill a disk for real)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    probe.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"mount -t tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode})"
    subprocess.run(["umount", str(probe)], check=True)
    return None


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``small_disk("2m")``: a fresh tmpfs of that size, unmounted at the end of the module."""
    base = tmp_path_factory.mktemp("disks")
    reason = _mount_refusal(base / "probe")
    if reason is not None:
        pytest.skip(reason)
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = base / f"disk-{size}-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _fill(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s file system up to ``leave`` free bytes with a file of zeros."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        chunk = b"\0" * 65536
        while (free := shutil.disk_usage(folder).free) > leave:
            fh.write(chunk[: min(len(chunk), free - leave)])
            fh.flush()
    return filler


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.demo.write import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "demo", size=318, seed=3).scene_yaml


def _scene(demo: Path, out: Path, name: str) -> Path:
    text = demo.read_text()
    assert "  dir: output\n" in text
    yaml = demo.parent / f"{name}.yaml"
    yaml.write_text(text.replace("  dir: output\n", f"  dir: {out}\n"))
    return yaml


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: inherited by its Dask workers too
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes beyond the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _cli(*args: str, file_size_limit: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout,
                          preexec_fn=_limit_file_size(file_size_limit) if file_size_limit else None)


def _tracebacks(stderr: str) -> list[str]:
    """The tracebacks in ``stderr``, less one that is no concern of these tests: a worker whose
    heartbeat finds the scheduler closed while the cluster shuts down (distributed logs it with
    its traceback, on a loaded machine, after runs that succeed as well as after failures)."""
    blocks = stderr.split("Failed to communicate with scheduler during heartbeat.")
    kept = [blocks[0]] + [b.split("Stream is closed", 1)[-1] for b in blocks[1:]]
    return [b for b in kept if "Traceback" in b]


def _assert_one_clear_error(proc: subprocess.CompletedProcess[str], folder: Path, what: str = NO_SPACE) -> str:
    """Non-zero exit, one ``error:`` line naming ``folder`` and saying ``what``, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: {folder}"), proc.stderr
    assert what in errors[0], proc.stderr
    assert not _tracebacks(proc.stderr + proc.stdout), proc.stderr
    return errors[0]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


# -- the stack command: a disk that fills during the COG copy -------------------------------------
def test_stack_onto_a_disk_that_fills_during_the_cog_copy(demo: Path, small_disk: Callable[[str], Path]) -> None:
    """The case of the issue: the temporary tiled file fits, the COG copy (GDAL with 2 threads
    on 2 cores) does not, GDAL says nothing. Exit non-zero, one line naming the folder, nothing
    at the final path, no temporary left."""
    disk = small_disk("1000k")
    proc = _cli("stack", str(demo), "--channels", "B02,B03,B04", "--out", str(disk / "stack.tif"))
    line = _assert_one_clear_error(proc, disk)
    assert "stack.tif" in line and "MB free" in line
    assert sorted(p.name for p in disk.iterdir()) == []


def test_stack_on_a_full_disk_keeps_the_earlier_stack(demo: Path, small_disk: Callable[[str], Path]) -> None:
    disk = small_disk("1400k")
    out = disk / "stack.tif"
    proc = _cli("stack", str(demo), "--channels", "B02,B03,B04", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    before = _sha(out)
    proc = _cli("stack", str(demo), "--channels", "B02,B03,B04", "--out", str(out))
    _assert_one_clear_error(proc, disk)
    assert _sha(out) == before
    assert sorted(p.name for p in disk.iterdir()) == ["stack.tif"]
    with rasterio.open(out) as ds:
        assert ds.read().shape == (3, 318, 318)


@pytest.mark.parametrize("limit", [200_000, 600_000])
def test_stack_beyond_the_file_size_limit(demo: Path, tmp_path: Path, limit: int) -> None:
    """Without root: the process may write files of at most ``limit`` bytes. 200 kB stops the
    temporary tiled file, 600 kB the COG copy (which GDAL does not report with 2 threads)."""
    proc = _cli("stack", str(demo), "--channels", "B02,B03,B04", "--out", str(tmp_path / "stack.tif"),
                file_size_limit=limit)
    line = _assert_one_clear_error(proc, tmp_path, SIZE_LIMIT)
    assert f"{limit / 1e6:.1f} MB" in line and "ulimit -f" in line and "stack.tif" in line
    assert NO_SPACE not in line
    assert not list(tmp_path.iterdir())


# -- a whole run ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["1000k", "2400k"])
def test_run_onto_a_full_disk(demo: Path, small_disk: Callable[[str], Path], size: str) -> None:
    """1000k fills while the workers store the intermediates, 2400k while the GeoPackage or the
    quicklook is written (which one depends on the threads' order). Either way: one line naming
    the run folder, no traceback (not even the worker's report of the failed task), no report,
    nothing partial at a final path, no temporary left."""
    disk = small_disk(size)
    proc = _cli("run", str(_scene(demo, disk, f"scene-{size}")))
    [run_dir] = list(disk.glob("*/run-*"))
    _assert_one_clear_error(proc, run_dir)
    assert "Compute Failed" not in proc.stderr
    assert not (run_dir / "report.json").exists() and not (run_dir.parent / "LATEST").exists()
    assert _hidden(disk) == []
    for path in run_dir.iterdir():  # what reached its final path is complete
        if path.suffix == ".tif":
            with rasterio.open(path) as ds:
                verify_raster(path, width=ds.width, height=ds.height, count=ds.count, dtype=ds.dtypes[0])
        elif path.suffix == ".gpkg":
            verify_geopackage(path, "landslides", len(gpd.read_file(path)))
        elif path.suffix == ".png":
            verify_png(path)


def test_a_run_that_fills_the_disk_leaves_the_earlier_run_as_it_was(demo: Path,
                                                                     small_disk: Callable[[str], Path]) -> None:
    """A completed run, then a run of another config on the same, now too small, disk: the second
    fails clearly, the first run's folder and the scene's LATEST keep every byte, and the first
    config's rerun still finds its outputs intact ("already up to date")."""
    disk = small_disk("3000k")
    first = _scene(demo, disk, "scene-first")
    proc = _cli("run", str(first))
    assert proc.returncode == 0, proc.stderr
    [run_dir] = list(disk.glob("*/run-*"))
    before = {p.name: _sha(p) for p in run_dir.parent.rglob("*") if p.is_file()}
    second = demo.parent / "scene-second.yaml"
    second.write_text(first.read_text() + "postprocess:\n  min_area_m2: 400\n")
    proc = _cli("run", str(second))
    [other] = [p for p in disk.glob("*/run-*") if p != run_dir]
    _assert_one_clear_error(proc, other)
    assert {p.name: _sha(p) for p in run_dir.parent.rglob("*") if p.is_file() and other not in p.parents} == before
    assert not (other / "report.json").exists() and _hidden(disk) == []
    proc = _cli("run", str(first))
    assert proc.returncode == 0 and "already up to date" in proc.stdout, proc.stderr


def test_a_region_night_on_a_full_disk_leaves_the_earlier_night_as_it_was(
        demo: Path, small_disk: Callable[[str], Path]) -> None:
    """A night of one scene completes; the next night, with a second scene, fills the disk: the job
    stops there (every later scene would fail the same way) with one line naming the output folder,
    and the earlier night's regional GeoPackage, report and run folder keep every byte; the state
    records the failure."""
    disk = small_disk("3600k")
    first = _scene(demo, disk, "night-first")
    second = demo.parent / "night-second.yaml"
    second.write_text(first.read_text() + "postprocess:\n  min_area_m2: 400\n")
    region = demo.parent / "night-region.yaml"
    region.write_text(f"name: nights\nscenes: [{first}]\noutput:\n  dir: {disk}\n")
    proc = _cli("region", str(region))
    assert proc.returncode == 0, proc.stderr
    before = {p.relative_to(disk): _sha(p) for p in disk.rglob("*") if p.is_file()}
    assert {"nights.gpkg", "nights.region_state.json", "nights.report.html"} <= {p.name for p in before}
    region.write_text(f"name: nights\nscenes: [{first}, {second}]\noutput:\n  dir: {disk}\n")
    _fill(disk, 1_200_000)
    proc = _cli("region", str(region))
    assert proc.returncode != 0, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and NO_SPACE in errors[0] and errors[0].startswith(f"error: {disk}"), proc.stderr
    assert not _tracebacks(proc.stderr + proc.stdout), proc.stderr
    after = {p.relative_to(disk): _sha(p) for p in disk.rglob("*") if p.is_file() and p.name != "filler"}
    state = Path("nights.region_state.json")
    assert {k: v for k, v in after.items() if k in before and k != state} == \
        {k: v for k, v in before.items() if k != state}
    assert _hidden(disk) == []
    recorded = json.loads((disk / state).read_text())["scenes"][str(second)]
    assert recorded["status"] == "failed" and NO_SPACE in recorded["error"]


# -- each writer, in this process, on a disk with little room left --------------------------------
def _grid(size: int) -> Grid:
    return Grid.from_bounds((500000, 4000000, 500000 + 10 * size, 4000000 + 10 * size), "EPSG:32633", 10)


def _noise(size: int, bands: int = 4) -> np.ndarray:
    return np.random.default_rng(0).random((bands, size, size), dtype=np.float32)  # does not compress


def _polygons(n: int) -> gpd.GeoDataFrame:
    geoms = [shapely.box(500000 + 40 * i, 4000000, 500000 + 40 * i + 30, 4000030).buffer(3, 64) for i in range(n)]
    return gpd.GeoDataFrame({"mean_prob": np.linspace(0.5, 0.9, n), "note": ["x" * 200] * n},
                            geometry=geoms, crs="EPSG:32633")


def _write_cog(path: Path, threads: int, size: int = 256) -> None:
    token = cog.GDAL_THREADS.set(threads)
    try:
        cog.write_cog(dask.array.from_array(_noise(size), chunks=(4, 128, 128)), _grid(size), path,
                      dtype="float32", nodata=None)
    finally:
        cog.GDAL_THREADS.reset(token)


def _write_png(path: Path, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    save_png_atomic(Image.fromarray(pixels, mode="RGB"), path, compress_level=1)


WRITERS: dict[str, tuple[str, Callable[[Path], None], int]] = {
    # name: (file, writer, bytes left free on the disk for the second write)
    "cog-1-thread": ("probability.tif", lambda p: _write_cog(p, 1), 600_000),
    "cog-2-threads": ("probability.tif", lambda p: _write_cog(p, 2), 600_000),
    "cog-4-threads": ("probability.tif", lambda p: _write_cog(p, 4), 1_300_000),
    "geopackage": ("landslides.gpkg", lambda p: write_geopackage(_polygons(400), p), 60_000),
    "png": ("quicklook.png", _write_png, 100_000),
    "json": ("report.json", lambda p: fsutil.write_atomic(p, json.dumps(list(range(100_000))).encode()), 200_000),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_writer_on_a_full_disk_keeps_the_earlier_file(name: str, small_disk: Callable[[str], Path]) -> None:
    file, write, leave = WRITERS[name]
    disk = small_disk("4m")
    path = disk / file
    write(path)
    before = _sha(path)
    filler = _fill(disk, leave)
    with pytest.raises(DiskFull) as info:
        write(path)
    message = str(info.value)
    assert message.startswith(f"{disk}: {NO_SPACE} while writing {file} (") and "MB free" in message
    assert isinstance(info.value, OutputError) and info.value.errno == errno.ENOSPC
    assert info.value.folder == str(disk) and info.value.file == file
    assert _sha(path) == before
    assert sorted(p.name for p in disk.iterdir()) == sorted([file, "filler"])  # no temporary left
    filler.unlink()
    write(path)  # with room again, it works


WRITER_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_disk_full import WRITERS
from pipeline.core.errors import FileSizeLimit
out = Path(sys.argv[1])
for name in {names!r}:
    file, write, _ = WRITERS[name]
    try:
        write(out / name / file)
    except FileSizeLimit as exc:
        print(json.dumps([name, "FileSizeLimit", str(exc)]))
    except Exception as exc:
        print(json.dumps([name, type(exc).__name__, str(exc)]))
    else:
        print(json.dumps([name, "written", ""]))
"""


def test_writers_beyond_the_file_size_limit(tmp_path: Path) -> None:
    """Each writer in a process whose files may not grow beyond 100 kB (no root needed)."""
    names = [n for n in WRITERS if n != "cog-4-threads"]
    for name in names:
        (tmp_path / name).mkdir()
    script = WRITER_SCRIPT.format(tests=str(Path(__file__).parent), names=names)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, preexec_fn=_limit_file_size(100_000))
    assert proc.returncode == 0, proc.stderr
    results = {name: (kind, message) for name, kind, message in map(json.loads, proc.stdout.splitlines())}
    assert set(results) == set(names)
    for name, (kind, message) in results.items():
        folder, file = tmp_path / name, WRITERS[name][0]
        assert kind == "FileSizeLimit", (name, kind, message)
        assert message.startswith(f"{folder}: the file size limit of 0.1 MB of this process (ulimit -f)")
        assert file in message and NO_SPACE not in message
        assert list(folder.iterdir()) == [], name  # nothing at the final path, no temporary


# -- the read-back checks, on files truncated on purpose ------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
def test_verify_raster_finds_every_truncation(tmp_path: Path, threads: int) -> None:
    path = tmp_path / "ok.tif"
    _write_cog(path, threads, size=1100)  # overviews, 3 x 3 blocks of 512
    with rasterio.open(path) as ds:
        assert ds.overviews(1)
    expected = {"width": 1100, "height": 1100, "count": 4, "dtype": "float32"}
    verify_raster(path, **expected)
    data = path.read_bytes()
    # (a COG ends with 4 trailer bytes that repeat the last block's end: cut into the block itself)
    for cut in (100, 1000, len(data) // 3, len(data) // 2, len(data) - 5000, len(data) - 5):
        bad = tmp_path / f"cut-{cut}.tif"
        bad.write_bytes(data[:cut])
        with pytest.raises(WriteCheckFailed):
            verify_raster(bad, **expected)
    with pytest.raises(WriteCheckFailed, match="expected 1100 x 1100, 3 of float32"):
        verify_raster(path, **{**expected, "count": 3})
    with pytest.raises(WriteCheckFailed, match="uint8"):
        verify_raster(path, **{**expected, "dtype": "uint8"})


def test_verify_raster_of_a_sparse_file(tmp_path: Path) -> None:
    """Sparse temporaries (SPARSE_OK): blocks never written are allowed, blocks cut off are not."""
    path = tmp_path / "sparse.tif"
    profile = {"driver": "GTiff", "width": 512, "height": 512, "count": 1, "dtype": "float32", "tiled": True,
               "blockxsize": 256, "blockysize": 256, "sparse_ok": True, "crs": "EPSG:32633",
               "transform": _grid(512).transform}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(_noise(256, 1), window=rasterio.windows.Window(0, 0, 256, 256))
    verify_raster(path, width=512, height=512, count=1, dtype="float32", sparse=True)
    with pytest.raises(WriteCheckFailed, match="missing"):
        verify_raster(path, width=512, height=512, count=1, dtype="float32")
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WriteCheckFailed):
        verify_raster(cut, width=512, height=512, count=1, dtype="float32", sparse=True)


def test_verify_geopackage_finds_truncation_and_wrong_counts(tmp_path: Path) -> None:
    path = tmp_path / "ok.gpkg"
    write_geopackage(_polygons(400), path)
    verify_geopackage(path, "landslides", 400)
    with pytest.raises(WriteCheckFailed, match="expected 399"):
        verify_geopackage(path, "landslides", 399)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 4096):
        bad = tmp_path / f"cut-{cut}.gpkg"
        bad.write_bytes(data[:cut])
        with pytest.raises(WriteCheckFailed):
            verify_geopackage(bad, "landslides", 400)


def test_verify_png_finds_truncation(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    _write_png(path)
    verify_png(path, path.stat().st_size, (300, 300))
    data = path.read_bytes()
    for cut in (50, len(data) // 2, len(data) - 20):
        bad = tmp_path / f"cut-{cut}.png"
        bad.write_bytes(data[:cut])
        with pytest.raises(WriteCheckFailed):
            verify_png(bad)
    with pytest.raises(WriteCheckFailed, match="holds"):
        verify_png(path, len(data) + 10)


# -- how failures are told apart ---------------------------------------------------------------
def test_write_failure_tells_a_full_disk_from_other_failures(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out" / "x.tif"
    no_space = OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(fsutil.write_failure(path, "Write failed", no_space), DiskFull)
    full_db = sqlite3.OperationalError("database or disk is full")
    assert isinstance(fsutil.write_failure(path, str(full_db), full_db), DiskFull)
    chained = RuntimeError("Failed to commit transaction")
    chained.__cause__ = no_space
    assert isinstance(fsutil.write_failure(path, str(chained), chained), DiskFull)
    too_large = OSError(errno.EFBIG, "File too large")
    assert type(fsutil.write_failure(path, "x", too_large)) is FileSizeLimit
    # nothing says why: a full disk only when little is free
    other = fsutil.write_failure(path, "Write failed: TIFFAppendToStrip", what="cannot write the COG")
    assert type(other) is OutputError and str(other) == f"{path}: cannot write the COG (Write failed: TIFFAppendToStrip)"
    monkeypatch.setattr(fsutil, "free_bytes", lambda folder: 3_000_000)
    low = fsutil.write_failure(path, "Write failed: TIFFAppendToStrip")
    assert isinstance(low, DiskFull) and low.free_bytes == 3_000_000
    assert str(low) == (f"{path.parent}: {NO_SPACE} while writing x.tif (3.0 MB free); free space there or "
                        "choose another output folder (output.dir, or --out for stack)")
    monkeypatch.setattr(fsutil, "free_bytes", lambda folder: 10 * fsutil.LOW_SPACE_MARGIN)
    assert type(fsutil.write_failure(path, "Write failed", needed=20 * fsutil.LOW_SPACE_MARGIN)) is DiskFull
    assert type(fsutil.write_failure(path, "Write failed")) is OutputError


def test_disk_full_errors_survive_pickling() -> None:
    """They are raised in Dask workers and reach the client pickled."""
    import pickle

    error = fsutil.write_failure(Path("/data/out/x.tif"), "x", OSError(errno.ENOSPC, "No space left on device"))
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is DiskFull and str(back) == str(error) and back.errno == errno.ENOSPC
    assert back.folder == "/data/out" and back.file == "x.tif"


def test_the_command_line_net_for_unwrapped_disk_full_errors() -> None:
    from pipeline.__main__ import _out_of_room

    message = _out_of_room(OSError(errno.ENOSPC, "No space left on device", "/tmp/x/out.json"))
    assert message is not None and message.startswith(f"/tmp/x: {NO_SPACE} while writing out.json")
    assert _out_of_room(sqlite3.OperationalError("database or disk is full")) is not None
    assert SIZE_LIMIT in (_out_of_room(OSError(errno.EFBIG, "File too large")) or "")
    assert _out_of_room(ValueError("something else")) is None
