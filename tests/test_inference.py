"""Tiled inference: seamless stitching, skipped windows, block layout, schedulers, ensembles."""

from __future__ import annotations

import threading
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

from pipeline.core.channels import L4S_CHANNELS
from pipeline.core.errors import ChannelError, ConfigError, GridError, InputError
from pipeline.core.grid import Grid
from pipeline.inference.options import TTA_TRANSFORMS, InferenceOptions
from pipeline.inference.runtime import clear_model_cache
from pipeline.inference.tiled import predict
from pipeline.inference.write import write_prediction, write_probability
from pipeline.model.artefact import MissingChannelsError, ModelArtefact, save_artefact
from pipeline.model.registry import build_model
from tiling.windows import WindowGrid

CHANNELS = list(L4S_CHANNELS)
NONE = {"method": "none"}
#: fixed statistics of the synthetic scenes' values (uniform in [0.5, 1.5])
FIXED = {"method": "fixed", "mean": [1.0 - 0.01 * i for i in range(14)], "std": [0.3 + 0.02 * i for i in range(14)],
         "clip": 10.0}


# -- helpers ---------------------------------------------------------------------
def _opts(**kw: object) -> InferenceOptions:
    """Options on the CPU unless ``device`` says otherwise: the references below are float32 CPU
    results, and ``device: auto`` would pick CUDA (and bf16 or fp16) where there is one."""
    kw.setdefault("device", "cpu")
    return InferenceOptions(**kw)  # type: ignore[arg-type]


CPU = _opts()


def _grid(height: int, width: int) -> Grid:
    return Grid(CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), width, height)


def _scene(
    height: int,
    width: int,
    valid: np.ndarray | None = None,
    seed: int = 0,
    chunks: int = 256,
    bands: list[str] | None = None,
) -> tuple[xr.DataArray, xr.DataArray, Grid]:
    bands = bands or CHANNELS
    rng = np.random.default_rng(seed)
    arr = rng.random((len(bands), height, width), dtype=np.float32) + 0.5
    mask = np.ones((height, width), bool) if valid is None else valid
    arr[:, ~mask] = np.nan
    data = xr.DataArray(
        da.from_array(arr, chunks=(-1, chunks, chunks)), dims=("band", "y", "x"), coords={"band": bands}
    )
    vmask = xr.DataArray(da.from_array(mask, chunks=(chunks, chunks)), dims=("y", "x"))
    return data, vmask, _grid(height, width)


def _art(module: torch.nn.Module, tile: int = 64, normalization: dict | None = None, **kw: object) -> ModelArtefact:
    return ModelArtefact(
        "PlainUnet", None, CHANNELS, normalization=normalization or dict(NONE), tile_size=tile,
        module=module.eval(), **kw,  # type: ignore[arg-type]
    )


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


class Constant(torch.nn.Module):
    """Predicts the same probability everywhere."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.logit = _logit(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[-2:]), self.logit)


class Recorder(torch.nn.Module):
    """Wraps a module and records every input batch."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.batches.append(x.detach().clone())
        return self.inner(x)

    @property
    def samples(self) -> int:
        return sum(len(b) for b in self.batches)


