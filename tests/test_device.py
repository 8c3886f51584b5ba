"""Device, precision and batch policy, including out-of-memory retries."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError, ModelError
from pipeline.inference.options import InferenceOptions, planned_precision
from pipeline.model import device as device_mod
from pipeline.model.device import (
    BatchLimit,
    auto_batch_size,
    autocast,
    configure_cuda,
    cuda_bf16_supported,
    device_stream,
    is_oom_error,
    pad_batch,
    pads_batches,
    resolve_device,
    resolve_precision,
    run_batched,
    upload,
    use_channels_last,
)


class FakeOomConv(torch.nn.Module):
    """A convolution that raises CUDA's out-of-memory error for batches above ``max_batch``."""

    def __init__(self, max_batch: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)
        self.max_batch = max_batch
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(x.shape[0]))
        if x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.conv(x)


def test_auto_device_falls_back_to_cpu_here() -> None:
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


def test_precision_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(device_mod, "cuda_bf16_supported", lambda device: True)
    assert resolve_precision("auto", cuda) == "bf16"  # native bf16: float32's range, no overflow
    assert resolve_precision("fp16", cuda) == "fp16"  # kept when asked for
    monkeypatch.setattr(device_mod, "cuda_bf16_supported", lambda device: False)
    assert resolve_precision("auto", cuda) == "fp16"  # GPUs before compute capability 8.0
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    assert use_channels_last(cpu, "fp32")  # the CPU default
    assert use_channels_last(cuda, "fp16") and not use_channels_last(cuda, "fp32")


def test_bf16_autocast_changes_compute_dtype_on_cpu() -> None:
    lin = torch.nn.Linear(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_auto_batch_size_scales_with_tile_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert auto_batch_size(cpu, 128) >= 1
    assert auto_batch_size(cpu, 64) == 4 * auto_batch_size(cpu, 128)
    assert auto_batch_size(cpu, 4096) == 1


def test_out_of_memory_halves_the_batch_and_gives_identical_results() -> None:
    x = torch.randn(13, 3, 16, 16)
    model = FakeOomConv(max_batch=3).eval()
    with torch.no_grad():
        reference = torch.cat([model.conv(x[i : i + 1]) for i in range(len(x))])
        limit = BatchLimit(16)
        out = run_batched(model, x, limit)
    assert limit.size == 2  # 16 -> 8 -> 4 -> 2, and remembered
    assert model.seen[:4] == [13, 8, 4, 2]
    assert max(model.seen[3:]) <= 2
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    model.seen.clear()
    with torch.no_grad():
        run_batched(model, x, limit)
    assert max(model.seen) == 2  # the lowered limit is kept for later batches


def test_out_of_memory_at_batch_one_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="batch size 1"), torch.no_grad():
        run_batched(FakeOomConv(max_batch=0), torch.randn(4, 3, 8, 8), BatchLimit(4))


def test_other_errors_are_not_retried() -> None:
    def boom(_: torch.Tensor) -> torch.Tensor:
        raise ValueError("shape mismatch")

    limit = BatchLimit(8)
    with pytest.raises(ValueError, match="shape mismatch"):
        run_batched(boom, torch.zeros(8, 1), limit)
    assert limit.size == 8
    assert is_oom_error(RuntimeError("MPS backend out of memory"))
    assert not is_oom_error(RuntimeError("expected 4 channels"))


