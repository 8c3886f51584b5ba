"""The per-process model runtime: device, precision, batch limit, and one cached instance per model.

Model instances are cached per process (keyed by the artefact's SHA-256, the
device and the memory format): the threaded scheduler shares one instance,
and each distributed worker process loads the artefact from its path once.
A model only in memory (not saved) travels with the graph and is used as
given on its own device; for another device the runtime moves a copy, so the
caller's module stays where it was.

PyTorch and the device helpers are imported by the functions that run the
model (in the worker processes): building the graph in the main process
needs neither.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ModelError
from pipeline.inference.options import InferenceOptions
from pipeline.model.artefact import ModelArtefact, load_artefact
from pipeline.model.normalization import level_spec, validate_spec

if TYPE_CHECKING:
    import torch

    from pipeline.model.device import BatchLimit, Precision

log = logging.getLogger(__name__)


@dataclass
class ModelRef:
    """What a block task needs to find or load one model; cheap to pickle when saved to a file."""

    key: str
    path: str | None
    channel_index: tuple[int, ...]
    normalization: dict[str, Any]
    threshold: float
    module: torch.nn.Module | None = field(default=None, repr=False)
    name: str = ""  # the model's name in messages (its artefact's name or file)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["path"] is not None:
            state["module"] = None  # workers load the file; weights never travel in the graph
        return state

    def with_index(self, index: tuple[int, ...]) -> ModelRef:
        """The same model reading its channels at ``index``."""
        return ModelRef(self.key, self.path, index, self.normalization, self.threshold, self.module, self.name)


def model_refs(models: Sequence[ModelArtefact], bands: Sequence[str], level: str | None = None) -> tuple[ModelRef, ...]:
    """References to ``models`` reading their channels from ``bands``, normalized for ``level``.

    Raises :class:`pipeline.model.artefact.MissingChannelsError` for a channel ``bands`` lacks.
    """
    refs = []
    for m in models:
        index = m.check_channels(bands)
        path = str(m.path) if m.path is not None and m.sha256 else None
        if path is None and m.module is None:
            raise ModelError(f"model {m.name or m.architecture!r} is neither loaded nor saved to a file")
        spec = validate_spec(level_spec(m.normalization, level), n_channels=len(m.channels))
        name = m.name or (os.path.basename(path) if path else m.architecture)
        refs.append(ModelRef(m.key, path, tuple(index), spec, float(m.threshold), m.module, name))
    return tuple(refs)


@dataclass
class Runtime:
    """Where and how this process runs the models."""

    device: torch.device
    precision: Precision
    channels_last: bool
    limit: BatchLimit


_CACHE: dict[tuple[str, str, bool], torch.nn.Module] = {}
#: in-memory modules prepared for another device than their own: the caller's module -> {tag: copy}
_COPIES: weakref.WeakKeyDictionary[Any, dict[tuple[str, bool], torch.nn.Module]] = weakref.WeakKeyDictionary()
_RUNTIMES: dict[tuple[Any, ...], Runtime] = {}
_LOCK = threading.Lock()
_PREPARE_LOCK = threading.Lock()
_THREADS_SET: set[int] = set()


def clear_model_cache() -> None:
    """Forget cached model instances in this process."""
    with _LOCK:
        _CACHE.clear()
        _COPIES.clear()
        _RUNTIMES.clear()


def runtime_for(opts: InferenceOptions, tile: int) -> Runtime:
    """This process's runtime for ``opts`` and windows of ``tile`` px (made once, then shared)."""
    import torch

    from pipeline.model.device import (
        BatchLimit,
        auto_batch_size,
        configure_cuda,
        resolve_device,
        resolve_precision,
        use_channels_last,
    )

    key = (opts.device, opts.precision, opts.channels_last, opts.batch_size, tile)
    with _LOCK:
        rt = _RUNTIMES.get(key)
        if rt is None:
            device = resolve_device(opts.device)
            precision = resolve_precision(opts.precision, device)
            cl = use_channels_last(device, precision) if opts.channels_last == "auto" else bool(opts.channels_last)
            size = opts.batch_size if opts.batch_size != "auto" else \
                auto_batch_size(device, tile, threads=worker_threads())
            rt = Runtime(device, precision, cl, BatchLimit(int(size)))
            _RUNTIMES[key] = rt
            if device.type == "cuda":
                configure_cuda(precision)
            log.info("inference on %s in %s, batches of %d windows", device, precision, rt.limit.size)
        if opts.torch_threads and os.getpid() not in _THREADS_SET:
            torch.set_num_threads(opts.torch_threads)
            _THREADS_SET.add(os.getpid())
        return rt


def worker_threads() -> int:
    """The threads of the Dask worker this runs in (each may run the model at once); 1 elsewhere."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):  # not in a worker
        return 1


def module_for(ref: ModelRef, rt: Runtime) -> torch.nn.Module:
    """The model of ``ref`` in eval mode on the runtime's device: cached, loaded, or as given."""
    if ref.path is None:
        # in-memory module (not saved): never cached under a reusable id
        if ref.module is None:
            raise ModelError(f"model {ref.key}: neither a loaded module nor a file to load")
        return _own_or_copy(ref.module, rt)
    cache_key = (ref.key, str(rt.device), rt.channels_last)
    with _LOCK:
        module = _CACHE.get(cache_key)
        if module is not None:
            return module
        if ref.module is not None:  # already loaded in this process
            module = ref.module if _on_device(ref.module, rt.device) else copy.deepcopy(ref.module)
        else:
            art = load_artefact(ref.path, device=rt.device)
            if art.sha256 != ref.key:
                raise ModelError(f"{ref.path}: file changed since the run started (checksum differs)")
            module = art.module
            assert module is not None
            log.info("worker pid %d loaded model %s", os.getpid(), ref.path)
        module = _prepare(module, rt)
        _CACHE[cache_key] = module
        return module


def _own_or_copy(module: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """``module`` prepared in place when it is on the runtime's device already, else a prepared copy
    (made once per module and runtime)."""
    if _on_device(module, rt.device):
        return _prepare(module, rt)
    tag = (str(rt.device), rt.channels_last)
    with _LOCK:
        copies = _COPIES.setdefault(module, {})
        if tag not in copies:
            copies[tag] = _prepare(copy.deepcopy(module), rt)
        return copies[tag]


def _on_device(module: torch.nn.Module, device: torch.device) -> bool:
    """True when every parameter and buffer of ``module`` is on ``device`` (any index if it has none)."""
    return all(
        t.device.type == device.type and (device.index is None or t.device.index == device.index)
        for t in itertools.chain(module.parameters(), module.buffers())
    )


def _prepare(module: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """Eval mode on the runtime's device and memory format (done once per module and runtime)."""
    import torch

    tag = (str(rt.device), rt.channels_last)
    if getattr(module, "_inference_prepared", None) == tag:
        return module
    with _PREPARE_LOCK:
        if getattr(module, "_inference_prepared", None) != tag:
            module = module.eval().to(rt.device)
            if rt.channels_last:
                module = module.to(memory_format=torch.channels_last)
            if rt.device.type == "cuda":  # weights in place before the threads' own streams read them
                torch.cuda.synchronize(rt.device)
            object.__setattr__(module, "_inference_prepared", tag)
    return module
