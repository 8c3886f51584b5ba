"""Benchmark: where a Dask worker's memory goes for one inference block.

Runs one block task of the run's inference in this process, the way a worker runs it: the block's
read through the stack's window reader, :func:`pipeline.inference.blocks.read_and_predict`, then
the strips it hands to later blocks and its blend (:mod:`pipeline.inference.tiled`). The scene is
the synthetic tile of ``bench_stack.py`` (cached in the work directory, shared with
``bench_run.py``), the model the shipped default, the block the scene's second block on both axes
(all its windows run; it reads the widest strip).

Per phase it reports two peaks over what the process held when the block task started: traced
allocations (tracemalloc: numpy arrays and Python objects, not PyTorch's tensors) and resident
memory (the kernel's high-water mark, reset at the start of each phase). A phase's peak includes
what earlier phases left alive. The resident figures come from a first, untraced run of the
block (a fresh worker's first block), the traced ones from a second run. First it measures a real
worker process of a local cluster, started as the run starts it: after its imports, and after
loading the model and running one batch.

    python benchmarks/bench_memory.py                     # a 2048 px block of the 4098 px scene
    python benchmarks/bench_memory.py --block 1024 --batch-size 8
    python benchmarks/bench_memory.py --tasks 2 --no-worker   # two block tasks at once, as a worker's threads
"""

from __future__ import annotations

import os
import sys

# what a local worker runs with (pipeline.run.cluster): one BLAS/OpenMP thread, glibc's own malloc trimming
os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
if "MALLOC_TRIM_THRESHOLD_" in os.environ:  # read by glibc at start: start again without it
    del os.environ["MALLOC_TRIM_THRESHOLD_"]
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_stack import build_inputs  # noqa: E402

from pipeline.core.config import DEFAULT_MODEL, DaskSection, SceneConfig  # noqa: E402

MIB = 1024**2
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def rss_peak() -> int:
    """The kernel's high-water mark of this process's resident memory, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_rss_peak() -> None:
    """Lower the high-water mark to the current resident memory (Linux ``clear_refs``)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class PhaseStats:
    """Bytes over the block task's start: traced peak, traced still alive when the phase last
    ended, resident peak."""

    calls: int = 0
    traced_peak: int = 0
    traced_after: int = 0
    rss_peak: int = 0


@dataclass
class Phases:
    """Peak memory by (nested) phase: each phase resets the peaks and hands its own to its parent."""

    stats: dict[str, PhaseStats] = field(default_factory=dict)  # by "outermost phase / phase", in order of entry
    _open: list[list[Any]] = field(default_factory=list)  # [name, traced peak, resident peak] of the open phases
    _base: tuple[int, int] = (0, 0)

    @staticmethod
    def _peaks(reset: bool = False) -> tuple[int, int, int]:
        """Traced bytes now, traced and resident peaks since the last reset (then reset them)."""
        current, traced = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
        resident = rss_peak()
        if reset:
            if tracemalloc.is_tracing():
                tracemalloc.reset_peak()
            reset_rss_peak()
        return current, traced, resident

    def start(self) -> None:
        self.stats.clear()
        self._base = (self._peaks(reset=True)[0], rss())

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _, traced, resident = self._peaks(reset=True)
        if self._open:  # the parent's peaks so far
            self._open[-1][1:] = max(self._open[-1][1], traced), max(self._open[-1][2], resident)
        st = self.stats.setdefault(f"{self._open[0][0]} / {name}" if self._open else name, PhaseStats())
        self._open.append([name, 0, 0])
        try:
            yield
        finally:
            _, own_traced, own_resident = self._open.pop()
            current, traced, resident = self._peaks()
            traced, resident = max(own_traced, traced), max(own_resident, resident)
            st.calls += 1
            st.traced_peak = max(st.traced_peak, traced - self._base[0])
            st.traced_after = current - self._base[0]
            st.rss_peak = max(st.rss_peak, resident - self._base[1])
            if self._open:
                self._open[-1][1:] = max(self._open[-1][1], traced), max(self._open[-1][2], resident)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return fn(*args, **kwargs)
        return wrapped