def _fixed_conv() -> torch.nn.Conv2d:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(14, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(0.5)
    return conv


def _tiny_unet() -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model("PlainUnet", None, 14, base_channels=4, depth=2)


def _compute(arr: xr.DataArray) -> np.ndarray:
    with dask.config.set(scheduler="threads"):
        return np.asarray(arr.compute())


# -- stitching -------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0, 9, 32])
def test_constant_model_gives_constant_raster_without_seams_or_dark_edges(overlap: int) -> None:
    data, valid, grid = _scene(300, 500)
    pred = predict(data, valid, grid, [_art(Constant(0.3))], _opts(overlap=overlap, block_size=128))
    out = _compute(pred.probability)
    assert out.shape == (300, 500) and out.dtype == np.float32
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_translation_equivariant_model_matches_whole_scene_prediction() -> None:
    data, valid, grid = _scene(300, 410, seed=4)
    conv = _fixed_conv().eval()
    with torch.no_grad():
        whole = torch.sigmoid(conv(torch.from_numpy(np.asarray(data.values))[None]))[0, 0].numpy()
    # receptive field radius 1 < blend margin (overlap 12 -> margin 3)
    opts = _opts(overlap=12, block_size=100, batch_size=7)
    out = _compute(predict(data, valid, grid, [_art(conv)], opts).probability)
    np.testing.assert_allclose(out[1:-1, 1:-1], whole[1:-1, 1:-1], atol=1e-5)
    # without overlap, window edges show zero-padding seams: the comparison above can fail
    seams = _compute(predict(data, valid, grid, [_art(conv)], _opts(overlap=0)).probability)
    assert np.abs(seams[1:-1, 1:-1] - whole[1:-1, 1:-1]).max() > 1e-3


def test_invalid_pixels_are_nan_and_valid_ones_are_probabilities() -> None:
    mask = np.ones((200, 260), bool)
    mask[50:90, 30:200] = False
    data, valid, grid = _scene(200, 260, valid=mask)
    out = _compute(predict(data, valid, grid, [_art(_tiny_unet(), normalization=None)], CPU).probability)
    assert np.array_equal(np.isnan(out), ~mask)
    assert np.all((out[mask] >= 0) & (out[mask] <= 1))


# -- skipped windows -------------------------------------------------------------------
def test_windows_without_valid_pixels_are_never_sent_to_the_model() -> None:
    mask = np.zeros((256, 384), bool)
    mask[10:40, 300:330] = True
    mask[200, 5] = True
    data, valid, grid = _scene(256, 384, valid=mask)
    rec = Recorder(Constant(0.7))
    opts = _opts(overlap=16, block_size=96)
    out = _compute(predict(data, valid, grid, [_art(rec)], opts).probability)
    wg = WindowGrid(256, 384, 64, 16)
    expected = sum(mask[r : r + 64, c : c + 64].any() for r, c in wg.windows())
    assert 0 < expected < len(wg)
    # each window with valid pixels is computed once, by the block holding its origin; none without
    assert rec.samples == expected
    for batch in rec.batches:
        assert torch.all(batch.flatten(1).abs().amax(dim=1) > 0)  # invalid pixels arrive as 0
    rec.batches.clear()
    single_block = _opts(overlap=16, block_size=4096)
    _compute(predict(data, valid, grid, [_art(rec)], single_block).probability)
    assert rec.samples == expected
    np.testing.assert_allclose(out[mask], 0.7, atol=1e-6)
    assert np.isnan(out[~mask]).all()


def test_scene_without_valid_pixels_never_calls_the_model() -> None:
    data, valid, grid = _scene(150, 150, valid=np.zeros((150, 150), bool))
    rec = Recorder(Constant(0.5))
    out = _compute(predict(data, valid, grid, [_art(rec)], CPU).probability)
    assert rec.samples == 0 and np.isnan(out).all()


# -- scene shapes --------------------------------------------------------------------
@pytest.mark.parametrize(("height", "width"), [(1, 1), (100, 300), (64, 65), (129, 63)])
def test_small_and_odd_scenes_are_fully_covered(height: int, width: int) -> None:
    data, valid, grid = _scene(height, width)
    out = _compute(predict(data, valid, grid, [_art(_tiny_unet(), normalization=None)], CPU).probability)
    assert out.shape == (height, width)
    assert np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1))


def test_full_sentinel2_tile_builds_lazily_and_computes_a_few_blocks() -> None:
    n = 10980
    data = xr.DataArray(
        da.random.default_rng(0).random((14, n, n), chunks=(14, 2048, 2048), dtype=np.float32),
        dims=("band", "y", "x"), coords={"band": CHANNELS},
    )
    valid = xr.DataArray(da.ones((n, n), bool, chunks=2048), dims=("y", "x"))
    rec = Recorder(Constant(0.25))
    pred = predict(data, valid, _grid(n, n), [_art(rec, tile=128)], _opts(overlap=32, block_size=512))
    assert pred.probability.shape == (n, n)
    assert rec.samples == 0  # nothing computed yet
    assert pred.windows == WindowGrid(n, n, 128, 32).__len__()
    corner = _compute(pred.probability[:40, :40])
    last = _compute(pred.probability[-3:, -5:])
    np.testing.assert_allclose(corner, 0.25, atol=1e-6)
    np.testing.assert_allclose(last, 0.25, atol=1e-6)
    # 480 px blocks (stride 96) own 5 x 5 windows: the corner needs its block; the last pixels need
    # theirs and the three before it, whose last windows reach into it
    assert 0 < rec.samples <= 5 * 25


