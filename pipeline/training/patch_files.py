"""Training patch files on disk: finding and pairing images with masks, and the data checksum.

Two layouts are read unchanged:

* Landslide4Sense: ``<root>/TrainData/img/image_N.h5`` with
  ``<root>/TrainData/mask/mask_N.h5`` (and ``ValidData``, ``TestData``), or a
  flat folder ``<root>/img`` + ``<root>/mask``;
* GeoTIFF chip folders: ``<root>/img`` (or ``images``) + ``<root>/mask`` (or
  ``masks``, ``labels``) holding ``*.tif``.

Images and masks are paired by the part of the file name after the prefix
(``image_12.h5`` <-> ``mask_12.h5``, ``chip_a.tif`` <-> ``chip_a.tif``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import InputError

log = logging.getLogger(__name__)

#: Split names accepted for the Landslide4Sense layout and their folders.
SPLIT_DIRS: dict[str, str] = {
    "train": "TrainData",
    "valid": "ValidData",
    "validation": "ValidData",
    "test": "TestData",
}
IMAGE_DIRS = ("img", "image", "images")
MASK_DIRS = ("mask", "masks", "label", "labels")
H5_SUFFIXES = (".h5", ".hdf5")
TIF_SUFFIXES = (".tif", ".tiff")
_PREFIX = re.compile(r"^(image|img|mask|label|labels)[_-]?", re.IGNORECASE)


@dataclass(frozen=True)
class PatchRecord:
    """One patch on disk: an image file and, when labelled, its mask file."""

    id: str
    image: Path
    mask: Path | None = None


def _key(path: Path) -> str:
    return _PREFIX.sub("", path.stem)


def _natural(text: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _first_dir(root: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _patch_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in H5_SUFFIXES + TIF_SUFFIXES]


def _split_folder(root: Path, split: str | None) -> Path:
    """The folder of ``split`` under ``root`` (``TrainData`` of a Landslide4Sense root by default)."""
    if split is not None:
        sub = SPLIT_DIRS.get(split.lower(), split)
        if not (root / sub).is_dir():
            raise InputError(
                f"{root}: split {split!r} expects the folder {root / sub} "
                f"(Landslide4Sense layout: {', '.join(sorted(set(SPLIT_DIRS.values())))})"
            )
        return root / sub
    if _first_dir(root, IMAGE_DIRS) is None and (root / "TrainData").is_dir():
        return root / "TrainData"
    return root


def _masks_by_key(mask_dir: Path | None) -> dict[str, Path]:
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        for p in _patch_files(mask_dir):
            k = _key(p)
            if k in masks:
                raise InputError(f"{mask_dir}: two masks for patch {k!r}: {masks[k].name}, {p.name}")
            masks[k] = p
    return masks


def find_patches(root: Path | str, split: str | None = None, require_masks: bool = False) -> list[PatchRecord]:
    """List the patches under ``root``, sorted naturally by id.

    ``root`` is a Landslide4Sense root (holding ``TrainData``...; ``split``
    picks the folder, default ``train``) or a folder with ``img``/``mask``
    sub-folders. ``split`` may also name a sub-folder directly. With
    ``require_masks`` every image must have a mask.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: patch folder not found")
    folder = _split_folder(root, split)
    img_dir = _first_dir(folder, IMAGE_DIRS)
    if img_dir is None:
        raise InputError(
            f"{folder}: no image folder; expected one of {', '.join(IMAGE_DIRS)} "
            "(Landslide4Sense: TrainData/img/image_N.h5 + TrainData/mask/mask_N.h5)"
        )
    images = _patch_files(img_dir)
    if not images:
        raise InputError(f"{img_dir}: no .h5/.hdf5/.tif/.tiff patch files")
    mask_dir = _first_dir(folder, MASK_DIRS)
    masks = _masks_by_key(mask_dir)
    records: list[PatchRecord] = []
    seen: dict[str, Path] = {}
    for img in images:
        k = _key(img)
        if k in seen:
            raise InputError(f"{img_dir}: two images for patch {k!r}: {seen[k].name}, {img.name}")
        seen[k] = img
        mask = masks.get(k)
        if mask is None and require_masks:
            raise InputError(
                f"{img}: no mask for patch {k!r} in {mask_dir or folder / 'mask'} "
                f"(expected e.g. mask_{k}{img.suffix})"
            )
        if mask is None and masks:
            log.warning("%s: no mask for patch %r", img, k)
        records.append(PatchRecord(id=k, image=img, mask=mask))
    records.sort(key=lambda r: _natural(r.id))
    return records


def data_checksum(records: Iterable[PatchRecord]) -> str:
    """SHA-256 over the contents of every image and mask file, sorted by file name."""
    files: set[Path] = set()
    for r in records:
        files.add(Path(r.image))
        if r.mask is not None:
            files.add(Path(r.mask))
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: (p.name, str(p))):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
