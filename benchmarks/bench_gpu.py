"""GPU inference benchmark: throughput per GPU, the time the GPUs wait for data, and how far
bf16/fp16 move the probabilities from float32.

On a machine with CUDA, for the shipped default model (pipeline/models/default.safetensors) and a
U-Net with a ResNet34 encoder and random weights:

1. Model alone: windows per second of the forward pass on random normalized windows already on
   the GPU (batch size ``auto``), in fp32, bf16 (where the GPU has it) and fp16, on each GPU.
2. Whole path: windows per second of :func:`pipeline.inference.tiled.predict` on a synthetic
   scene generated block by block on the workers (no file decoding), computed on a local cluster
   of one worker per GPU (:func:`pipeline.run.gpus.gpu_cluster`), with 1 GPU and with all GPUs.
   The GPUs' wait for data is estimated as 1 - (whole-path rate / (GPUs x model-alone rate)) and
   measured as the mean utilization that nvidia-smi reports during the run.
3. Agreement: fp16 and bf16 against fp32 on the Landslide4Sense patches of ../shared/data
   (random windows without them): the largest probability difference, the share of valid pixels
   whose mask at the model's threshold changes, the chunks redone in fp32 after an overflow.
4. Reproducibility in fp32: a window's probabilities in batches of other windows, bit for bit.

Without CUDA it says so and exits 0. ``--cpu-bf16`` measures item 3 for bf16 on the CPU instead
(both models on the shared patches).

Usage::

    python benchmarks/bench_gpu.py                      # on a GPU machine
    python benchmarks/bench_gpu.py --size 8192 --json gpu.json
    python benchmarks/bench_gpu.py --cpu-bf16           # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "pipeline" / "models" / "default.safetensors"
PATCHES = ROOT.parent / "shared" / "data" / "l4s" / "train"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="synthetic scene edge in px (whole-path throughput)")
    ap.add_argument("--block", type=int, default=1024, help="grid.block_size of the whole-path run")
    ap.add_argument("--threads", type=int, default=0, help="threads per GPU worker (default: CPU cores / GPUs)")
    ap.add_argument("--repeats", type=int, default=20, help="timed batches per model-alone measurement")
    ap.add_argument("--patches", type=Path, default=PATCHES, help="Landslide4Sense folder with img/ and mask/")
    ap.add_argument("--cpu-bf16", action="store_true", help="bf16 vs fp32 of the default model on the CPU")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    if args.cpu_bf16:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        results: dict[str, Any] = {"cpu_bf16": cpu_bf16(args.patches)}
    elif not torch.cuda.is_available():
        print("no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to measure; "
              "run it on a GPU machine, or use --cpu-bf16 for the CPU precision figures")
        return 0
    else:
        results = gpu_benchmark(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


# -- models and inputs ----------------------------------------------------------------
def models() -> list[Any]:
    """The shipped default model and U-Net + ResNet34 with random weights (encoder_weights=None)."""
    import torch

    from pipeline.core.channels import L4S_CHANNELS
    from pipeline.model.artefact import ModelArtefact, load_artefact
    from pipeline.model.registry import build_model

    out = [load_artefact(DEFAULT_MODEL)] if DEFAULT_MODEL.exists() else []
    torch.manual_seed(0)
    module = build_model("Unet", "resnet34", len(L4S_CHANNELS), encoder_weights=None).eval()
    mean = [0.1] * 12 + [15.0, 500.0]
    std = [0.05] * 12 + [10.0, 300.0]
    out.append(ModelArtefact("Unet", "resnet34", list(L4S_CHANNELS), tile_size=128, module=module,
                             name="unet-resnet34-random", normalization={"method": "fixed", "mean": mean, "std": std}))
    return out


def patch_windows(art: Any, folder: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Normalized windows (N, C, 128, 128) of ``art`` with their valid pixels, and where they come from:
    the shared patches, else random values (normal around the normalization's mean)."""
    from pipeline.model.normalization import level_spec, normalize

    spec = level_spec(art.normalization, None)
    if folder.is_dir():
        from pipeline.training.patch_files import find_patches
        from pipeline.training.patch_readers import load_patch

        patches = [load_patch(r, art.channels) for r in find_patches(folder)]
        x = np.stack([p.image for p in patches]).astype(np.float32)
        v = np.stack([p.valid for p in patches])
        source = f"{len(patches)} patches of {folder}"
    else:
        rng = np.random.default_rng(0)
        mean = np.asarray(spec.get("mean", [0.0] * art.in_channels), np.float32)[None, :, None, None]
        std = np.asarray(spec.get("std", [1.0] * art.in_channels), np.float32)[None, :, None, None]
        x = (mean + std * rng.standard_normal((32, art.in_channels, 128, 128))).astype(np.float32)
        v = np.ones((32, 128, 128), bool)
        source = "32 random windows"
    return normalize(x, v, spec, finite=True), v, source


