"""The GPU code paths, run on the CPU with fakes: overflow under reduced precision, fixed batch
shapes, the device-side combination, the precision record, and the GPU benchmark without a GPU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
from test_inference import FIXED, Recorder, _art, _fixed_conv, _opts, _scene, _tiny_unet

from pipeline.core.errors import ModelError
from pipeline.inference import blocks, forward
from pipeline.inference.runtime import clear_model_cache
from pipeline.inference.tiled import precision_figures, predict
from pipeline.model import device as device_mod

ROOT = Path(__file__).resolve().parents[1]


class OverflowUnderAutocast(torch.nn.Module):
    """A convolution whose logits are infinite (NaN in ``nan_rows``) under autocast, as float16
    overflow makes them; finite in float32."""

    def __init__(self, nan_rows: int = 0) -> None:
        super().__init__()
        self.conv = _fixed_conv()
        self.nan_rows = nan_rows
        self.calls: list[bool] = []  # autocast on, per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        reduced = torch.is_autocast_enabled(x.device.type)
        self.calls.append(reduced)
        if reduced:
            out = out.clone()
            out[:, :, 5, 7] = float("inf")
            out[:, :, : self.nan_rows] = float("nan")
        return out


class NanInFloat32(torch.nn.Module):
    """NaN logits at one pixel of every window, whatever the precision: a broken model."""

    def __init__(self, row: int = 20) -> None:
        super().__init__()
        self.conv = _fixed_conv()
        self.row = row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x).clone()
        out[:, :, self.row, 3] = float("nan")
        return out


def _compute(arr: object) -> np.ndarray:
    with dask.config.set(scheduler="threads"):
        return np.asarray(arr.compute())  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _fresh_models() -> None:
    clear_model_cache()
    yield
    clear_model_cache()


def test_an_overflow_under_bf16_is_redone_in_fp32_with_a_warning(caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data, valid, grid = _scene(150, 170, seed=5)
    reference = _compute(predict(data, valid, grid, [_art(_fixed_conv().eval())],
                                 _opts(overlap=8, batch_size=4)).probability)
    model = OverflowUnderAutocast(nan_rows=2).eval()
    monkeypatch.setitem(forward._REDONE, "chunks", 0)  # as in a fresh worker
    before = forward.redone_chunks()
    with caplog.at_level(logging.WARNING, logger="pipeline.inference.forward"):
        out = _compute(predict(data, valid, grid, [_art(model, name="overflowing")],
                               _opts(overlap=8, precision="bf16", batch_size=4)).probability)
    assert not np.isnan(out).any()  # no holes
    np.testing.assert_array_equal(out, reference)  # every chunk redone: the float32 result, bit for bit
    redone = forward.redone_chunks() - before
    assert redone == model.calls.count(True) and redone > 1
    assert model.calls.count(False) == redone  # each chunk once more, in float32
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warnings and "overflowing" in warnings[0] and "bf16" in warnings[0] and "float32" in warnings[0]
    assert len(warnings) <= 2  # the first chunk, and at 10 chunks: not one per chunk


def test_non_finite_outputs_in_fp32_are_a_model_error_naming_the_model() -> None:
    data, valid, grid = _scene(100, 100, seed=2)
    with pytest.raises(ModelError, match="model broken-net gave non-finite outputs .* in float32"):
        _compute(predict(data, valid, grid, [_art(NanInFloat32(), name="broken-net")], _opts(overlap=8)).probability)
    with pytest.raises(ModelError, match="in bf16 and again in float32"):
        _compute(predict(data, valid, grid, [_art(NanInFloat32(), name="broken-net")],
                         _opts(overlap=8, precision="bf16")).probability)


def test_non_finite_outputs_on_invalid_pixels_only_are_harmless() -> None:
    mask = np.ones((64, 64), bool)
    mask[20, 3] = False  # where the model's NaN lands (one window covers the scene)
    data, valid, grid = _scene(64, 64, valid=mask, seed=2)
    out = _compute(predict(data, valid, grid, [_art(NanInFloat32())], _opts(overlap=8)).probability)
    assert np.isnan(out[20, 3]) and np.isfinite(np.delete(out.ravel(), 20 * 64 + 3)).all()


def test_padding_the_last_chunk_as_on_cuda_keeps_the_results(monkeypatch: pytest.MonkeyPatch) -> None:
    data, valid, grid = _scene(200, 230, seed=8)
    art = _art(_tiny_unet(), normalization=FIXED)
    opts = _opts(overlap=16, block_size=128, batch_size=5, tta=True, uncertainty=True)
    plain = Recorder(art.module)
    ref = predict(data, valid, grid, [_art(plain, normalization=FIXED)], opts)
    ref_p, ref_u = _compute(ref.probability), _compute(ref.uncertainty)
    assert len({len(b) for b in plain.batches}) > 1  # the CPU runs short last chunks as they are
    clear_model_cache()
    rec = Recorder(art.module)
    monkeypatch.setattr(device_mod, "pads_batches", lambda device: True)  # what CUDA does
    pred = predict(data, valid, grid, [_art(rec, normalization=FIXED)], opts)
    out_p, out_u = _compute(pred.probability), _compute(pred.uncertainty)
    assert {len(b) for b in rec.batches} == {5}  # every forward pass has the batch size's shape
    assert rec.samples > plain.samples  # the padding samples
    np.testing.assert_allclose(out_p, ref_p, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out_u, ref_u, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ensemble", ["mean", "vote"])
def test_combining_on_the_device_matches_the_host(monkeypatch: pytest.MonkeyPatch, ensemble: str) -> None:
    data, valid, grid = _scene(180, 190, seed=9)
    torch.manual_seed(5)
    arts = [_art(_tiny_unet(), normalization=FIXED, threshold=0.4), _art(_fixed_conv().eval(), threshold=0.6)]
    opts = _opts(overlap=8, tta=True, uncertainty=True, ensemble=ensemble, weights=(0.25, 0.75))
    host = predict(data, valid, grid, arts, opts)
    host_p, host_u = _compute(host.probability), _compute(host.uncertainty)
    monkeypatch.setattr(blocks, "combines_on_host", lambda device: False)  # what a GPU does
    dev = predict(data, valid, grid, arts, opts)
    np.testing.assert_allclose(_compute(dev.probability), host_p, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_compute(dev.uncertainty), host_u, rtol=0, atol=1e-6)
    assert 0 < np.nanmean(host_p) < 1


def test_the_run_can_record_the_precision_used_and_the_chunks_redone() -> None:
    from distributed import Client, LocalCluster

    data, valid, grid = _scene(130, 130, seed=3)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        plain = predict(data, valid, grid, [_art(_fixed_conv().eval())], _opts(overlap=8))
        assert plain.precision == "fp32"  # told in the main process, without torch
        plain.probability.compute()
        assert precision_figures(client, plain, flush=True) == {"precision": "fp32", "chunks_redone_fp32": 0}
        hot = predict(data, valid, grid, [_art(OverflowUnderAutocast())], _opts(overlap=8, precision="bf16",
                                                                                batch_size=3))
        hot.probability.compute()
        figures = precision_figures(client, hot, flush=True)
    assert figures["precision"] == "bf16" and figures["chunks_redone_fp32"] >= 3
    assert precision_figures(None, hot) == {"precision": "bf16", "chunks_redone_fp32": None}  # no scheduler


def test_the_gpu_benchmark_says_there_is_no_gpu_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], capture_output=True,
                         text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "no CUDA GPU" in res.stdout


def test_bf16_moves_the_default_model_little_on_real_patches(shared_data: Path) -> None:
    """bf16 against fp32 through the inference's forward pass on the CPU (the figures for all
    patches are in docs/gpu.md, from ``bench_gpu.py --cpu-bf16``)."""
    from pipeline.inference.forward import forward_probs
    from pipeline.inference.runtime import Runtime
    from pipeline.model.artefact import load_artefact
    from pipeline.model.device import BatchLimit
    from pipeline.model.normalization import level_spec, normalize
    from pipeline.training.patch_files import find_patches
    from pipeline.training.patch_readers import load_patch

    folder = shared_data / "l4s" / "train"
    if not folder.is_dir():
        pytest.skip(f"no Landslide4Sense patches at {folder}")
    art = load_artefact(ROOT / "pipeline" / "models" / "default.safetensors")
    patches = [load_patch(r, art.channels) for r in find_patches(folder)[:5]]
    v = np.stack([p.valid for p in patches])
    x = normalize(np.stack([p.image for p in patches]).astype(np.float32), v, level_spec(art.normalization, None),
                  finite=True)
    cpu = torch.device("cpu")
    module = art.module.eval().to(memory_format=torch.channels_last)
    probs = {p: forward_probs(module, x, Runtime(cpu, p, True, BatchLimit(8)), ("identity",), valid=v)[0].numpy()
             for p in ("fp32", "bf16")}
    dp = np.abs(probs["bf16"] - probs["fp32"])[v]
    flips = ((probs["bf16"] >= art.threshold) != (probs["fp32"] >= art.threshold))[v]
    assert 0 < dp.max() < 0.03  # bf16 keeps about 3 significant digits
    assert flips.mean() < 5e-4  # a few pixels next to the threshold at most
