"""Run fingerprints: what makes two runs "the same".

A run is identified by its inputs (file paths, sizes and modification times:
hashing gigabytes of JP2 every night costs more than it protects), the model
artefacts (sha256 of their bytes), the configuration that affects results and
the package version. The same fingerprint means the outputs already exist and
a rerun does nothing; a different one writes a new version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pipeline import __version__
from pipeline.core.config import SceneConfig
from pipeline.core.errors import InputError


def input_files(cfg: SceneConfig) -> list[Path]:
    """Every file the scene config reads (SAFE directories expanded)."""
    files: list[Path] = []
    sc = cfg.scene
    if sc.safe is not None:
        files += sorted(p for p in sc.safe.rglob("*") if p.is_file() and p.suffix.lower() in {".jp2", ".xml", ".tif", ".tiff"})
    if sc.bands_dir is not None:
        if not sc.bands_dir.is_dir():
            where = f"{cfg.source}: " if cfg.source else ""
            raise InputError(f"{where}scene.bands_dir: folder not found: {sc.bands_dir}")
        files += sorted(p for p in sc.bands_dir.iterdir() if p.is_file())
    if sc.bands is not None:
        files += [sc.bands[k] for k in sorted(sc.bands)]
    for extra in (sc.scl, cfg.dem.path, cfg.dem.slope, cfg.aoi.path if cfg.aoi else None):
        if extra is not None:
            files.append(extra)
    return files


def _file_stamp(path: Path) -> list[object]:
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def result_config(cfg: SceneConfig) -> dict[str, object]:
    """The part of the config that changes results (not where or how it runs)."""
    data = cfg.model_dump(mode="json", exclude={"dask": True, "source": True})
    data["output"].pop("dir", None)
    data["model"].pop("device", None)
    data["model"].pop("batch_size", None)
    data["model"].pop("path", None)  # the artefacts enter by checksum
    return data


def run_fingerprint(cfg: SceneConfig, model_sha256: Iterable[str]) -> str:
    """sha256 over inputs, models, result-affecting config and version."""
    payload = {
        "inputs": [_file_stamp(p) for p in input_files(cfg)],
        "models": list(model_sha256),
        "config": result_config(cfg),
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
