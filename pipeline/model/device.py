"""Device, precision and batch-size policy for inference.

- :func:`resolve_device`: ``auto`` picks CUDA, then Apple MPS, then the CPU.
- :func:`resolve_precision`: ``auto`` is bfloat16 autocast on CUDA GPUs with
  native bf16 (compute capability 8.0 and later), float16 autocast on older
  ones, and float32 elsewhere. bfloat16 has float32's exponent range, so
  activations cannot overflow as they can in float16; ``fp16`` is kept when
  asked for. On the CPU, bfloat16 autocast pays only on processors with
  native bf16 instructions (AVX512-BF16 / AMX), and it moves probabilities
  and a few pixels across the threshold, so ``auto`` keeps float32 there;
  ``bf16`` can still be requested explicitly.
- :func:`configure_cuda`: no cuDNN autotuning, and no TF32 in float32, so that
  a float32 result depends on the input alone.
- :func:`use_channels_last`: channels_last (NHWC) convolutions: on the CPU in
  float32 they are faster than NCHW with the same masks, so they are on by
  default there; on CUDA with reduced precision.
- :func:`auto_batch_size`: a batch size from the device memory and tile size.
- :func:`run_batched`: runs a function over a batch in chunks; a CUDA
  out-of-memory error halves the chunk and retries, down to 1. Results are
  the same as for one pass because every sample is processed independently
  (models run in eval mode). On CUDA the last, partial chunk is padded to the
  chunk size (:func:`pads_batches`): every forward pass has the same shape,
  so cuDNN runs the same algorithms whatever the batch composition.
- :func:`upload` and :func:`device_stream`: host arrays go to the device from
  pinned memory without blocking, on one CUDA stream per thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
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
            return "bf16" if cuda_bf16_supported(device) else "fp16"
        if kind == "cpu":
            return CPU_AUTO_PRECISION
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"model.precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and kind == "cpu":
        raise ConfigError("model.precision: fp16 needs a GPU; on the CPU use bf16 or fp32")
    return precision  # type: ignore[return-value]


def cuda_bf16_supported(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes in bfloat16 natively (False without CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except (RuntimeError, AssertionError):  # pragma: no cover - driver trouble: fall back to fp16
        return False


def configure_cuda(precision: Precision) -> None:
    """Process-wide cuDNN and TF32 settings for inference on CUDA (see the module docstring).

    cuDNN autotuning (``benchmark``) is off: it picks algorithms by timing, which can differ
    between runs. In float32, TF32 is off for matrix products and convolutions: a float32 result
    does not depend on which kernel a shape gets. Reduced precision leaves TF32 as it is (only the
    float32 retries of :mod:`pipeline.inference.forward` would use it).
    """
    torch.backends.cudnn.benchmark = False
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


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


def auto_batch_size(device: torch.device, tile: int, in_channels: int = 14, threads: int = 1) -> int:
    """A sensible batch size: on CUDA from half the free memory, shared by the ``threads`` that may
    run the model at once (each holds its own batch's activations); a fixed small batch elsewhere."""
    pixels = tile * tile
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except RuntimeError:  # pragma: no cover - driver without mem_get_info
            free = 4 * 1024**3
        per_sample = pixels * (_CUDA_BYTES_PER_PIXEL + 8 * in_channels)
        return int(max(1, min(_MAX_AUTO_BATCH, (0.5 * free / max(1, threads)) // per_sample)))
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


def pads_batches(device: torch.device) -> bool:
    """Whether :func:`run_batched` pads the last chunk to the chunk size on ``device`` (CUDA only:
    on the CPU a sample's result does not depend on the batch shape, and padding costs time)."""
    return device.type == "cuda"


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with zero samples appended up to ``size`` samples (False for a boolean ``x``)."""
    extra = size - int(x.shape[0])
    if extra <= 0:
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])


def run_batched(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor | tuple[torch.Tensor, ...],
    limit: BatchLimit,
    *,
    pad: bool = False,
) -> torch.Tensor:
    """Apply ``fn`` to ``x`` in chunks of at most ``limit.size`` samples and concatenate.

    ``x`` is a tensor, or a tuple of tensors with the same first dimension that are cut alike and
    passed to ``fn`` as separate arguments. ``pad``: a shorter last chunk is padded with zeros
    (:func:`pad_batch`) to the chunk size and ``fn``'s output cut back to its samples. On an
    out-of-memory error the chunk size is halved (and remembered in ``limit``) and the chunk
    retried; at size 1 the error is raised as a :class:`ModelError`.
    """
    parts = x if isinstance(x, tuple) else (x,)
    n = int(parts[0].shape[0])
    outs: list[torch.Tensor] = []
    i = 0
    while i < n:
        size = max(1, limit.size)
        chunk = tuple(p[i : i + size] for p in parts)
        real = int(chunk[0].shape[0])
        if pad and real < size:
            chunk = tuple(pad_batch(c, size) for c in chunk)
        try:
            out = fn(*chunk)
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
        outs.append(out if int(out.shape[0]) == real else out[:real])
        i += real
    if not outs:
        return fn(*parts)
    return torch.cat(outs, dim=0)


def upload(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """``x`` as a tensor on ``device``: shared with ``x`` on the CPU; on CUDA copied once into
    pinned memory (PyTorch's caching host allocator reuses it once the copy is done) and sent
    without blocking on the current stream."""
    t = torch.from_numpy(x)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_STREAMS = threading.local()


@contextlib.contextmanager
def device_stream(device: torch.device) -> Iterator[None]:
    """Run the enclosed device work on this thread's own CUDA stream (a no-op elsewhere).

    The stream first waits for the device's default stream (model weights in place). Results
    copied to the host inside the block are complete when the copy returns.
    """
    if device.type != "cuda":
        yield
        return
    streams = getattr(_STREAMS, "by_device", None)
    if streams is None:
        streams = _STREAMS.by_device = {}
    key = str(device)
    stream = streams.get(key)
    if stream is None:
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.default_stream(device))
        streams[key] = stream
    with torch.cuda.stream(stream):
        yield
