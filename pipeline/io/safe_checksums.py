"""Checksums of SAFE product files: the files a run reads checked against ``manifest.safe``.

SAFE products list the MD5 checksums of their files in ``manifest.safe``. The
files a run reads are checked against them before any pixel is read, because a
flipped bit inside a JPEG 2000 codestream decodes to wrong pixels without any
error, and the file checks of :func:`pipeline.io.raster_source.open_raster`
cannot see it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import fsutil
from pipeline.core.errors import InputError
from pipeline.io.gdal import error_detail
from pipeline.io.xmlutil import local_name

log = logging.getLogger(__name__)

#: ``checksumName`` values of ``manifest.safe`` -> :mod:`hashlib` algorithm. Sentinel-2 products
#: list MD5.
MANIFEST_HASHES: dict[str, str] = {"MD5": "md5", "SHA1": "sha1", "SHA-1": "sha1", "SHA256": "sha256",
                                   "SHA-256": "sha256", "SHA3-256": "sha3_256", "SHA3_256": "sha3_256"}


@dataclass(frozen=True)
class ListedChecksum:
    """One file's entry in ``manifest.safe``: ``<byteStream size=...>`` with its
    ``<checksum checksumName="MD5">`` (``value`` in lower-case hex)."""

    algorithm: str        # as the manifest names it, upper case: "MD5"
    value: str
    size: int | None = None


@dataclass(frozen=True)
class ChecksumCheck:
    """What checking a scene's files against its ``manifest.safe`` found.

    ``verified``: every file checked (:meth:`pipeline.io.sentinel2.SceneInputs.files_read`) had a
    listed checksum and matched it (a mismatch raises instead). ``files``: how many were verified,
    ``bytes`` their size, ``hashed`` how many of them were hashed now (the others were verified
    earlier in this process and have not changed), ``seconds`` the time it took. ``unlisted``:
    files read without a listed checksum. ``reason``: why nothing (or not everything) was verified.
    """

    verified: bool
    files: int = 0
    bytes: int = 0
    hashed: int = 0
    seconds: float = 0.0
    algorithms: tuple[str, ...] = ()
    unlisted: tuple[str, ...] = ()
    reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary (for a run report)."""
        return {"verified": self.verified, "files": self.files, "bytes": self.bytes, "hashed": self.hashed,
                "seconds": round(self.seconds, 3), "algorithms": list(self.algorithms),
                "unlisted": list(self.unlisted), "reason": self.reason}


def _manifest_key(relative: str) -> str:
    """A path relative to the product root as the manifest's ``href`` gives it (``./GRANULE/...``),
    normalised for comparison."""
    text = relative.strip().replace("\\", "/")
    return os.path.normpath(text).replace(os.sep, "/").lstrip("/")


def parse_manifest_checksums(manifest: Path) -> dict[str, ListedChecksum]:
    """The checksums ``manifest.safe`` lists: path relative to the product root (normalised, ``/``)
    -> :class:`ListedChecksum`. Entries without a checksum are left out. Raises
    :class:`InputError` when the file cannot be parsed."""
    try:
        root = ET.parse(manifest).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(
            f"{manifest}: cannot parse the product's manifest ({error_detail(exc)}); it lists the checksums "
            "of the band files: download the product again, or set scene.verify_checksums: false to skip "
            "the check"
        ) from None
    listed: dict[str, ListedChecksum] = {}
    for stream in root.iter():
        if local_name(stream.tag) != "byteStream":
            continue
        href = checksum = None
        for child in stream:
            tag = local_name(child.tag)
            if tag == "fileLocation" and child.get("href"):
                href = child.get("href")
            elif tag == "checksum" and child.text and child.text.strip():
                checksum = (str(child.get("checksumName") or "MD5").strip().upper(), child.text.strip().lower())
        if href is None or checksum is None:
            continue
        size_text = stream.get("size")
        try:
            size = int(size_text) if size_text is not None else None
        except ValueError:
            size = None
        listed[_manifest_key(href)] = ListedChecksum(checksum[0], checksum[1], size)
    return listed


#: Files verified in this process: (real path, size, mtime_ns, inode, algorithm, value). A run
#: stacks a scene more than once (the model stack, the attribute layers, the quicklook): each
#: file is hashed once, and again only when it changed.
_VERIFIED: set[tuple[object, ...]] = set()
_VERIFIED_LOCK = threading.Lock()

#: A file to verify: (path, role, its manifest entry).
_Item = tuple[Path, str, ListedChecksum]
#: A file whose size matches: (path, role, its manifest entry, :func:`_stamp` of the file).
_Stamped = tuple[Path, str, ListedChecksum, tuple[object, ...]]


def _stamp(path: Path, listed: ListedChecksum) -> tuple[object, ...]:
    st = path.stat()
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, listed.algorithm, listed.value)


