"""Inference benchmark: stage throughput vs the raw model, peak memory, CPU precision.

Three measurements, all printed as medians:

1. Throughput: windows per second of the whole inference stage
   (:func:`pipeline.inference.tiled.predict` computed with the Dask threaded
   scheduler: slicing, normalization, batching, forward pass, blending) on a
   synthetic scene at overlap 0, against the raw forward pass of the same
   model (same memory format, batch size and total threads) on random
   batches of the same count, measured alternately in one run.
2. Peak memory (max RSS of a fresh process) of the stage on a
   10980 x 10980 x 14 scene generated lazily block by block, with the
   probability raster written as a COG. A tiny PlainUnet is used here to keep
   the run short: memory depends on the block size, not on the network.
3. CPU precision: float32 vs float32 + channels_last vs bfloat16 autocast
   (with and without channels_last): speed of one batch and agreement of the
   probabilities and masks (at the model's threshold) with float32, on
   Landslide4Sense patches when ../shared/data is present.

The model is the shipped trained artefact (``--artefact``, default
pipeline/models/default.safetensors) or, when absent, an untrained
``--model`` (default Unet:mobilenet_v2).

Usage::

    python benchmarks/bench_inference.py            # full (slow on 2 cores)
    python benchmarks/bench_inference.py --quick    # small scene, one repeat
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.channels import L4S_CHANNELS  # noqa: E402
from pipeline.core.grid import Grid  # noqa: E402
from pipeline.inference.options import InferenceOptions  # noqa: E402
from pipeline.inference.runtime import clear_model_cache  # noqa: E402
from pipeline.inference.tiled import predict  # noqa: E402
from pipeline.model.artefact import ModelArtefact, load_artefact  # noqa: E402
from pipeline.model.device import use_channels_last  # noqa: E402
from pipeline.model.normalization import band_stats, fixed_spec, normalize  # noqa: E402
from pipeline.model.registry import build_model  # noqa: E402
from tiling.windows import WindowGrid  # noqa: E402

TILE = 128
CHANNELS = list(L4S_CHANNELS)
SHARED = ROOT.parent / "shared" / "data"


def _grid(n: int) -> Grid:
    return Grid(CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), n, n)


def _artefact(arch: str, encoder: str | None, **kwargs: object) -> ModelArtefact:
    torch.manual_seed(0)
    module = build_model(arch, encoder, len(CHANNELS), **kwargs).eval()
    return ModelArtefact(arch, encoder, CHANNELS, tile_size=TILE, module=module, arch_kwargs=dict(kwargs))


def _bench_model(args: argparse.Namespace) -> tuple[ModelArtefact, str]:
    """The artefact given with --artefact (default: the shipped model), else an untrained --model."""
    if args.artefact and Path(args.artefact).is_file():
        art = load_artefact(args.artefact)
        return art, f"{art.architecture}/{art.encoder} '{art.name}' (trained, {args.artefact})"
    arch, _, enc = args.model.partition(":")
    return _artefact(arch, enc or None), f"{args.model} (untrained)"


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- 1. throughput ---------------------------------------------------------------
def bench_throughput(args: argparse.Namespace) -> dict[str, object]:
    art, model_name = _bench_model(args)
    module = art.module
    assert module is not None
    bands = list(art.channels)
    n = args.size
    rng = np.random.default_rng(0)
    scene = rng.random((len(bands), n, n), dtype=np.float32)
    data = xr.DataArray(da.from_array(scene, chunks=(-1, 2048, 2048)), dims=("band", "y", "x"),
                        coords={"band": bands})
    valid = xr.DataArray(da.ones((n, n), bool, chunks=2048), dims=("y", "x"))
    grid = _grid(n)
    n_windows = len(WindowGrid(n, n, TILE, 0))
    batch = args.batch
    n_batches = -(-n_windows // batch)
    x = torch.randn(batch, len(bands), TILE, TILE)
    # the raw pass uses the memory format the stage's device policy picks
    channels_last = use_channels_last(torch.device("cpu"), "fp32")
    if channels_last:
        module = copy.deepcopy(module).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def raw_single() -> None:
        with torch.inference_mode():
            for _ in range(n_batches):
                torch.sigmoid(module(x))

    def raw_parallel() -> None:  # two Python threads, one torch thread each
        import threading

        def work(k: int) -> None:
            with torch.inference_mode():
                for _ in range(k):
                    torch.sigmoid(module(x))

        threads = [threading.Thread(target=work, args=(k,))
                   for k in (n_batches // 2, n_batches - n_batches // 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def stage(workers: int) -> None:
        opts = InferenceOptions(device="cpu", precision="fp32", batch_size=batch, overlap=0, block_size=2048)
        pred = predict(data, valid, grid, [art], opts)
        with dask.config.set(scheduler="threads", num_workers=workers):
            out = pred.probability.data.compute()
        assert np.isfinite(out).all()

    configs: dict[str, tuple[int, Callable[[], None]]] = {
        "raw 1x2 (1 stream, 2 torch threads)": (args.threads, raw_single),
        "raw 2x1 (2 streams, 1 torch thread each)": (1, raw_parallel),
        "stage 1x2 (1 dask thread, 2 torch threads)": (args.threads, lambda: stage(1)),
        "stage 2x1 (2 dask threads, 1 torch thread each)": (1, lambda: stage(2)),
    }
    # warm-up per thread setting (thread pools, allocators, oneDNN kernels)
    for threads in sorted({t for t, _ in configs.values()}):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            module(x)
            module(x)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(args.repeats):
        for name, (threads, fn) in configs.items():
            torch.set_num_threads(threads)
            clear_model_cache()
            times[name].append(_timed(fn))
            print(f"  rep {rep + 1}: {name}: {n_windows / times[name][-1]:.1f} windows/s", flush=True)
    torch.set_num_threads(args.threads)
    rates = {k: n_windows / statistics.median(v) for k, v in times.items()}
    best_raw = max(v for k, v in rates.items() if k.startswith("raw"))
    best_stage = max(v for k, v in rates.items() if k.startswith("stage"))
    pairs: dict[str, float] = {}  # median over repeats of raw time / stage time (same repeat)
    for cfg in ("1x2", "2x1"):
        raw_t = next(v for k, v in times.items() if k.startswith(f"raw {cfg}"))
        stage_t = next(v for k, v in times.items() if k.startswith(f"stage {cfg}"))
        pairs[cfg] = round(statistics.median(r / s for r, s in zip(raw_t, stage_t, strict=True)), 3)
    return {
        "model": model_name, "scene": f"{n}x{n}x{len(bands)}", "windows": n_windows, "batch": batch,
        "channels_last": channels_last, "repeats": args.repeats,
        "windows_per_s": {k: round(v, 2) for k, v in rates.items()},
        "stage_vs_raw_paired_median": pairs,
        "stage_vs_raw_best": round(best_stage / best_raw, 3),
        "stage_vs_raw_same_config": {
            "1x2": round(rates["stage 1x2 (1 dask thread, 2 torch threads)"]
                         / rates["raw 1x2 (1 stream, 2 torch threads)"], 3),
            "2x1": round(rates["stage 2x1 (2 dask threads, 1 torch thread each)"]
                         / rates["raw 2x1 (2 streams, 1 torch thread each)"], 3),
        },
    }


# -- 2. memory -------------------------------------------------------------------
def run_memory(args: argparse.Namespace) -> dict[str, object]:
    """Runs in a fresh process (see bench_memory): the stage on a lazily generated scene, written as a COG."""
    from pipeline.io.cog import write_cog

    n = args.mem_size
    torch.set_num_threads(1)
    art = _artefact("PlainUnet", None, base_channels=4, depth=2)
    data = xr.DataArray(
        da.random.default_rng(0).random((len(CHANNELS), n, n), chunks=(len(CHANNELS), 2048, 2048),
                                        dtype=np.float32),
        dims=("band", "y", "x"), coords={"band": CHANNELS},
    )
    valid = xr.DataArray(da.ones((n, n), bool, chunks=2048), dims=("y", "x"))
    grid = _grid(n)
    opts = InferenceOptions(device="cpu", overlap=32, block_size=2048, batch_size=args.batch)
    pred = predict(data, valid, grid, [art], opts)
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads", num_workers=2):
        t = _timed(lambda: write_cog(pred.probability, grid, Path(tmp) / "p.tif", dtype="float32",
                                     nodata=float("nan")))
        size = (Path(tmp) / "p.tif").stat().st_size
    peak = _peak_rss_gib()
    return {"scene": f"{n}x{n}x{len(CHANNELS)}", "model": "PlainUnet(base_channels=4, depth=2)",
            "overlap": 32, "block_size": 2048, "windows": pred.windows, "seconds": round(t, 1),
            "windows_per_s": round(pred.windows / t, 1), "peak_rss_gib": round(peak, 2),
            "cog_mib": round(size / 1024**2, 1)}


def _peak_rss_gib() -> float:
    """High-water RSS of this process's address space (VmHWM).

    Not ``ru_maxrss``: Linux folds the parent's high-water mark into a child's
    ``ru_maxrss`` at exec, so a child started from a big parent would report
    the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB -> GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # pragma: no cover - not Linux


