"""A small per-band scene for tests of inputs and errors: B02, B03, B04 and a DEM in EPSG:32633."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import yaml
from affine import Affine

X0, Y0 = 465180.0, 5080260.0


def write_raster(path: Path, data: np.ndarray, transform: Affine | None = None, *,
                 crs: str | None = "EPSG:32633", **profile: object) -> Path:
    """One-band GeoTIFF of ``data`` (10 m pixels from (X0, Y0) unless ``transform`` is given)."""
    opts: dict[str, object] = {"driver": "GTiff", "width": data.shape[1], "height": data.shape[0], "count": 1,
                               "dtype": data.dtype.name, "transform": transform or Affine(10, 0, X0, 0, -10, Y0)}
    if crs is not None:
        opts["crs"] = crs
    opts.update(profile)
    with rasterio.open(path, "w", **opts) as ds:
        ds.write(data, 1)
    return path


def write_scene(root: Path, size: int = 64, **band_profile: object) -> Path:
    """``root/bands/T33TVM_B0{2,3,4}.tif`` (``size`` px, random DN) and ``root/dem.tif`` (a 5 px margin)."""
    rng = np.random.default_rng(0)
    (root / "bands").mkdir()
    for band in ("B02", "B03", "B04"):
        dn = rng.integers(300, 3000, (size, size)).astype(np.uint16)
        write_raster(root / "bands" / f"T33TVM_{band}.tif", dn, **band_profile)
    dem = 500 + np.add.outer(np.arange(size + 10.0), np.arange(size + 10.0)).astype(np.float32)
    write_raster(root / "dem.tif", dem, Affine(10, 0, X0 - 50, 0, -10, Y0 + 50))
    return root


def scene_yaml(root: Path, **sections: object) -> Path:
    """``root/scene.yaml`` for :func:`write_scene`'s files, with ``sections`` replacing the defaults."""
    data: dict[str, object] = {"scene": {"bands_dir": "bands"}, "dem": {"path": "dem.tif"},
                               "channels": ["B02", "B03", "B04", "SLOPE", "DEM"],
                               "grid": {"block_size": 256}, "output": {"dir": "out"}}
    data.update(sections)
    path = root / "scene.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
