"""A found product as a scene run: its config from the region's template, a zip unpacked for its run.

A zipped SAFE product is unpacked into ``<output>/.products/<region>/`` before
its run and removed after it. Files keep the times stored in the zip, so an
unpacked product always has the same fingerprint and an unchanged product's
run stays up to date. The job records each zip's size and time with the run it
gave (:func:`zip_record`); a later night finds the run still valid from the
record and its outputs' checksums and does not unpack the zip again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.core.config import SceneConfig
from pipeline.core.errors import InputError, OutputError
from pipeline.core.region_config import RegionConfig
from pipeline.run.products import Product

log = logging.getLogger(__name__)

#: unpacked products: ``<output>/.products/<region>/<name>.SAFE``
UNPACK_DIR = ".products"


def product_scene(product: Product, cfg: RegionConfig, template: dict[str, Any], safe: Path | None = None
                  ) -> SceneConfig:
    """The scene config of ``product`` (``safe``: where a zipped product was unpacked) with the
    region's template, area of interest, output and cluster settings."""
    from pipeline.core.template import scene_config

    scene: dict[str, Any] = {"id": product.id}
    if product.kind in ("safe", "safe_zip"):
        scene["safe"] = safe if safe is not None else product.path
    elif product.kind == "bands_dir":
        scene["bands_dir"] = product.path
        if product.level and not (template.get("scene") or {}).get("level"):
            scene["level"] = product.level
    else:  # stac
        scene.update(bands=dict(product.bands), dn_offset=product.dn_offset, quantification=10000.0, nodata=0)
        if product.scl is not None:
            scene["scl"] = product.scl
        if product.level:
            scene["level"] = product.level
    if product.kind != "safe" and product.kind != "safe_zip" and product.sensing is not None:
        scene["acquisition_date"] = product.sensing.date()
    assert cfg.template is not None
    scene_cfg = scene_config(cfg.template, template, scene, cfg.aoi)
    return scene_cfg.model_copy(update={"output": cfg.output, "dask": cfg.dask})


def unpack_dir(cfg: RegionConfig) -> Path:
    from pipeline.run.folder import safe_name

    return cfg.output.dir / UNPACK_DIR / safe_name(cfg.name)


@contextmanager
def unpacked(product: Product, cfg: RegionConfig) -> Iterator[Path | None]:
    """The SAFE folder of a zipped ``product`` unpacked for the duration (None for other products)."""
    if product.kind != "safe_zip":
        yield None
        return
    assert product.path is not None
    target = unpack_safe(product.path, unpack_dir(cfg))
    try:
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def unpack_safe(zip_path: Path, parent: Path) -> Path:
    """Unpack the one ``<name>.SAFE`` folder of ``zip_path`` into ``parent`` (replacing a leftover
    of an interrupted night) and return its path. Members outside that folder, absolute names,
    ``..``, links and a zip larger than the free space are errors naming the zip."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            root = _checked_root(zip_path, members)
            need = sum(m.file_size for m in members)
            parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(parent).free
            if need > free:
                raise OutputError(f"{parent}: no space to unpack {zip_path.name} ({need / 2**30:.2f} GiB unpacked, "
                                  f"{free / 2**30:.2f} GiB free); free space there or unpack the product first")
            target = parent / root
            tmp = parent / f".{root}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                for m in members:
                    _extract(zf, m, tmp)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp / root, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{zip_path}: not a readable zip file ({exc})") from None
    except OSError as exc:
        if isinstance(exc, (InputError, OutputError)):
            raise
        from pipeline.core.fsutil import write_failure

        raise write_failure(parent / zip_path.name, exc.strerror or str(exc), exc, what="cannot unpack") from None
    log.info("unpacked %s into %s", zip_path.name, parent)
    return target


def _checked_root(zip_path: Path, members: list[zipfile.ZipInfo]) -> str:
    roots = set()
    for m in members:
        name = PurePosixPath(m.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in m.filename:
            raise InputError(f"{zip_path}: member {m.filename!r} would be written outside the product folder")
        if stat.S_ISLNK(m.external_attr >> 16):
            raise InputError(f"{zip_path}: member {m.filename!r} is a link; links are not unpacked")
        roots.add(name.parts[0])
    if len(roots) != 1 or not next(iter(roots)).upper().endswith(".SAFE"):
        raise InputError(f"{zip_path}: expected one <name>.SAFE folder in the zip, found {sorted(roots)[:5]}")
    return next(iter(roots))


def _extract(zf: zipfile.ZipFile, member: zipfile.ZipInfo, into: Path) -> None:
    """Write one member under ``into`` with the time the zip stores for it."""
    dest = into.joinpath(*PurePosixPath(member.filename).parts)
    if member.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 4 * 2**20)
    stamp = time.mktime((*member.date_time, 0, 0, -1))
    os.utime(dest, (stamp, stamp))


# -- the record that lets a night leave an unchanged zip packed ---------------------------------
def zip_key(product: Product, scene_cfg: SceneConfig, model_sha256: list[str]) -> str:
    """What a zipped product's run depends on: the zip (size, time), the settings and the models."""
    from pipeline import __version__
    from pipeline.run.fingerprint import result_config

    assert product.path is not None
    st = product.path.stat()
    config = result_config(scene_cfg)
    config["scene"].pop("safe", None)
    payload = {"zip": [str(product.path.resolve()), st.st_size, st.st_mtime_ns], "config": config,
               "models": model_sha256, "version": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def model_checksums(scene_cfg: SceneConfig, cache: dict[Path, str]) -> list[str]:
    """The SHA-256 of the scene's model files (cached per path for the job)."""
    from pipeline.core.fsutil import file_digest

    out = []
    for p in scene_cfg.model.paths:
        if p not in cache:
            cache[p] = file_digest(p)
        out.append(cache[p])
    return out


def zip_record(record: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    """The recorded run of a zip when its key matches and its outputs are still what the run wrote."""
    from pipeline.run.folder import verify_run

    if not record or record.get("zip_key") != key or not record.get("geopackage"):
        return None
    gpkg = Path(str(record["geopackage"]))
    report, problems = verify_run(gpkg.parent, gpkg)
    if report is None:
        if problems:
            log.warning("%s: %s; the product is run again", gpkg.parent, "; ".join(problems))
        return None
    return record
