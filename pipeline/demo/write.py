"""Write the demo directory: the Sentinel-2 product, the DEM, the truth and ``scene.yaml``."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import ConfigError, OutputError
from pipeline.demo.dem import write_dem
from pipeline.demo.product_layers import scene_layers, scene_summary
from pipeline.demo.safe_writer import write_safe
from pipeline.demo.scene import make_scene
from pipeline.demo.sentinel2 import Product, parse_baseline
from pipeline.demo.truth import write_truth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPaths:
    """What :func:`write_demo_data` wrote."""

    safe: Path
    dem: Path
    scene_yaml: Path
    truth_mask: Path
    truth_scars: Path


def _scene_yaml(safe_name: str) -> str:
    return (
        "# Demo scene written by `python -m pipeline demo-data`; paths are relative to this file.\n"
        "scene:\n"
        f"  safe: {safe_name}\n"
        "dem:\n"
        "  path: dem.tif\n"
        "output:\n"
        "  dir: output\n"
        "reference:                # the painted scars: the run prints object recall and precision\n"
        "  path: truth_scars.gpkg\n"
        "  iou: 0.1\n"
    )


def write_demo_data(
    out_dir: Path,
    *,
    size: int = 1020,
    seed: int = 0,
    product: Product = "L2A",
    baseline: str = "05.10",
    force: bool = False,
) -> DemoPaths:
    """Write the demo product, DEM, truth and ``scene.yaml`` into ``out_dir``.

    ``size`` is the scene side in 10 m pixels (a multiple of 6). The directory
    is assembled beside ``out_dir`` and renamed into place at the end; an
    existing non-empty ``out_dir`` is refused unless ``force``.
    """
    if product not in ("L2A", "L1C"):
        raise ConfigError(f"demo product {product!r}: expected 'L2A' or 'L1C'")
    parse_baseline(baseline)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputError(f"{out_dir}: directory is not empty; choose another directory or pass --force to replace it")
    scene = make_scene(size, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        safe = write_safe(
            tmp, scene_layers(scene, product, baseline), product=product, baseline=baseline,
            summary=scene_summary(scene),
        )
        write_dem(scene, tmp / "dem.tif", np.random.default_rng([seed, 2]))
        write_truth(scene, tmp / "truth_mask.tif", tmp / "truth_scars.gpkg")
        (tmp / "scene.yaml").write_text(_scene_yaml(safe.name), encoding="utf-8")
        os.chmod(tmp, 0o755)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote demo %s (%d scars) to %s", product, len(scene.scars), out_dir)
    return DemoPaths(
        safe=out_dir / safe.name,
        dem=out_dir / "dem.tif",
        scene_yaml=out_dir / "scene.yaml",
        truth_mask=out_dir / "truth_mask.tif",
        truth_scars=out_dir / "truth_scars.gpkg",
    )


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing an existing directory only after success."""
    old: Path | None = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    try:
        os.replace(tmp, out_dir)
    except OSError as exc:
        if old is not None:
            os.replace(old, out_dir)
        raise OutputError(f"{out_dir}: cannot move the demo data into place: {exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
