"""Device, precision and batch-size policy for inference.

- :func:`resolve_device`: ``auto`` picks CUDA, then Apple MPS, then the CPU.
- :func:`resolve_precision`: ``auto`` is float16 autocast on CUDA and float32
  elsewhere. On the CPU, bfloat16 autocast pays only on processors with
  native bf16 instructions (AVX512-BF16 / AMX), and it moves probabilities
  and a few pixels across the threshold, so ``auto`` keeps float32 there;
  ``bf16`` can still be requested explicitly.
- :func:`use_channels_last`: channels_last (NHWC) convolutions: on the CPU in
  float32 they are faster than NCHW with the same masks, so they are on by
  default there; on CUDA with reduced precision.
- :func:`auto_batch_size`: a batch size from the device memory and tile size.
- :func:`run_batched`: runs a function over a batch in chunks; a CUDA
  out-of-memory error halves the chunk and retries, down to 1. Results are
  the same as for one pass because every sample is processed independently
  (models run in eval mode).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16", "fp16"]

#: Precision chosen by ``auto`` on the CPU (see the module docstring).
CPU_AUTO_PRECISION: Precision = "fp32"
#: channels_last on the CPU (faster in float32, same results; see the module docstring).
CPU_AUTO_CHANNELS_LAST = True
#: Batch size chosen by ``auto`` on the CPU for 128 px tiles (larger batches do not speed up CPU inference).
CPU_AUTO_BATCH = 16
#: Rough activation memory per pixel of one sample during a forward pass (bytes), for CUDA auto batch size.
_CUDA_BYTES_PER_PIXEL = 2048
_MAX_AUTO_BATCH = 256


def mps_available() -> bool:
    """True when the Apple Metal backend can be used."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``model.device`` (auto: CUDA, then MPS, then CPU)."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device: {name!r} requested but CUDA is not available (use auto or cpu)")
        return torch.device(name)
    if name == "mps":
        if not mps_available():
            raise ConfigError("model.device: 'mps' requested but Apple MPS is not available (use auto or cpu)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"model.device: expected auto, cpu, cuda or mps, got {name!r}")


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Concrete precision for ``model.precision`` on ``device``."""
    kind = device.type
    if precision == "auto":
        if kind == "cuda":
            return "fp16"
        if kind == "cpu":
            return CPU_AUTO_PRECISION
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"model.precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and kind == "cpu":
        raise ConfigError("model.precision: fp16 needs a GPU; on the CPU use bf16 or fp32")
    return precision  # type: ignore[return-value]


def use_channels_last(device: torch.device, precision: Precision) -> bool:
    """Whether to run convolutions in channels_last memory format (see module docstring)."""
    if device.type == "cpu":
        return CPU_AUTO_CHANNELS_LAST
    return device.type == "cuda" and precision != "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Autocast context for ``precision`` (no-op for fp32)."""
    if precision == "fp32":
        yield
        return
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def auto_batch_size(device: torch.device, tile: int, in_channels: int = 14) -> int:
    """A sensible batch size: from free memory on CUDA, a fixed small batch elsewhere."""
    pixels = tile * tile
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except RuntimeError:  # pragma: no cover - driver without mem_get_info
            free = 4 * 1024**3
        per_sample = pixels * (_CUDA_BYTES_PER_PIXEL + 8 * in_channels)
        return int(max(1, min(_MAX_AUTO_BATCH, (0.5 * free) // per_sample)))
    return int(max(1, min(_MAX_AUTO_BATCH, CPU_AUTO_BATCH * (128 * 128) // pixels)))


def is_oom_error(exc: BaseException) -> bool:
    """True for out-of-memory errors of CUDA (and MPS) that a smaller batch may avoid."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class BatchLimit:
    """The largest batch size that fits; lowered after out-of-memory errors and kept.

    Shared by the threads of a worker: :meth:`lower` only ever lowers it, under a lock, so
    a thread that saw an older, larger size cannot raise it back.
    """

    size: int
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def lower(self, failed: int) -> int:
        """Record that ``failed`` samples did not fit; return the new size (at most ``failed // 2``)."""
        with self._lock:
            self.size = max(1, min(self.size, failed // 2))
            return self.size


def run_batched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    limit: BatchLimit,
) -> torch.Tensor:
    """Apply ``fn`` to ``x`` in chunks of at most ``limit.size`` samples and concatenate.

    On an out-of-memory error the chunk size is halved (and remembered in
    ``limit``) and the chunk retried; at size 1 the error is raised as a
    :class:`ModelError`.
    """
    n = int(x.shape[0])
    outs: list[torch.Tensor] = []
    i = 0
    while i < n:
        size = max(1, limit.size)
        try:
            out = fn(x[i : i + size])
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            if size <= 1:
                raise ModelError(
                    "out of memory even with batch size 1: use a smaller model, model.device: cpu, "
                    "or free GPU memory"
                ) from exc
            new = limit.lower(size)
            log.warning("out of memory with batch size %d; retrying with %d", size, new)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        outs.append(out)
        i += size
    if not outs:
        return fn(x)
    return torch.cat(outs, dim=0)
