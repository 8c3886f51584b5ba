"""Benchmark: stack a synthetic full-size Sentinel-2 scene to 14 channels.

Builds (streaming, strip by strip) a 10980 x 10980 px tile: 13 bands as tiled
GeoTIFFs at their native 10/20/60 m in EPSG:32633 and a ~30 m DEM in
EPSG:4326 (1 arc-second) with a void. Then stacks it to the Landslide4Sense
channels with :func:`pipeline.stack.layers.stack_scene` and consumes the stack block
by block: per-channel means over valid pixels, or (``--cog``) the stack COG.
Reports wall time and peak resident memory of the process and its children.

    python benchmarks/bench_stack.py                 # full size (a few minutes)
    python benchmarks/bench_stack.py --small         # 2048 px, seconds
    python benchmarks/bench_stack.py --size 4096 --cog --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import dask
import numpy as np
import psutil
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.channels import L4S_CHANNELS, S2_BANDS  # noqa: E402
from pipeline.core.config import SceneConfig  # noqa: E402
from pipeline.stack.layers import save_stack, stack_scene  # noqa: E402

X0, Y0 = 399960.0, 5100000.0   # origin of a Sentinel-2 tile in UTM 33N
CRS = "EPSG:32633"
STRIP = 512
FULL_STACK_GB = 14 * 10980 * 10980 * 4 / 1e9


class PeakMemory:
    """Samples the resident memory of a process (this one by default) and its children in a thread."""

    def __init__(self, interval: float = 0.05, pid: int | None = None) -> None:
        self.interval = interval
        self.peak = 0
        self.main_peak = 0  # the process itself
        self.child_peaks: dict[int, int] = {}  # each child process (Dask nanny, workers), by pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process(pid)  # another process tree: that process and its children

    def _rss_or_zero(self) -> int:
        try:
            return self._rss()
        except psutil.Error:  # the process has ended
            return 0

    def _rss(self) -> int:
        main = self._proc.memory_info().rss
        self.main_peak = max(self.main_peak, main)
        total = main
        for child in self._proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                rss = child.memory_info().rss
                total += rss
                self.child_peaks[child.pid] = max(self.child_peaks.get(child.pid, 0), rss)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss_or_zero())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = self._rss_or_zero()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss_or_zero())


def _field(rows: np.ndarray, cols: np.ndarray, band_no: int, rng: np.random.Generator,
           corner: float) -> np.ndarray:
    """Smooth landscape-like reflectance plus noise, in DN (reflectance x 10000 + 1000).

    Pixels with ``row + col < corner`` (10 m pixel units) are no data, like the
    corner of a tile outside the satellite's swath.
    """
    r, c = np.meshgrid(rows, cols, indexing="ij")
    refl = (0.12 + 0.04 * band_no / 13 + 0.06 * np.sin(r / 700.0 + band_no) * np.cos(c / 900.0)
            + 0.02 * np.sin((r + c) / 97.0))
    refl += rng.normal(0, 0.01, refl.shape)
    dn = np.clip(refl * 10000 + 1000, 1, 65535).astype(np.uint16)
    dn[(r + c) < corner] = 0
    return dn


def write_band(path: Path, size_10m: int, res: int, band_no: int) -> None:
    """One band at its native resolution, written strip by strip (never the whole band)."""
    n = size_10m * 10 // res
    profile = {"driver": "GTiff", "width": n, "height": n, "count": 1, "dtype": "uint16", "crs": CRS,
               "transform": Affine(res, 0, X0, 0, -res, Y0), "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "ZSTD", "zstd_level": 1, "predictor": 2, "nodata": 0}
    rng = np.random.default_rng(band_no)
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, n, STRIP):
            h = min(STRIP, n - r0)
            # pattern coordinates in 10 m pixels so all bands show the same landscape
            rows = (np.arange(r0, r0 + h) + 0.5) * res / 10
            cols = (np.arange(n) + 0.5) * res / 10
            dst.write(_field(rows, cols, band_no, rng, 0.3 * size_10m), 1, window=Window(0, r0, n, h))


def write_dem(path: Path, size_10m: int) -> None:
    """A 1 arc-second int16 DEM in EPSG:4326 covering the tile, with a void, strip by strip."""
    bounds = (X0, Y0 - size_10m * 10, X0 + size_10m * 10, Y0)
    w, s, e, n = transform_bounds(CRS, "EPSG:4326", *bounds)
    res = 1 / 3600
    left, top = w - 0.02, n + 0.02
    cols, rows = int((e - w + 0.04) / res), int((n - s + 0.04) / res)
    profile = {"driver": "GTiff", "width": cols, "height": rows, "count": 1, "dtype": "int16",
               "crs": "EPSG:4326", "transform": Affine(res, 0, left, 0, -res, top), "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "DEFLATE", "nodata": -32768}
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, rows, STRIP):
            h = min(STRIP, rows - r0)
            r, c = np.meshgrid(np.arange(r0, r0 + h), np.arange(cols), indexing="ij")
            z = 800 + 600 * np.sin(r / 150.0) * np.cos(c / 190.0) + 40 * np.sin((r * 3 + c) / 23.0)
            z[(abs(r - rows // 2) < 15) & (abs(c - cols // 2) < 15)] = -32768
            dst.write(z.astype(np.int16), 1, window=Window(0, r0, cols, h))


def build_inputs(root: Path, size: int) -> dict[str, object]:
    """Write the scene into ``root`` unless a scene of this size is already there."""
    bands = root / "bands"
    marker = root / f"complete_{size}"
    if not marker.exists():
        shutil.rmtree(bands, ignore_errors=True)
        bands.mkdir(parents=True)
        for i, (band, res) in enumerate(S2_BANDS.items()):
            write_band(bands / f"T33TVM_20230801T100031_{band}.tif", size, res, i)
        write_dem(root / "dem_4326.tif", size)
        marker.touch()
    return {"scene": {"bands_dir": str(bands), "id": "bench", "dn_offset": -1000},
            "dem": {"path": str(root / "dem_4326.tif")}}


def _block_sums(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(channel, [sum, count]) over the valid pixels of one block."""
    out = np.zeros((data.shape[0], 2))
    for i, band in enumerate(data):
        values = band[valid]
        out[i] = (values.sum(dtype=np.float64), values.size)
    return out


