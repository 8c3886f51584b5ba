"""Device, precision and batch policy, including out-of-memory retries."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError, ModelError
from pipeline.model.device import (
    BatchLimit,
    auto_batch_size,
    autocast,
    is_oom_error,
    resolve_device,
    resolve_precision,
    run_batched,
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


def test_precision_policy() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", cuda) == "fp16"
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

        def fail(size: int) -> None:
            barrier.wait()
            limit.lower(size)

        threads = [threading.Thread(target=fail, args=(s,)) for s in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert limit.size == 2, order
    assert BatchLimit(3).lower(1) == 1  # never below one sample