# -- layout and scheduler independence ----------------------------------------------------
def test_results_do_not_depend_on_block_size() -> None:
    data, valid, grid = _scene(300, 330, seed=7)
    art = _art(_tiny_unet(), normalization=FIXED)
    outs = [
        _compute(predict(data, valid, grid, [art], _opts(overlap=24, block_size=b)).probability)
        for b in (80, 200, 4096)
    ]
    assert np.isfinite(outs[0]).all()
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], rtol=0, atol=1e-6)


class ArrayReader:
    """A window reader over an in-memory stack that counts its reads."""

    def __init__(self, arr: np.ndarray, names: list[str] | None = None) -> None:
        self.arr = arr
        self.shape = arr.shape
        self.names = names or CHANNELS
        self.reads: list[tuple[int, int, int, int]] = []
        self._lock = threading.Lock()

    def read(self, bands: list[int], window: rasterio.windows.Window) -> np.ndarray:
        r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        with self._lock:
            self.reads.append((r0, c0, h, w))
        return self.arr[bands, r0 : r0 + h, c0 : c0 + w].copy()


@pytest.mark.parametrize(("with_mask", "normalization", "reordered"), [
    # a model reading the channels in another order than the stack's: each batch of windows is
    # normalized (the block is not normalized in place)
    (False, FIXED, True),
    (True, FIXED, True),
    # one model reading every channel in the stack's order: a block read for its task alone is
    # normalized whole, before its windows are cut; the windows get the same values as when each
    # batch is normalized
    (True, {"method": "fixed", "mean": [0.1 * i for i in range(14)], "std": [0.5 + 0.1 * i for i in range(14)],
            "clip": 1.5}, False),
    (True, {"method": "none"}, False),
])
def test_a_window_reader_gives_the_same_raster_with_one_read_per_block(
    with_mask: bool, normalization: dict, reordered: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    mask = np.ones((300, 330), bool)
    if with_mask:  # the pixels are missing there too, as a stack's are outside its mask
        mask[40:90, 200:260] = False
    data, valid, grid = _scene(300, 330, valid=mask if with_mask else None, seed=4, chunks=96)
    if with_mask:  # and pixels the mask excludes although their bands have values (clouds, an AOI)
        mask[150:170, 20:90] = False
        valid = xr.DataArray(da.from_array(mask, chunks=96), dims=("y", "x"))
    art = _art(_tiny_unet(), normalization=normalization)
    if reordered:
        art = ModelArtefact("PlainUnet", None, CHANNELS[::-1], normalization=normalization, tile_size=64,
                            module=_tiny_unet().eval())
    opts = _opts(overlap=16, block_size=96)
    keep = ["DEM", "B02"]
    ref = predict(data, valid if with_mask else None, grid, [art], opts, keep=keep)
    reader = ArrayReader(np.asarray(data.data))
    import pipeline.inference.blocks as blocks

    shapes: list[tuple[int, ...]] = []
    real_normalize = blocks.normalize

    def recording(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        shapes.append(tuple(x.shape))
        return real_normalize(x, *args, **kwargs)

    monkeypatch.setattr(blocks, "normalize", recording)
    pred = predict(data, valid if with_mask else None, grid, [art], opts, keep=keep, reader=reader)
    out = _compute(pred.probability)
    monkeypatch.setattr(blocks, "normalize", real_normalize)
    # whole blocks (each block with windows to run) when one model reads the block's channels as they
    # are, batches of 64 px windows otherwise
    blockwise = [s for s in shapes if s[0] == 1 and s[2:] != (64, 64)]
    if reordered:
        assert not blockwise and shapes and all(s[1:] == (14, 64, 64) for s in shapes)
    else:
        assert shapes == blockwise and 0 < len(blockwise) <= len(reader.reads)
    # one read per block (4 x 4 blocks of 96 px, stride 48), each the block plus its windows' reach
    assert len(reader.reads) == 16
    assert len(set(reader.reads)) == 16
    assert all(h <= 96 + 64 and w <= 96 + 64 for _, _, h, w in reader.reads)
    np.testing.assert_array_equal(out, _compute(ref.probability))
    assert np.isnan(out[~mask]).all() and np.isfinite(out[mask]).all()
    for name in keep:  # passed through as read, not normalized
        np.testing.assert_array_equal(_compute(pred.layers[name]), _compute(ref.layers[name]))
    with pytest.raises(GridError, match="reader"):
        predict(data, None, grid, [art], opts, reader=ArrayReader(np.zeros((14, 10, 10), np.float32)))
    with pytest.raises(InputError, match="reader's bands"):  # the same bands in another order
        predict(data.isel(band=slice(None, None, -1)), None, grid, [art], opts, reader=reader)


def test_band_order_and_extra_bands_do_not_matter() -> None:
    data, valid, grid = _scene(120, 140, seed=2)
    art = _art(_tiny_unet(), normalization=None)
    ref = _compute(predict(data, valid, grid, [art], CPU).probability)
    shuffled = xr.concat([data.isel(band=slice(None, None, -1)), data.isel(band=[0]).assign_coords(band=["B8A"])],
                         dim="band")
    out = _compute(predict(shuffled, valid, grid, [art], CPU).probability)
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.slow
def test_threaded_and_multiprocess_cluster_give_the_same_raster(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    import pipeline.inference.runtime as runtime

    saved = save_artefact(
        tmp_path / "tiny.safetensors", _tiny_unet(),
        {"architecture": "PlainUnet", "encoder": None, "arch_kwargs": {"base_channels": 4, "depth": 2},
         "channels": CHANNELS, "normalization": FIXED, "tile_size": 64,
         "threshold": 0.5, "version": "1"},
    )
    data, valid, grid = _scene(200, 230, seed=5, chunks=100)
    pred = predict(data, valid, grid, [saved], _opts(overlap=16, block_size=96))
    threaded = _compute(pred.probability)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        distributed = np.asarray(client.compute(pred.probability.data).result())
        cached = client.run(lambda: len(runtime._CACHE))
    np.testing.assert_allclose(distributed, threaded, rtol=0, atol=1e-6)
    # each worker process that ran blocks loaded the model once (one may have run none: scheduling)
    assert 1 in cached.values() and set(cached.values()) <= {0, 1}, cached


# -- models, channels, options -----------------------------------------------------------
def test_missing_channels_are_refused_by_name() -> None:
    bands = [c for c in CHANNELS if c not in ("SLOPE", "DEM")]
    data, valid, grid = _scene(64, 64, bands=bands)
    with pytest.raises(MissingChannelsError, match="SLOPE, DEM") as info:
        predict(data, valid, grid, [_art(Constant(0.5))], CPU)
    assert isinstance(info.value, ChannelError)


def test_shape_mismatch_and_bad_overlap_are_refused() -> None:
    data, valid, grid = _scene(64, 64)
    with pytest.raises(GridError):
        predict(data, valid, _grid(64, 65), [_art(Constant(0.5))], CPU)
    with pytest.raises(ConfigError, match="overlap"):
        predict(data, valid, grid, [_art(Constant(0.5))], _opts(overlap=64))


def test_tta_averages_transformed_predictions_and_reports_spread() -> None:
    data, valid, grid = _scene(64, 64, seed=9)  # one window: no blending involved
    conv = _fixed_conv().eval()
    opts = _opts(tta=True, uncertainty=True)
    pred = predict(data, valid, grid, [_art(conv)], opts)
    x = torch.from_numpy(np.asarray(data.values))[None]
    with torch.no_grad():
        members = [inv(torch.sigmoid(conv(fwd(x))))[0, 0].numpy() for fwd, inv in
                   (TTA_TRANSFORMS[name] for name in opts.tta_transforms)]
    np.testing.assert_allclose(_compute(pred.probability), np.mean(members, axis=0), atol=1e-6)
    assert pred.uncertainty is not None
    np.testing.assert_allclose(_compute(pred.uncertainty), np.std(members, axis=0), atol=1e-6)
    assert float(np.std(members, axis=0).max()) > 1e-3  # the conv is not symmetric: spread is real


def test_ensemble_mean_vote_and_uncertainty() -> None:
    data, valid, grid = _scene(100, 90)
    members = [_art(Constant(0.2), threshold=0.5), _art(Constant(0.8), threshold=0.5)]
    mean = predict(data, valid, grid, members, _opts(weights=(1.0, 3.0), uncertainty=True))
    np.testing.assert_allclose(_compute(mean.probability), 0.65, atol=1e-6)
    assert mean.uncertainty is not None
    np.testing.assert_allclose(_compute(mean.uncertainty), 0.3, atol=1e-6)
    vote = predict(data, valid, grid, members, _opts(ensemble="vote", weights=(1.0, 3.0)))
    np.testing.assert_allclose(_compute(vote.probability), 0.75, atol=1e-6)
    assert vote.uncertainty is None and vote.threshold == 0.5


def test_out_of_memory_in_inference_halves_batch_with_identical_result() -> None:
    class OomAbove(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, limit: int) -> None:
            super().__init__()
            self.inner, self.limit = inner, limit

            self.failures = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > self.limit:
                self.failures += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return self.inner(x)

    clear_model_cache()
    data, valid, grid = _scene(200, 200, seed=11)
    conv = _fixed_conv()
    opts = _opts(overlap=16, batch_size=16)
    ref = _compute(predict(data, valid, grid, [_art(conv)], opts).probability)
    clear_model_cache()
    oom = OomAbove(conv, 3)
    out = _compute(predict(data, valid, grid, [_art(oom)], opts).probability)
    assert oom.failures >= 3  # 16 -> 8 -> 4 -> 2
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    clear_model_cache()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_a_model_in_memory_stays_on_its_device_when_the_inference_runs_elsewhere() -> None:
    """The inference runs a copy on the GPU: the caller's module stays on the CPU, and the result
    in float32 (TF32 off) is the CPU's up to rounding."""
    data, valid, grid = _scene(100, 120, seed=6)
    conv = _fixed_conv().eval()
    ref = _compute(predict(data, valid, grid, [_art(conv)], CPU).probability)
    clear_model_cache()
    out = _compute(predict(data, valid, grid, [_art(conv)], _opts(device="cuda", precision="fp32")).probability)
    clear_model_cache()
    assert {p.device.type for p in conv.parameters()} == {"cpu"}
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_reduced_precision_on_a_gpu_agrees_with_float32(precision: str) -> None:
    """bf16/fp16 move probabilities by rounding, not by holes: the same valid pixels, probabilities
    within a tolerance that fits half precision, the masks at the threshold nearly all the same."""
    data, valid, grid = _scene(300, 330, seed=7)
    art = _art(_tiny_unet(), normalization=FIXED)
    ref = _compute(predict(data, valid, grid, [art], _opts(overlap=24, tta=True)).probability)
    clear_model_cache()
    out = _compute(predict(data, valid, grid, [art], _opts(device="cuda", precision=precision, overlap=24,
                                                           tta=True)).probability)
    clear_model_cache()
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-2)
    assert np.mean((out >= 0.5) != (ref >= 0.5)) < 0.01


@needs_cuda
def test_results_on_a_gpu_do_not_depend_on_block_size_or_batch_composition() -> None:
    """Fixed batch shapes (the last chunk padded), no cuDNN autotuning, no TF32 in float32."""
    data, valid, grid = _scene(300, 330, seed=7)
    art = _art(_tiny_unet(), normalization=FIXED)
    outs = []
    for block in (80, 200, 4096):
        outs.append(_compute(predict(data, valid, grid, [art], _opts(device="cuda", precision="fp32", overlap=24,
                                                                     block_size=block, batch_size=8)).probability))
        clear_model_cache()
    for other in outs[1:]:  # as on the CPU: the blend adds strips in another order
        np.testing.assert_allclose(other, outs[0], rtol=0, atol=1e-6)


def test_options_from_config_section() -> None:
    from pipeline.core.config import ModelSection

    section = ModelSection(path=[Path("a.safetensors"), Path("b.safetensors")], weights=[1.0, 2.0],
                           ensemble="vote", overlap=16, batch_size=8, tta=True, uncertainty=True)
    opts = InferenceOptions.from_config(section, block_size=1024)
    assert (opts.overlap, opts.batch_size, opts.ensemble, opts.weights) == (16, 8, "vote", (1.0, 2.0))
    assert opts.tta and opts.uncertainty and opts.block_size == 1024 and opts.device == "auto"


def test_prediction_is_georeferenced_and_written_as_cog(tmp_path: Path) -> None:
    mask = np.ones((100, 120), bool)
    mask[:10] = False
    data, valid, grid = _scene(100, 120, valid=mask)
    pred = predict(data, valid, grid, [_art(Constant(0.4))], CPU)
    assert pred.probability.rio.crs == grid.crs
    assert pred.grid == grid and pred.threshold == 0.5
    path = write_probability(pred, tmp_path / "prob.tif", dtype="uint8")
    with rasterio.open(path) as src:
        arr = src.read(1)
        assert src.nodata == 255 and src.crs == grid.crs and src.transform == grid.transform
    assert np.all(arr[:10] == 255)
    assert np.all(arr[10:] == round(0.4 * 254))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_writing_the_probability_runs_the_model_once_per_window(tmp_path: Path, dtype: str) -> None:
    """Nothing computes the lazy probability before the COG writer does (the uint8 scaling stays lazy)."""
    data, valid, grid = _scene(200, 230)
    rec = Recorder(Constant(0.3))
    pred = predict(data, valid, grid, [_art(rec)], _opts(overlap=16, block_size=4096))
    assert rec.samples == 0  # building the graph runs nothing
    with dask.config.set(scheduler="threads"):
        write_probability(pred, tmp_path / "p.tif", dtype=dtype)  # type: ignore[arg-type]
    assert rec.samples == pred.windows == len(WindowGrid(200, 230, 64, 16))


def test_probability_uncertainty_and_kept_layers_are_written_from_one_model_run(tmp_path: Path) -> None:
    """write_prediction stores the probability, the uncertainty and the kept input channels in one
    computation: every window runs once per augmentation, not once per file."""
    mask = np.ones((150, 170), bool)
    mask[:20, :30] = False
    data, valid, grid = _scene(150, 170, valid=mask, chunks=64)
    rec = Recorder(Constant(0.3))
    opts = _opts(overlap=16, block_size=96, tta=True, uncertainty=True)
    pred = predict(data, valid, grid, [_art(rec)], opts, keep=["DEM", "SLOPE"])
    assert list(pred.layers) == ["DEM", "SLOPE"] and rec.samples == 0
    with dask.config.set(scheduler="threads"):
        paths = write_prediction(pred, tmp_path / "p.tif", uncertainty_path=tmp_path / "u.tif",
                                 layers_path=tmp_path / "layers.tif")
    runs = len(WindowGrid(150, 170, 64, 16))  # every window has valid pixels
    assert rec.samples == runs * len(opts.tta_transforms)
    assert [p.name for p in paths] == ["p.tif", "u.tif", "layers.tif"]
    with rasterio.open(tmp_path / "layers.tif") as src:
        assert src.descriptions == ("DEM", "SLOPE") and src.transform == grid.transform
        kept = src.read()
    raw = np.asarray(data.sel(band=["DEM", "SLOPE"]).values)
    np.testing.assert_array_equal(kept, raw)  # passed through unchanged, NaN included
    with rasterio.open(tmp_path / "p.tif") as src:
        prob = src.read(1)
    assert np.all(prob[:20, :30] == 255) and np.all(prob[20:] == round(0.3 * 254))
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary left


def test_kept_channels_the_models_do_not_use_do_not_decide_validity() -> None:
    bands = [*CHANNELS, "EXTRA"]
    data, valid, grid = _scene(64, 80, bands=bands)
    extra = data.values.copy()
    extra[-1, :, :40] = np.nan  # the kept-only channel has no data on the left half
    data = data.copy(data=da.from_array(extra, chunks=(-1, 64, 64)))
    pred = predict(data, valid, grid, [_art(Constant(0.6))], CPU, keep=["EXTRA"])
    assert np.isfinite(_compute(pred.probability)).all()
    np.testing.assert_array_equal(_compute(pred.layers["EXTRA"]), extra[-1])
    with pytest.raises(InputError, match="NOPE"):
        predict(data, valid, grid, [_art(Constant(0.6))], CPU, keep=["NOPE"])


def test_a_missing_band_value_invalidates_the_pixel_without_a_mask() -> None:
    """With no valid mask, a pixel is predicted only where every band has a value."""
    data, _, grid = _scene(120, 130)
    arr = np.asarray(data.values).copy()
    arr[3, 40:50, 60:70] = np.nan
    data = data.copy(data=da.from_array(arr, chunks=(-1, 64, 64)))
    out = _compute(predict(data, None, grid, [_art(Constant(0.6))], CPU).probability)
    assert np.isnan(out[40:50, 60:70]).all()
    np.testing.assert_allclose(np.delete(out.ravel(), np.flatnonzero(np.isnan(out))), 0.6, atol=1e-6)
    assert np.isnan(out).sum() == 100


@pytest.mark.parametrize("with_reader", [False, True])
def test_coarse_means_of_input_channels_come_from_the_block_tasks(with_reader: bool) -> None:
    """``coarse`` = (channels, factor): the mean of each channel's finite values over cells of
    factor x factor pixels (NaN where a cell has none; the last rows and columns that do not fill a
    cell are left out), computed by the block tasks from the pixels they read, raw (before the
    normalization), in the same computation as the probability."""
    mask = np.ones((250, 302), bool)
    mask[40:90, 100:180] = False  # whole cells without data, and cells partly without
    mask[7, 9] = False
    data, valid, grid = _scene(250, 302, valid=mask, seed=5, chunks=96)
    arr = np.asarray(data.data)
    art = _art(_tiny_unet(), normalization={"method": "fixed", "mean": [0.3] * 14, "std": [2.0] * 14})
    opts = _opts(overlap=16, block_size=96)  # blocks of 96 px: 4 px cells fit, 5 px do not
    names = ["B04", "B03", "B02"]
    reader = ArrayReader(arr) if with_reader else None
    pred = predict(data, valid, grid, [art], opts, reader=reader, coarse=(names, 4))
    assert pred.coarse_factor == 4 and pred.coarse.shape == (3, 62, 75)
    got, prob = dask.compute(pred.coarse, pred.probability.data)
    cells = arr[[CHANNELS.index(n) for n in names], :248, :300].reshape(3, 62, 4, 75, 4)
    finite = np.isfinite(cells)
    with np.errstate(invalid="ignore"):
        expected = np.where(finite, cells, 0).sum(axis=(2, 4), dtype=np.float64) / finite.sum(axis=(2, 4))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.isnan(got[:, 11:22, 25:45]).all() and np.isfinite(got[:, 1, 2]).all()
    np.testing.assert_array_equal(prob, _compute(predict(data, valid, grid, [art], opts).probability))
    # not computed when a cell would straddle two blocks, or a channel is not read by the models
    assert predict(data, valid, grid, [art], opts, coarse=(names, 5)).coarse is None
    partial = ModelArtefact("PlainUnet", None, CHANNELS[:4] + CHANNELS[5:], normalization=dict(NONE),  # no B05
                            tile_size=64, module=_tiny_unet().eval())
    assert predict(data, valid, grid, [art], opts, coarse=(["B05"], 4)).coarse is not None
    assert predict(data, valid, grid, [partial], opts, coarse=(["B05"], 4)).coarse is None