def run_once(cfg: SceneConfig, out: Path | None) -> dict[str, object]:
    t0 = time.perf_counter()
    stack = stack_scene(cfg, L4S_CHANNELS)
    if out is not None:
        save_stack(stack, out)
        summary: dict[str, object] = {"cog_bytes": out.stat().st_size}
    else:
        # a streaming consumer: per-block sums over valid pixels, one block at a time
        # (optimize_graph=False keeps data and valid on shared keys: each block is read once)
        blocks = zip(stack.data.data.to_delayed(optimize_graph=False).ravel(),
                     stack.valid.data.to_delayed(optimize_graph=False).ravel(), strict=True)
        parts = dask.compute(*[dask.delayed(_block_sums)(d, v) for d, v in blocks])
        sums = np.sum(parts, axis=0)
        n_valid = float(sums[0, 1])
        summary = {"valid_fraction": round(n_valid / (stack.grid.width * stack.grid.height), 4),
                   "channel_means": {c: round(float(s / n_valid), 4)
                                     for c, s in zip(L4S_CHANNELS, sums[:, 0], strict=True)}}
    summary["seconds"] = time.perf_counter() - t0
    summary["grid"] = f"{stack.grid.width} x {stack.grid.height} {stack.grid.crs.to_string()}"
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10980, help="tile edge in 10 m pixels (multiple of 6)")
    parser.add_argument("--small", action="store_true", help="quick run: --size 2046")
    parser.add_argument("--block", type=int, default=2048, help="grid.block_size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="dask threads")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median is reported")
    parser.add_argument("--cog", action="store_true", help="write the stack COG instead of a reduction")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the inputs here and reuse them on the next run (default: a temp dir)")
    args = parser.parse_args(argv)
    size = 2046 if args.small else args.size
    size -= size % 6

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_stack_"))
    try:
        t0 = time.perf_counter()
        with PeakMemory() as gen_mem:
            scene = build_inputs(root, size)
        gen_s = time.perf_counter() - t0
        cfg = SceneConfig.model_validate({**scene, "grid": {"block_size": args.block}})
        dask.config.set(scheduler="threads", num_workers=args.threads)
        runs = []
        with PeakMemory() as mem:
            for i in range(args.repeat):
                runs.append(run_once(cfg, root / f"stack_{i}.tif" if args.cog else None))
                if args.cog:
                    (root / f"stack_{i}.tif").unlink()
        secs = [r["seconds"] for r in runs]
        full_gb = 14 * size * size * 4 / 1e9
        result = {
            "size": size, "block": args.block, "threads": args.threads, "consumer": "cog" if args.cog else "reduction",
            "inputs_seconds": round(gen_s, 1), "inputs_peak_rss_gb": round(gen_mem.peak / 1e9, 3),
            "stack_seconds_median": round(statistics.median(secs), 1),
            "stack_seconds_all": [round(s, 1) for s in secs],
            "stack_peak_rss_gb": round(mem.peak / 1e9, 3),
            "process_max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
            "full_stack_gb": round(full_gb, 2),
            "peak_vs_full_stack": round(mem.peak / 1e9 / full_gb, 3),
            **{k: v for k, v in runs[-1].items() if k != "seconds"},
        }
        print(json.dumps(result, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