def _inside(root: str, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in the folder ``root`` (absolute and normalised)."""
    return os.path.commonpath([root, os.path.normpath(os.path.abspath(path))]) == root


def verify_manifest_checksums(manifest: Path, safe: Path, files: Sequence[tuple[Path, str]], *,
                              threads: int | None = None) -> ChecksumCheck:
    """Check ``files`` ((path, role) inside the SAFE product ``safe``) against the checksums and
    sizes ``manifest`` lists. Raises :class:`InputError` naming each file that differs, with the
    computed and the listed value; returns what was verified. Files outside the product (an SCL
    given in the config) are not listed in its manifest and are skipped."""
    t0 = time.perf_counter()
    listed = parse_manifest_checksums(manifest)
    root = os.path.normpath(os.path.abspath(safe))
    todo, unlisted = _entries(manifest, safe, listed, files)
    problems, size_ok, total = _check_sizes(manifest, todo)
    with _VERIFIED_LOCK:
        pending = [item for item in size_ok if item[3] not in _VERIFIED]
    problems += _check_digests(manifest, pending, threads)
    if problems:
        raise InputError(
            "corrupt input: " + "; ".join(problems)
            + ". The file was damaged after the product was made (download, copy or disk): download the "
            "product again (set scene.verify_checksums: false to skip the check)"
        )
    seconds = time.perf_counter() - t0
    inside_unlisted = [u for u in unlisted if _inside(root, u)]
    if inside_unlisted and listed:
        log.warning("%s lists no checksum for %s: not verified", manifest, ", ".join(Path(u).name for u in inside_unlisted))
    elif not listed:
        log.info("%s lists no checksums: the band files are not verified", manifest)
    if todo:
        log.info("checksums of %d file(s) (%.0f MB) verified against %s in %.2f s (%d hashed)", len(todo),
                 total / 1e6, manifest.name, seconds, len(pending))
    reason = None
    if inside_unlisted:
        reason = f"{manifest.name} lists no checksum for {len(inside_unlisted)} file(s) read"
    elif not todo:
        reason = "no file read is listed in manifest.safe"
    return ChecksumCheck(
        verified=bool(todo) and not inside_unlisted,
        files=len(todo), bytes=total, hashed=len(pending), seconds=seconds,
        algorithms=tuple(sorted({e.algorithm for _, _, e in todo})), unlisted=tuple(unlisted), reason=reason,
    )


def _entries(manifest: Path, safe: Path, listed: dict[str, ListedChecksum],
             files: Sequence[tuple[Path, str]]) -> tuple[list[_Item], list[str]]:
    """The files with a checksum to verify, and those without one (outside the product, not
    listed, or listed with an algorithm this module does not know: a warning)."""
    root = os.path.normpath(os.path.abspath(safe))
    todo: list[_Item] = []
    unlisted: list[str] = []
    unknown: list[str] = []
    for path, role in dict.fromkeys(files):
        full = os.path.normpath(os.path.abspath(path))
        if not _inside(root, full):
            log.debug("%s: outside the product %s, no checksum to verify", path, safe)
            unlisted.append(str(path))
            continue
        entry = listed.get(_manifest_key(os.path.relpath(full, root)))
        if entry is None:
            unlisted.append(str(path))
        elif entry.algorithm not in MANIFEST_HASHES:
            unlisted.append(str(path))
            unknown.append(f"{path.name} ({entry.algorithm})")
        else:
            todo.append((path, role, entry))
    if unknown:
        log.warning("%s: checksum algorithm(s) not supported, files not verified: %s", manifest, ", ".join(unknown))
    return todo, unlisted


def _check_sizes(manifest: Path, todo: list[_Item]) -> tuple[list[str], list[_Stamped], int]:
    """Sizes of ``todo`` against the listed ones: the problems, the files whose size matches (with
    their stamp) and the total size."""
    problems: list[str] = []
    size_ok: list[_Stamped] = []
    total = 0
    for path, role, entry in todo:
        try:
            stamp = _stamp(path, entry)
        except OSError as exc:
            raise InputError(f"{path}: {role} cannot be read ({error_detail(exc)})") from None
        size = int(stamp[1])  # type: ignore[call-overload]
        total += size
        if entry.size is not None and size != entry.size:
            problems.append(f"{path}: {role} is {size} bytes but {manifest.name} lists {entry.size} bytes "
                            f"({entry.algorithm} {entry.value})")
        else:
            size_ok.append((path, role, entry, stamp))
    return problems, size_ok, total


def _digest(item: _Stamped) -> str:
    return fsutil.file_digest(item[0], MANIFEST_HASHES[item[2].algorithm])


def _check_digests(manifest: Path, pending: list[_Stamped], threads: int | None) -> list[str]:
    """Hash ``pending`` in ``threads`` threads (default: up to 4, the CPU count) and compare with
    the listed values: the mismatches. Files that match are remembered as verified."""
    if not pending:
        return []
    workers = max(1, min(len(pending), threads or min(4, os.cpu_count() or 1)))
    try:
        if workers == 1:
            digests = [_digest(item) for item in pending]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="checksum") as pool:
                digests = list(pool.map(_digest, pending))
    except OSError as exc:
        raise InputError(f"{manifest.parent}: cannot read a file to verify its checksum ({error_detail(exc)})") from None
    problems: list[str] = []
    for (path, role, entry, stamp), actual in zip(pending, digests, strict=True):
        if actual != entry.value:
            problems.append(
                f"{path}: {role} does not match its checksum in {manifest}: {entry.algorithm} {actual} "
                f"computed, {entry.value} listed"
            )
        else:
            with _VERIFIED_LOCK:
                _VERIFIED.add(stamp)
    return problems