@contextlib.contextmanager
def instrumented(phases: Phases) -> Iterator[None]:
    """The block task's functions, each run as a phase."""
    from pipeline.inference import blocks
    from pipeline.stack import lazy_arrays
    from tiling.stitch import RollingSums

    targets = [
        (lazy_arrays.WarpedLayer, "read", "read: one band resampled"),
        (lazy_arrays, "horn_slope_padded", "read: slope from the DEM"),
        (blocks, "_coarse_means", "quicklook means"),
        (blocks, "_valid_pixels", "valid pixels"),
        (blocks, "normalize", "normalization"),
        (blocks._BlockTask, "_cut", "cutting windows into the batch"),
        (blocks, "predict_windows", "model (forward + combine)"),
        (blocks, "forward_probs", "forward pass"),
        (blocks, "_add_windows", "blending into the sums"),
        (RollingSums, "settle", "settling finished rows"),
        (blocks, "RollingSums", "sums allocated"),
    ]
    with contextlib.ExitStack() as stack:
        for owner, attr, name in targets:
            stack.enter_context(mock.patch.object(owner, attr, phases.wrap(name, getattr(owner, attr))))
        yield


@dataclass
class Scene:
    """The block task's arguments (as the graph of :func:`pipeline.inference.tiled.predict` has them)."""

    plan: Any
    reader: Any
    bands: list[int]
    spans: tuple[list[tuple[int, int]], list[tuple[int, int]]]
    index: tuple[int, int]

    @property
    def block(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return self.spans[0][self.index[0]], self.spans[1][self.index[1]]

    @property
    def extent(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return self.plan.windows.block_read_extent(*self.block)

    def input_bytes(self) -> int:
        return len(self.bands) * int(np.diff(self.extent).prod()) * 4

    @property
    def reread(self) -> Any:
        """What the block's second stage reads its kept channels with, as the graph has it (or None)."""
        from rasterio.windows import Window

        from pipeline.inference.tiled import rereads_kept

        if not rereads_kept(self.plan, True, len(self.bands), self.extent, self.block):
            return None
        (y0, y1), (x0, x1) = self.block
        return self.reader, [self.bands[k] for k in self.plan.keep_index], Window(x0, y0, x1 - x0, y1 - y0)

    def task(self) -> Any:
        """The block task (stage 1) on this block."""
        from pipeline.inference.blocks import read_and_predict

        return read_and_predict(self.reader, self.bands, self.extent, None, self.block, self.plan, self.reread is None)


def load_scene(size: int, block: int, batch: str, workdir: Path, index: tuple[int, int]) -> Scene:
    """The synthetic scene stacked as the run stacks it, and the plan of its inference."""
    from pipeline.core.channels import DEM, SLOPE
    from pipeline.inference.options import InferenceOptions
    from pipeline.inference.tiled import _block_plan
    from pipeline.model.artefact import load_artefact
    from pipeline.run.outputs import quicklook_coarse
    from pipeline.stack.layers import stack_scene
    from tiling.windows import block_spans

    inputs = build_inputs(workdir / f"scene_{size}", size)
    cfg = SceneConfig.model_validate({**inputs, "grid": {"block_size": block},
                                      "model": {"batch_size": batch if batch == "auto" else int(batch)}})
    art = load_artefact(DEFAULT_MODEL)
    stack = stack_scene(cfg, art.channels)
    plan, used, edge = _block_plan([art], InferenceOptions.from_config(cfg.model, block_size=block), stack.grid,
                                   [str(b) for b in stack.data.coords["band"].values], [SLOPE, DEM], None,
                                   quicklook_coarse(stack.grid))
    spans = block_spans(stack.grid.height, edge), block_spans(stack.grid.width, edge)
    index = (min(index[0], len(spans[0]) - 1), min(index[1], len(spans[1]) - 1))
    return Scene(plan, stack.reader, used, spans, index)


def incoming_strips(scene: Scene) -> list[Any]:
    """Zero strips shaped as those the earlier blocks hand to the scene's block."""
    out = []
    i, j = scene.index
    (ty0, ty1), (tx0, tx1) = scene.block
    for k, m in ((i - 1, j - 1), (i - 1, j), (i, j - 1)):
        if k < 0 or m < 0:
            continue
        (ry0, ry1), (rx0, rx1) = scene.plan.windows.block_read_extent(scene.spans[0][k], scene.spans[1][m])
        y0, y1, x0, x1 = max(ry0, ty0), min(ry1, ty1), max(rx0, tx0), min(rx1, tx1)
        if y0 < y1 and x0 < x1:
            shape = (y1 - y0, x1 - x0)
            out.append(((y0 - ty0, x0 - tx0), (np.zeros((scene.plan.outputs, *shape)), np.zeros(shape))))
    return out


def run_block(scene: Scene, phases: Phases) -> dict[str, int]:
    """One block task and what follows it on the worker; the bytes of what it hands back."""
    from pipeline.inference.tiled import _finish_block, _strip

    phases.start()
    (ry0, ry1), (rx0, rx1) = scene.extent
    (ty0, ty1), (tx0, tx1) = scene.block
    with phases("block task"):
        result = scene.task()
    handed = {"sums": _nbytes(result.sums), "kept": _nbytes(result.kept), "coarse": _nbytes(result.coarse)}
    with phases("strips for later blocks"):
        strips = [_strip(result, (y0 - ry0, y1 - ry0), (x0 - rx0, x1 - rx0))
                  for y0, y1, x0, x1 in ((ty0, ty1, tx1, rx1), (ty1, ry1, tx0, tx1), (ty1, ry1, tx1, rx1))
                  if y0 < y1 and x0 < x1]
    handed["strips"] = _nbytes(strips)
    with phases("blend of the block"):
        handed["output"] = _finish_block(scene.plan.outputs, result, scene.reread, *incoming_strips(scene)).nbytes
    return handed


def _nbytes(value: Any) -> int:
    """Bytes of the arrays in ``value`` (an array, None, or a dataclass, tuple or list of them)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return sum(_nbytes(v) for v in getattr(value, "__dict__", {}).values())


def concurrent_peak(scene: Scene, tasks: int) -> int:
    """Resident peak over the start of ``tasks`` copies of the block task run at once in threads."""
    base = rss()
    reset_rss_peak()
    with ThreadPoolExecutor(tasks) as pool:
        list(pool.map(lambda _: scene.task(), range(tasks)))
    return rss_peak() - base


def worker_baseline(model: Path) -> dict[str, Any]:
    """Resident MiB of the worker of a one-worker local cluster started as the run starts it."""
    from pipeline.run.cluster import dask_client

    with dask_client(DaskSection(n_workers=1, threads_per_worker=2)) as client:
        imported = next(iter(client.run(rss).values()))  # type: ignore[attr-defined]
        loaded = next(iter(client.run(_forward_once, str(model)).values()))[1]  # type: ignore[attr-defined]
    return {"after imports": round(imported / MIB, 1), "after model + one batch": round(loaded / MIB, 1)}


def _forward_once(path: str, batch: int | str = "auto") -> tuple[int, int]:
    """Load the model as a block task does (once per process) and run one batch of random windows:
    the resident peak over the start of the forward pass, and the resident bytes after it."""
    import torch

    from pipeline.inference.forward import forward_probs
    from pipeline.inference.options import InferenceOptions
    from pipeline.inference.runtime import model_refs, module_for, runtime_for
    from pipeline.model.artefact import load_artefact

    art = load_artefact(path)
    ref = model_refs([art], art.channels)[0]
    rt = runtime_for(InferenceOptions(batch_size=batch if batch == "auto" else int(batch)), art.tile_size)
    x = torch.randn(rt.limit.size, len(art.channels), art.tile_size, art.tile_size).numpy()
    module = module_for(ref, rt)
    base = rss()
    reset_rss_peak()
    forward_probs(module, x, rt, ("identity",))
    return rss_peak() - base, rss()


def report(scene: Scene, untraced: Phases, traced: Phases, handed: dict[str, int],
           extra: dict[str, Any]) -> dict[str, Any]:
    (y0, y1), (x0, x1) = scene.extent
    rows = {name: {"calls": st.calls, "traced_peak_mib": round(st.traced_peak / MIB, 1),
                   "traced_left_mib": round(st.traced_after / MIB, 1),
                   "rss_peak_mib": round(untraced.stats[name].rss_peak / MIB, 1) if name in untraced.stats else None}
            for name, st in traced.stats.items()}
    return {
        "block": f"{scene.block[0][1] - scene.block[0][0]} x {scene.block[1][1] - scene.block[1][0]} px at "
                 f"({scene.block[0][0]}, {scene.block[1][0]}), read {y1 - y0} x {x1 - x0} px x {len(scene.bands)} bands",
        "input_mib": round(scene.input_bytes() / MIB, 1),
        "batch_size": scene.plan.options.batch_size,
        "phases": rows,
        "handed_back_mib": {k: round(v / MIB, 1) for k, v in handed.items()},
        **extra,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"block: {result['block']}; input {result['input_mib']} MiB; batch size {result['batch_size']}")
    print(f"{'phase':52} {'calls':>5} {'traced peak':>12} {'traced left':>12} {'RSS peak':>10}  (MiB over the task's start)")
    for name, row in result["phases"].items():
        rss_txt = "-" if row["rss_peak_mib"] is None else f"{row['rss_peak_mib']:.1f}"
        print(f"{name:52} {row['calls']:>5} {row['traced_peak_mib']:>12.1f} {row['traced_left_mib']:>12.1f} {rss_txt:>10}")
    print("handed back (MiB):", result["handed_back_mib"])
    print("\n".join(f"{k}: {result[k]}" for k in ("worker_rss_mib", "process_rss_mib", "forward_pass_rss_mib")
                    if k in result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4098, help="scene edge in 10 m pixels (multiple of 6)")
    parser.add_argument("--block", type=int, default=2048, help="grid.block_size")
    parser.add_argument("--batch-size", default="auto", help="model.batch_size")
    parser.add_argument("--strip-mib", type=float, default=None,
                        help="input a block task holds at once (pipeline.inference.blocks.STRIP_BYTES)")
    parser.add_argument("--tasks", type=int, default=0,
                        help="instead: the resident peak of this many block tasks run at once (threads)")
    parser.add_argument("--no-worker", action="store_true", help="skip the local cluster's worker baseline")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "landslide-bench")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.strip_mib is not None:
        from pipeline.inference import blocks

        blocks.STRIP_BYTES = int(args.strip_mib * MIB)
    extra = {} if args.no_worker else {"worker_rss_mib": worker_baseline(DEFAULT_MODEL)}
    extra["process_rss_mib"] = prepare_process(args.batch_size)
    extra["forward_pass_rss_mib"] = round(_forward_once(str(DEFAULT_MODEL), args.batch_size)[0] / MIB, 1)
    scene = load_scene(args.size, args.block, args.batch_size, args.workdir, (1, 1))
    if args.tasks:  # on its own: the first blocks of a fresh process, as in a new worker
        before = rss()
        peak = concurrent_peak(scene, args.tasks)
        print(json.dumps({"block": scene.block, "input_mib": round(scene.input_bytes() / MIB, 1),
                          "rss_before_mib": round(before / MIB, 1), f"rss_peak_over_{args.tasks}_tasks_mib":
                          round(peak / MIB, 1), "rss_after_mib": round(rss() / MIB, 1), **extra}, indent=2))
        return 0
    untraced, traced = Phases(), Phases()
    extra["process_rss_mib"]["before the block"] = round(rss() / MIB, 1)
    with instrumented(untraced):
        run_block(scene, untraced)  # the first block of this process, as in a fresh worker
    tracemalloc.start()
    with instrumented(traced):
        handed = run_block(scene, traced)
    tracemalloc.stop()
    result = report(scene, untraced, traced, handed, extra)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def prepare_process(batch: str) -> dict[str, float]:
    """Import what a worker imports and load the model; this process's resident MiB on the way."""
    start = rss()
    import torch

    from pipeline.run.cluster import WORKER_IMPORTS

    for name in WORKER_IMPORTS:
        __import__(name)
    torch.set_num_threads(1)
    imported = rss()
    return {"start": round(start / MIB, 1), "after imports": round(imported / MIB, 1),
            "after model + one batch": round(_forward_once(str(DEFAULT_MODEL), batch)[1] / MIB, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
