"""The run folder: where a run's outputs go, its lock, its leftovers, and what proves it complete.

Outputs go to ``<output.dir>/<scene id>/run-<key>/``; ``report.json`` is written last and
records the size and SHA-256 of every output, so a rerun skips only a folder whose outputs
are all still there with those bytes (:func:`verify_run`). A run holds the folder's lock
from its start to its end; only the holder removes the temporaries a dead run left.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core import fsutil
from pipeline.core.errors import OutputError

log = logging.getLogger(__name__)

REPORT = "report.json"
#: The run's HTML map report: a view of the outputs, rebuilt when missing, so not checksummed.
REPORT_HTML = "report.html"
#: The lock file in a run folder: held (``flock``) by the run writing the folder, removed at its end.
LOCK = ".lock"
LATEST = "LATEST"


def ensure_writable_dir(path: Path, *, field: str, source: Path | None = None) -> None:
    """Create ``path`` if needed and prove we can write into it, or raise OutputError."""
    where = f"{source}: " if source else ""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise fsutil.folder_failure(
            exc, path / ".write-test", f"{where}{field}: output directory {path} is not writable "
            f"({exc.strerror or exc}); choose another output.dir or fix its permissions") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON beside ``path`` under a temporary name, check that the file holds
    every byte, rename it into place (:func:`pipeline.core.fsutil.write_atomic`: a full disk raises
    :class:`~pipeline.core.errors.DiskFull`, and ``path`` keeps what it held)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    fsutil.write_atomic(path, text.encode())


class RunFolderBusy(OutputError):
    """Another run holds the run folder's lock: it is writing the same outputs now."""


#: The hidden temporaries a run creates in its run folder (every one starts with a dot, the lock
#: file does not match): what a run that died left there, and only that, is removed by the next
#: run that holds the folder's lock (:func:`remove_leftovers`).
LEFTOVERS = tuple(re.compile(p) for p in (
    # the run's intermediates, fixed names (:mod:`pipeline.run.scene`), and GDAL's sidecar of a raster
    r"\.(probability|layers)\.tif(\.aux\.xml)?",
    # pipeline.io.cog.write_rasters and cog_from_tiff: ``.<name>.<8 hex>.tiles.tif`` and ``.cog.tif``
    # beside each raster (``..probability.tif.<id>.tiles.tif`` for the hidden intermediates)
    r"\..+\.[0-9a-f]{8}\.(tiles|cog)\.tif(\.aux\.xml)?",
    # postprocess.gpkg.write_geopackage: ``.<name>.<random>.tmp.gpkg`` and SQLite's side files
    r"\..+\.tmp\.gpkg(-journal|-wal|-shm)?",
    # fsutil.mkstemp(prefix=".<name>.", suffix=".tmp"): the quicklook (postprocess.quicklook) and
    # report.json (write_json_atomic)
    r"\..+\.tmp",
))


def is_leftover(name: str) -> bool:
    """Whether ``name`` is one of the temporaries a run creates in its run folder (:data:`LEFTOVERS`)."""
    return any(p.fullmatch(name) for p in LEFTOVERS)


def remove_leftovers(run_dir: Path) -> list[str]:
    """Remove the temporaries of dead runs from ``run_dir``; call only while holding its lock
    (:func:`run_folder_lock`): a live run's temporaries are the lock holder's own. Returns the names."""
    removed = []
    for path in sorted(run_dir.iterdir()):
        if is_leftover(path.name) and not path.is_dir():
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not remove %s, left by an interrupted run: %s", path, exc.strerror or exc)
                continue
            removed.append(path.name)
    if removed:
        log.info("removed %d temporary file(s) that an interrupted run left in %s: %s", len(removed), run_dir,
                 ", ".join(removed))
    return removed


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir``'s lock (an exclusive ``flock`` on its :data:`LOCK` file) while the block runs;
    yields whether it is held. Raises :class:`RunFolderBusy` when another run holds it. Where the
    folder or its file system cannot be locked (no ``fcntl``, a read-only folder, no lock support)
    the block runs unlocked, with a warning: it then removes no leftovers."""
    path = run_dir / LOCK
    fd: int | None = None
    try:
        fd = fsutil.acquire_lock(path)
    except fsutil.LockHeld:
        raise RunFolderBusy(
            f"{run_dir}: another run is writing this run folder now (same scene, model and config; it "
            f"holds {path.name}); wait for it to finish, or stop it, then run again"
        ) from None
    except (ImportError, OSError) as exc:
        log.warning("cannot lock %s (%s): concurrent runs of this config are not detected and temporary "
                    "files of interrupted runs are not removed", path,
                    getattr(exc, "strerror", None) or exc)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        fsutil.release_lock(fd, path)


#: GDAL's sidecar files: written beside a file by whoever reads it (the GeoPackage's, with its metadata,
#: as soon as it is opened; a raster's by QGIS's statistics), so no output of a run.
SIDECAR = ".aux.xml"


def output_files(run_dir: Path) -> dict[str, dict[str, int | str]]:
    """Size and SHA-256 of every output file in ``run_dir``: its visible files, but report.json,
    report.html and GDAL's sidecar files (:data:`SIDECAR`)."""
    paths = sorted(p for p in run_dir.iterdir()
                   if not p.name.startswith(".") and p.name not in (REPORT, REPORT_HTML)
                   and not p.name.endswith(SIDECAR) and p.is_file())
    with ThreadPoolExecutor(max(1, min(4, len(paths))), thread_name_prefix="checksums") as pool:
        records = list(pool.map(fsutil.file_record, paths))  # hashlib releases the GIL
    return {p.name: r for p, r in zip(paths, records, strict=True)}