def runtime(device: Any, precision: str, batch: int) -> Any:
    from pipeline.inference.runtime import Runtime
    from pipeline.model.device import BatchLimit, configure_cuda, use_channels_last

    if device.type == "cuda":
        configure_cuda(precision)  # type: ignore[arg-type]
    return Runtime(device, precision, use_channels_last(device, precision), BatchLimit(batch))  # type: ignore[arg-type]


def probabilities(art: Any, x: np.ndarray, v: np.ndarray, rt: Any) -> np.ndarray:
    """(N, H, W) probabilities of ``art`` through the inference's forward pass."""
    import copy

    import torch

    from pipeline.inference.forward import forward_probs

    module = copy.deepcopy(art.module).eval().to(rt.device)
    if rt.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return forward_probs(module, x, rt, ("identity",), valid=v, name=art.name)[0].cpu().numpy()


def agreement(art: Any, x: np.ndarray, v: np.ndarray, device: Any, precision: str) -> dict[str, Any]:
    """How far ``precision`` moves ``art``'s probabilities from fp32 on valid pixels."""
    from pipeline.inference import forward

    ref = probabilities(art, x, v, runtime(device, "fp32", 16))
    before = forward.redone_chunks()
    t0 = time.perf_counter()
    out = probabilities(art, x, v, runtime(device, precision, 16))
    seconds = time.perf_counter() - t0
    dp = np.abs(out - ref)[v]
    flips = ((out >= art.threshold) != (ref >= art.threshold))[v]
    return {"model": art.name, "precision": precision, "threshold": round(float(art.threshold), 4),
            "valid_pixels": int(v.sum()), "max_abs_dp": float(dp.max()), "mean_abs_dp": float(dp.mean()),
            "mask_changed_share": float(flips.mean()), "mask_changed_pixels": int(flips.sum()),
            "chunks_redone_fp32": forward.redone_chunks() - before, "seconds": round(seconds, 3)}


def cpu_bf16(folder: Path) -> list[dict[str, Any]]:
    """bf16 autocast against fp32 on the CPU: both models on the shared patches."""
    import torch

    if not folder.is_dir():
        print(f"no patches at {folder}: nothing to measure")
        return []
    rows = []
    for art in models():
        x, v, source = patch_windows(art, folder)
        row = agreement(art, x, v, torch.device("cpu"), "bf16")
        row["source"] = source
        rows.append(row)
        print(f"CPU bf16 vs fp32, {art.name} on {source}: max |dp| {row['max_abs_dp']:.4g}, mean |dp| "
              f"{row['mean_abs_dp']:.3g}, mask changed on {row['mask_changed_pixels']} of {row['valid_pixels']} "
              f"valid pixels ({100 * row['mask_changed_share']:.4f} %) at threshold {row['threshold']}, "
              f"{row['chunks_redone_fp32']} chunk(s) redone in fp32")
    return rows


