"""Benchmark: the whole ``run`` on a synthetic full-size Sentinel-2 tile.

Builds (once, cached in the work directory) a 10980 x 10980 px scene with the
stacking benchmark's generator: 13 bands at native 10/20/60 m and a ~30 m DEM
in EPSG:4326. Runs the command line (``python -m pipeline run``, in a process
of its own, on its local Dask cluster of worker processes) with the given
model and reports:

- wall time per stage, from the run's own report.json;
- peak resident memory of the command's process tree (its main process +
  Dask workers), sampled every 0.2 s;
- the share of wall time that is *not* model inference, two ways: (1) the raw
  forward time of the same model for the same number of windows is timed
  right before and right after the run (random batches, same batch size and
  memory format, the faster of one stream on all threads and one stream per
  thread); the faster of the two timings is subtracted; (2) from the run's
  own report: the worker-thread seconds its block tasks spent in the forward
  pass (Dask performance metrics), against all worker-thread seconds of the
  run (and against the command's wall time, which adds the process's start).
  (2) is immune to the machine's speed drifting between the timings; it
  counts as inference whatever slows the forward pass down inside the run.

    python benchmarks/bench_run.py                   # full 10980 px tile
    python benchmarks/bench_run.py --size 2046       # quick
    python benchmarks/bench_run.py --architecture Unet --encoder resnet34
                                                     # the seed paper's model (random weights: same cost)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench_stack import PeakMemory, build_inputs  # noqa: E402

from pipeline.core.config import DEFAULT_MODEL, SceneConfig  # noqa: E402
from pipeline.model.artefact import ModelArtefact, load_artefact, save_artefact  # noqa: E402
from pipeline.model.device import auto_batch_size, use_channels_last  # noqa: E402
from pipeline.model.registry import build_model  # noqa: E402
from tiling.windows import WindowGrid  # noqa: E402


def raw_forward_seconds(model_path: Path, n_windows: int, batch: int, threads: int, sample: int) -> float:
    """Seconds the bare model needs for ``n_windows``: the faster of two ways to use ``threads`` cores.

    The module runs as inference runs it (eval, channels_last when the CPU
    policy says so, inference mode) on random batches: once as one stream with
    ``threads`` intra-op threads, once as ``threads`` concurrent streams of one
    thread each (how the Dask worker's threads run it). Median batch time.
    """
    import threading

    art = load_artefact(model_path)
    module = art.module.eval()
    x = torch.randn(batch, art.in_channels, art.tile_size, art.tile_size)
    if use_channels_last(torch.device("cpu"), "fp32"):
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()

    def stream(out: list[float]) -> None:
        with torch.inference_mode():
            module(x)  # warm-up
            for _ in range(sample):
                t0 = time.perf_counter()
                module(x)
                out.append(time.perf_counter() - t0)

    try:
        torch.set_num_threads(threads)
        one: list[float] = []
        stream(one)
        per_window = statistics.median(one) / batch
        if threads > 1:
            torch.set_num_threads(1)
            results: list[list[float]] = [[] for _ in range(threads)]
            workers = [threading.Thread(target=stream, args=(r,)) for r in results]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            per_window = min(per_window, statistics.median([t for r in results for t in r]) / batch / threads)
    finally:
        torch.set_num_threads(before)
    return per_window * n_windows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10980, help="tile edge in 10 m pixels (multiple of 6)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model artefact")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "landslide-bench")
    parser.add_argument("--raw-batches", type=int, default=10, help="batches timed for the raw model")
    parser.add_argument("--architecture", default=None,
                        help="time this architecture instead of --model (random weights, the shipped model's "
                             "channels and normalization)")
    parser.add_argument("--encoder", default=None, help="encoder for --architecture")
    parser.add_argument("--memory-limit", default=None, help="dask.memory_limit of the run's worker (e.g. 1GB)")
    args = parser.parse_args(argv)

    inputs = build_inputs(args.workdir / f"scene_{args.size}", args.size)
    out = args.workdir / f"run_{args.size}"
    # a private copy: the run and the raw-model timing must see the same weights
    model = args.workdir / f"model_{os.getpid()}.safetensors"
    if args.architecture:
        base = load_artefact(args.model)
        module = build_model(args.architecture, args.encoder, base.in_channels)
        meta = ModelArtefact(args.architecture, args.encoder, list(base.channels), normalization=base.normalization,
                             tile_size=base.tile_size, threshold=base.threshold, name="bench-random-weights")
        save_artefact(model, module, meta)
    else:
        shutil.copyfile(args.model, model)
    args.model = model
    art = load_artefact(args.model)
    cfg = SceneConfig.model_validate({
        **inputs,
        "channels": None,
        "grid": {"block_size": args.block},
        "model": {"path": str(args.model), "overlap": args.overlap},
        "output": {"dir": str(out), "quicklook": True, "mask_cog": True},
        "dask": {"n_workers": 1, "threads_per_worker": args.threads,
                 **({"memory_limit": args.memory_limit} if args.memory_limit else {})},
    })
    batch = auto_batch_size(torch.device("cpu"), art.tile_size, art.in_channels)
    per_window_before = raw_forward_seconds(args.model, 1, batch, args.threads, args.raw_batches)
    # The command line, as users run it, in a process of its own (its main process imports no PyTorch;
    # this one does, for the raw timing, and is not measured).
    config_path = args.workdir / f"bench_run_{args.size}.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False))
    command = [sys.executable, "-m", "pipeline", "run", str(config_path), "--force"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    with PeakMemory(interval=0.2, pid=proc.pid) as rss:
        stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"the run failed (exit {proc.returncode}): {' '.join(command)}")
    run_dir = Path(next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith("outputs:")))
    report = json.loads((run_dir / "report.json").read_text())
    grid = report["grid"]
    n_windows = len(WindowGrid(grid["height"], grid["width"], art.tile_size, args.overlap))
    per_window_after = raw_forward_seconds(args.model, 1, batch, args.threads, args.raw_batches)
    # the faster of the two timings: the stricter bound on what is not the model
    raw = min(per_window_before, per_window_after) * n_windows
    result = {
        "scene": f"{grid['width']} x {grid['height']} px",
        "model": f"{art.architecture}/{art.encoder} ({art.in_channels} ch)",
        "overlap": args.overlap,
        "windows": n_windows,
        "stage_seconds": report["timings_s"],
        "wall_seconds": round(wall, 1),
        "raw_model_ms_per_window_before_after": [
            round(per_window_before * 1e3, 2), round(per_window_after * 1e3, 2)],
        "raw_model_forward_seconds": round(raw, 1),
        "non_inference_share": round(max(0.0, wall - raw) / wall, 3),
        # the same share from the run's own record of its forward passes (Dask performance metrics),
        # not from a separate timing: the same CPU at the same moment, whatever the machine's drift
        "model_forward_seconds_in_run": report["inference"]["model_forward_seconds"],
        "non_inference_share_in_run": (None if report["inference"]["model_forward_share"] is None
                                       else round(1 - report["inference"]["model_forward_share"], 3)),
        # the same against the command's wall time (start-up and imports of the process included)
        "non_inference_share_in_command": (
            None if not report["inference"]["model_forward_seconds"] or not report["inference"]["worker_threads"]
            else round(1 - report["inference"]["model_forward_seconds"]
                       / (report["inference"]["worker_threads"] * wall), 3)),
        "peak_rss_gib_process_tree": round(rss.peak / 1024**3, 2),
        # each process's own peak: the command's main process, and its children (nanny, worker)
        "peak_rss_gib_main": round(rss.main_peak / 1024**3, 2),
        "peak_rss_gib_children": sorted((round(v / 1024**3, 2) for v in rss.child_peaks.values()), reverse=True),
        "polygons": report["counts"]["polygons"],
    }
    print(json.dumps(result, indent=2))
    model.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