def verify_run(run_dir: Path, gpkg_path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The report of the completed run in ``run_dir`` when every output file it records is there
    with the size and SHA-256 it records, else None and what is wrong (nothing when the folder holds
    no report.json: no run completed there)."""
    path = run_dir / REPORT
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return None, []
    except (OSError, ValueError) as exc:  # ValueError: JSON and decoding errors
        return None, [f"{REPORT} is unreadable ({getattr(exc, 'strerror', None) or exc})"]
    try:
        recorded = report["output_files"]
        int(report["counts"]["polygons"]), float(report["counts"]["total_area_m2"])
        items = [(str(name), int(rec["bytes"]), str(rec["sha256"])) for name, rec in recorded.items()]
        if any(name != Path(name).name or name.startswith(".") for name, _, _ in items):
            raise ValueError("not a file of the run folder")
    except (KeyError, TypeError, ValueError, AttributeError):
        what = "no output checksums (written by an older version)" if isinstance(report, dict) and \
            "output_files" not in report else "unexpected content"
        return None, [f"{REPORT} has {what}"]
    problems = []
    if gpkg_path.name not in recorded:
        problems.append(f"{REPORT} does not record the GeoPackage {gpkg_path.name}")
    t0 = time.perf_counter()
    for name, size, sha256 in items:
        file = run_dir / name
        try:
            actual = file.stat().st_size
            if actual != size:
                problems.append(f"{name} has {actual} bytes, {REPORT} recorded {size}")
            elif fsutil.file_record(file)["sha256"] != sha256:
                problems.append(f"{name} does not have the SHA-256 that {REPORT} recorded (its content changed)")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
        except OSError as exc:
            problems.append(f"{name} cannot be read ({exc.strerror or exc})")
    if problems:
        return None, problems
    log.info("verified %d output file(s) (%.1f MB) against %s in %.2f s", len(items),
             sum(size for _, size, _ in items) / 1e6, REPORT, time.perf_counter() - t0)
    return report, []


def safe_name(text: str) -> str:
    """``text`` as a file name: characters other than letters, digits, ``-_.`` replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120] or "scene"




def scene_dir(output_dir: Path, scene_id: str) -> Path:
    """The folder of a scene's runs in ``output_dir``."""
    return output_dir / safe_name(scene_id)


def run_dir_for(output_dir: Path, scene_id: str, key: str) -> Path:
    """The run folder of the run with fingerprint ``key``."""
    return scene_dir(output_dir, scene_id) / f"run-{key[:12]}"


def geopackage_path(run_dir: Path, scene_id: str) -> Path:
    """The run's GeoPackage."""
    return run_dir / f"{safe_name(scene_id)}_landslides.gpkg"


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder, or raise a clear error (a full disk says so)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fsutil.folder_failure(
            exc, run_dir, f"{run_dir}: cannot create the run folder ({exc.strerror or exc})") from None


def mark_latest(run_dir: Path) -> None:
    """Point the scene folder's ``LATEST`` at ``run_dir`` (atomically)."""
    fsutil.write_atomic(run_dir.parent / LATEST, (run_dir.name + "\n").encode(), prefix=".latest.", suffix="")


def forget_report(run_dir: Path) -> None:
    """Remove the reports of an earlier run: the folder is not complete again until this run's are written."""
    for path in (run_dir / REPORT, run_dir / REPORT_HTML):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"{path}: cannot remove the report of the earlier run ({exc.strerror or exc})") from None