def bench_memory(args: argparse.Namespace) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--memory-only", "--mem-size", str(args.mem_size), "--batch", str(args.batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- 3. precision ------------------------------------------------------------------
def _l4s_batch(count: int) -> tuple[np.ndarray, str]:
    """``count`` Landslide4Sense patches in physical units (as a scene is read), or random inputs."""
    try:
        import h5py  # noqa: F401  (read_image reads the patches with it)
    except ImportError:  # pragma: no cover
        h5py = None
    from pipeline.training.patch_readers import read_image

    files = sorted((SHARED / "l4s").glob("*/img/*.h5")) if h5py else []
    if not files:
        return np.random.default_rng(1).random((count, 14, TILE, TILE), dtype=np.float32), "random inputs"
    imgs = [read_image(f).image for f in files[:count]]
    while len(imgs) < count:
        imgs.append(imgs[len(imgs) % len(files)])
    return np.stack(imgs), f"{min(count, len(files))} Landslide4Sense patches (physical units)"


def bench_precision(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    art, model_name = _bench_model(args)
    module = art.module
    assert module is not None
    raw, source = _l4s_batch(args.precision_batch)
    raw = raw[:, art.check_channels(L4S_CHANNELS)]
    spec = art.normalization
    if spec["method"] == "none":  # an untrained model: the batch's own median/IQR keeps its inputs near 0
        spec = fixed_spec(band_stats(raw.transpose(1, 0, 2, 3).reshape(raw.shape[1], -1), art.channels))
    x = torch.from_numpy(normalize(raw, None, spec))
    thr = art.threshold
    modes = {"fp32": (False, False), "fp32+channels_last": (False, True),
             "bf16": (True, False), "bf16+channels_last": (True, True)}
    runners: dict[str, Callable[[], torch.Tensor]] = {}
    for name, (bf16, cl) in modes.items():
        m = copy.deepcopy(module)
        xx = x
        if cl:
            m = m.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)

        def run(m: torch.nn.Module = m, xx: torch.Tensor = xx, bf16: bool = bf16) -> torch.Tensor:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                return torch.sigmoid(m(xx).float())

        runners[name] = run
    outputs = {name: run() for name, run in runners.items()}  # warm-up, and the compared outputs
    # float32 modes alternate over the repeats (the machine may be shared); bf16 is slow here: one run
    ts: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(max(args.repeats, 3)):
        for name, run in runners.items():
            if rep and name.startswith("bf16"):
                continue
            ts[name].append(_timed(run))
    ref = outputs["fp32"]
    results: dict[str, dict[str, float]] = {}
    for name, p in outputs.items():
        diff = (p - ref).abs()
        results[name] = {
            "windows_per_s": round(len(x) / statistics.median(ts[name]), 2),
            "runs": len(ts[name]),
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "mask_agreement_at_threshold": float(((p >= thr) == (ref >= thr)).float().mean()),
        }
        print(f"  {name}: {results[name]}", flush=True)
    base = results["fp32"]["windows_per_s"]
    for r in results.values():
        r["speedup_vs_fp32"] = round(r["windows_per_s"] / base, 3)
    return {"model": model_name, "threshold": thr, "inputs": source, "batch": len(x), "threads": args.threads,
            "modes": results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", "--small", action="store_true", help="small scene, one repeat (about a minute)")
    p.add_argument("--model", default="Unet:mobilenet_v2", help="architecture:encoder when no artefact is used")
    p.add_argument("--artefact", type=Path, default=ROOT / "pipeline" / "models" / "default.safetensors",
                   help="trained artefact for throughput and precision (default: the shipped model; "
                        "falls back to an untrained --model when absent)")
    p.add_argument("--size", type=int, help="throughput scene edge (default 4096; quick 1024)")
    p.add_argument("--mem-size", type=int, help="memory scene edge (default 10980; quick 4096)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="total CPU threads")
    p.add_argument("--repeats", type=int, help="repeats per measurement (default 3; quick 1)")
    p.add_argument("--precision-batch", type=int, default=16)
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "memory", "precision"])
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.size = args.size or (1024 if args.quick else 4096)
    args.mem_size = args.mem_size or (4096 if args.quick else 10980)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        args.precision_batch = min(args.precision_batch, 4)
    if args.memory_only:
        print(json.dumps(run_memory(args)))
        return 0
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {args.threads}", flush=True)
    report: dict[str, object] = {}
    if "throughput" not in args.skip:
        print("throughput (overlap 0):", flush=True)
        report["throughput"] = bench_throughput(args)
        print(json.dumps(report["throughput"], indent=2), flush=True)
    if "memory" not in args.skip:
        print("peak memory:", flush=True)
        report["memory"] = bench_memory(args)
        print(json.dumps(report["memory"], indent=2), flush=True)
    if "precision" not in args.skip:
        print("CPU precision:", flush=True)
        report["precision"] = bench_precision(args)
        print(json.dumps(report["precision"], indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