# -- the GPU measurements ---------------------------------------------------------------
def gpu_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.model.device import cuda_bf16_supported

    n_gpus = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(n_gpus)]
    print(f"{n_gpus} GPU(s): {', '.join(names)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    precisions = ["fp32", "fp16"] + (["bf16"] if cuda_bf16_supported(torch.device("cuda:0")) else [])
    results: dict[str, Any] = {"gpus": names, "model_alone": [], "agreement": [], "reproducible": [],
                               "whole_path": []}
    for art in models():
        for i in range(n_gpus):
            for precision in precisions:
                row = model_alone(art, torch.device(f"cuda:{i}"), precision, args.repeats)
                results["model_alone"].append(row)
                print(f"model alone  {art.name:24s} GPU {i} {precision}: {row['windows_per_s']:9.1f} windows/s "
                      f"(batch {row['batch']})")
        x, v, source = patch_windows(art, args.patches)
        for precision in precisions[1:]:
            row = agreement(art, x, v, torch.device("cuda:0"), precision)
            row["source"] = source
            results["agreement"].append(row)
            print(f"agreement    {art.name:24s} {precision} vs fp32 on {source}: max |dp| {row['max_abs_dp']:.4g}, "
                  f"mask changed {100 * row['mask_changed_share']:.4f} %, redone {row['chunks_redone_fp32']}")
        results["reproducible"].append(reproducible(art, x, v, torch.device("cuda:0")))
        print(f"reproducible {art.name:24s} fp32: {results['reproducible'][-1]}")
    counts = sorted({1, n_gpus})
    for art in models()[:1]:
        alone = {r["precision"]: r["windows_per_s"] for r in results["model_alone"]
                 if r["model"] == art.name and r["gpu"] == 0}
        for n in counts:
            row = whole_path(art, n, args)
            used = row["precision"].split("+")[0]
            if used in alone:
                row["gpu_wait_share_estimate"] = round(max(0.0, 1 - row["windows_per_s"] / (n * alone[used])), 3)
            results["whole_path"].append(row)
            print(f"whole path   {art.name:24s} {n} GPU(s): {json.dumps(row)}")
    return results


def model_alone(art: Any, device: Any, precision: str, repeats: int) -> dict[str, Any]:
    """Windows per second of the forward pass alone (inputs on the GPU, probabilities left there)."""
    import copy

    import torch

    from pipeline.inference.forward import model_logits
    from pipeline.model.device import auto_batch_size

    batch = auto_batch_size(device, art.tile_size, art.in_channels)
    rt = runtime(device, precision, batch)
    module = copy.deepcopy(art.module).eval().to(device)
    if rt.channels_last:
        module = module.to(memory_format=torch.channels_last)
    x = torch.randn(batch, art.in_channels, art.tile_size, art.tile_size, device=device)
    if rt.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(3):  # warm-up: kernels chosen, memory pooled
        torch.sigmoid(model_logits(module, x, rt, precision))
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.sigmoid(model_logits(module, x, rt, precision))
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    del module, x
    torch.cuda.empty_cache()
    return {"model": art.name, "gpu": device.index, "precision": precision, "batch": batch,
            "windows_per_s": round(batch * repeats / seconds, 1)}


def reproducible(art: Any, x: np.ndarray, v: np.ndarray, device: Any) -> dict[str, bool]:
    """In fp32: the same windows twice, and in batches of other windows (padded last chunk), bit for bit."""
    rt = runtime(device, "fp32", 8)
    first = probabilities(art, x, v, rt)
    again = probabilities(art, x, v, rt)
    order = np.roll(np.arange(len(x)), 3)  # other neighbours in every chunk, another last chunk
    shuffled = probabilities(art, x[order], v[order], rt)
    return {"same_batches": bool(np.array_equal(first, again)),
            "other_batch_composition": bool(np.array_equal(first[order], shuffled))}


def whole_path(art: Any, n_gpus: int, args: argparse.Namespace) -> dict[str, Any]:
    """predict() on a synthetic scene on a local cluster of ``n_gpus`` GPU workers."""
    import dask
    import dask.array as da
    import xarray as xr
    from affine import Affine
    from distributed import Client
    from rasterio.crs import CRS

    from pipeline.core.grid import Grid
    from pipeline.inference.options import InferenceOptions
    from pipeline.inference.tiled import forward_seconds, precision_figures, predict
    from pipeline.run.gpus import GPU_RESOURCE, gpu_cluster, visible_gpus

    gpus = (visible_gpus() or [str(i) for i in range(n_gpus)])[:n_gpus]
    threads = args.threads or max(1, (os.cpu_count() or 2) // len(gpus))
    n = args.size
    grid = Grid(CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), n, n)
    rng = da.random.default_rng(0)
    values = rng.random((len(art.channels), n, n), dtype=np.float32, chunks=(-1, args.block, args.block))
    data = xr.DataArray(values * 0.3, dims=("band", "y", "x"), coords={"band": list(art.channels)})
    opts = InferenceOptions(device="cuda", block_size=args.block)
    with gpu_cluster(gpus, threads, "auto") as cluster, Client(cluster) as client:
        client.wait_for_workers(len(gpus))
        with dask.annotate(resources={GPU_RESOURCE: 1}):
            pred = predict(data, None, grid, [art], opts)
        busy = _Utilization(gpus)
        t0 = time.perf_counter()
        with busy:
            pred.probability.data.sum().compute()
        seconds = time.perf_counter() - t0
        forward = forward_seconds(client, pred, flush=True)
        figures = precision_figures(client, pred)
    return {"model": art.name, "gpus": len(gpus), "threads_per_gpu": threads, "scene_px": n,
            "windows": pred.windows, "seconds": round(seconds, 2), "windows_per_s": round(pred.windows / seconds, 1),
            "forward_seconds": None if forward is None else round(forward, 2), **figures,
            "gpu_utilization_mean_pct": busy.mean()}


class _Utilization:
    """Mean GPU utilization (%) that nvidia-smi reports while the block runs (None without it)."""

    def __init__(self, gpus: list[str]) -> None:
        self.gpus, self.samples, self._stop = gpus, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _Utilization:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", ",".join(self.gpus)]
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
                self.samples.extend(float(s) for s in out.split())
            except (OSError, subprocess.SubprocessError, ValueError):
                return

    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


if __name__ == "__main__":
    sys.exit(main())