def test_a_thread_that_saw_a_larger_batch_cannot_raise_the_limit_back() -> None:
    """Two threads fail at once: one with 16 samples, one (already lowered) with 4.

    Whatever the order, the shared limit ends at the smaller size.
    """
    import threading

    for order in ((16, 4), (4, 16)):
        limit = BatchLimit(16)
        barrier = threading.Barrier(2)

        def fail(size: int, barrier: threading.Barrier = barrier, limit: BatchLimit = limit) -> None:
            barrier.wait()
            limit.lower(size)

        threads = [threading.Thread(target=fail, args=(s,)) for s in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert limit.size == 2, order
    assert BatchLimit(3).lower(1) == 1  # never below one sample


def test_bf16_support_is_asked_of_the_gpu_without_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert cuda_bf16_supported(torch.device("cuda"))
    assert asked == [False]  # emulated bf16 on older GPUs is slow: fp16 there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not cuda_bf16_supported(torch.device("cuda"))


def test_the_main_process_tells_the_precision_without_torch_where_it_can() -> None:
    cpu = torch.device("cpu")
    for device, precision, expected in [("cpu", "auto", resolve_precision("auto", cpu)), ("mps", "auto", "fp32"),
                                        ("cuda", "auto", "auto"), ("auto", "auto", "auto"), ("cuda", "fp16", "fp16"),
                                        ("auto", "fp32", "fp32"), ("cpu", "bf16", "bf16")]:
        assert planned_precision(InferenceOptions(device=device, precision=precision)) == expected  # type: ignore[arg-type]


def test_cuda_settings_turn_off_autotuning_and_tf32_in_fp32() -> None:
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        configure_cuda("bf16")
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        configure_cuda("fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


def test_padding_gives_every_chunk_the_same_shape_and_the_same_results() -> None:
    assert pads_batches(torch.device("cuda")) and not pads_batches(torch.device("cpu"))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 1, 3, padding=1).eval()
    x = torch.randn(11, 3, 8, 8)
    valid = torch.rand(11, 8, 8) > 0.3
    seen: list[tuple[int, int]] = []
    masks: list[torch.Tensor] = []

    def fn(chunk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seen.append((int(chunk.shape[0]), int(v.shape[0])))
        masks.append(v.clone())
        return conv(chunk)[:, 0] * v

    with torch.no_grad():
        plain = run_batched(fn, (x, valid), BatchLimit(4))
        assert seen == [(4, 4), (4, 4), (3, 3)]
        seen.clear()
        padded = run_batched(fn, (x, valid), BatchLimit(4), pad=True)
    assert seen == [(4, 4)] * 3  # the last chunk of 3 went through as 4
    assert not masks[-1][3].any()  # the padding sample is invalid: never checked, never kept
    assert padded.shape == (11, 8, 8)
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-6)
    full = x[:4]
    assert pad_batch(full, 4) is full  # nothing to pad
    assert torch.equal(pad_batch(x[:3], 5)[3:], torch.zeros(2, 3, 8, 8))


def test_padding_and_out_of_memory_halving_together() -> None:
    x = torch.randn(7, 3, 16, 16)
    model = FakeOomConv(max_batch=2).eval()
    with torch.no_grad():
        reference = torch.cat([model.conv(x[i : i + 1]) for i in range(len(x))])
        limit = BatchLimit(4)
        out = run_batched(model, x, limit, pad=True)
    assert limit.size == 2 and model.seen[0] == 4 and set(model.seen[1:]) == {2}  # 7 = 2 + 2 + 2 + 1 (+1 pad)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_uploads_and_streams_are_free_on_the_cpu() -> None:
    import numpy as np

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = upload(a, torch.device("cpu"))
    assert t.data_ptr() == a.ctypes.data  # shared, not copied
    with device_stream(torch.device("cpu")):
        assert upload(a, torch.device("cpu")).sum() == a.sum()


def test_auto_batch_size_on_a_gpu_shares_the_memory_among_the_threads(monkeypatch) -> None:
    """Each thread of a GPU worker runs its own batch: the auto batch size divides the budget (half
    the free memory) by the threads, so that they do not all run out of memory at once."""
    import torch

    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    cuda = torch.device("cuda")
    one = auto_batch_size(cuda, 256, threads=1)
    four = auto_batch_size(cuda, 256, threads=4)
    assert one > 4 and four == pytest.approx(one / 4, abs=1)


def test_the_runtime_counts_the_threads_of_its_worker(client) -> None:
    from pipeline.inference.runtime import worker_threads

    assert worker_threads() == 1  # not in a worker
    assert client.submit(worker_threads, pure=False).result() == 2  # the module's worker has 2 threads
