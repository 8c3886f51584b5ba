"""Memory of the inference's block tasks: a bounded multiple of a block's input, and the strips,
rolling sums and re-read kept channels that keep it there give the raster of one whole read."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from small_scene import write_scene

from pipeline.core.config import DEFAULT_MODEL, SceneConfig
from pipeline.core.grid import Grid
from pipeline.inference import blocks
from pipeline.inference.options import InferenceOptions
from pipeline.inference.tiled import _block_plan, predict
from pipeline.model.artefact import ModelArtefact, load_artefact
from pipeline.model.registry import build_model
from pipeline.stack.layers import stack_scene
from tiling.stitch import BlockSums, CompactSums, RollingSums, blend_block, window_weights
from tiling.windows import WindowGrid, block_spans


class ArrayReader:
    """A window reader over an in-memory stack (one copy per read, as a file reader makes)."""

    def __init__(self, arr: np.ndarray, names: list[str]) -> None:
        self.arr, self.shape, self.names = arr, arr.shape, names

    def read(self, bands: list[int], window: Window) -> np.ndarray:
        r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        return self.arr[list(bands), r0 : r0 + h, c0 : c0 + w]


@pytest.mark.parametrize(("strip_bytes", "strips", "factor"), [
    # one read (the default for a block this small): the input, float64 sums over it (16 bytes a
    # pixel against its 52), the values and the kept channels
    (None, 1, 1.85),
    # strips of two window rows: a strip at a time, the rows the windows still reach in float64
    (2**20, 5, 1.0),
])
def test_a_block_task_allocates_a_bounded_multiple_of_its_input(
    strip_bytes: int | None, strips: int, factor: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Traced allocations (numpy; PyTorch's are not traced) of a 512 px block task of the shipped
    model stay under ``factor`` times the bytes of its input, plus one batch of windows: a copy of
    the block more than the task needs fails."""
    art = load_artefact(DEFAULT_MODEL)
    n = 1100
    arr = np.random.default_rng(0).random((len(art.channels), n, n), dtype=np.float32) * 0.2 + 0.05
    grid = Grid(CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), n, n)
    opts = InferenceOptions(device="cpu", block_size=512, batch_size=4)
    plan, used, edge = _block_plan([art], opts, grid, list(art.channels), ["SLOPE", "DEM"], None,
                                   (("B04", "B03", "B02"), 4))
    block = (block_spans(n, edge)[1], block_spans(n, edge)[1])
    extent = plan.windows.block_read_extent(*block)
    reader = ArrayReader(arr, list(art.channels))
    if strip_bytes is not None:
        monkeypatch.setattr(blocks, "STRIP_BYTES", strip_bytes)
    blocks.read_and_predict(reader, used, extent, None, block, plan)  # the model loaded and warm
    tracemalloc.start()
    try:
        result = blocks.read_and_predict(reader, used, extent, None, block, plan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result.sums, CompactSums) and result.kept is not None
    shape = (extent[0][1] - extent[0][0], extent[1][1] - extent[1][0])
    assert len(blocks.strip_rows(plan, block, shape, len(used))) == strips
    input_bytes = len(used) * shape[0] * shape[1] * 4
    batch_bytes = opts.batch_size * len(used) * art.tile_size**2 * 4  # numpy's where the model reads NCHW
    assert peak < factor * input_bytes + batch_bytes, peak / input_bytes


# -- strips give the raster of one read -------------------------------------------------
CHANNELS = ["B02", "B03", "B04", "SLOPE", "DEM"]


def _stack(root: Path, jp2: bool) -> object:
    write_scene(root, size=300)
    if jp2:  # the bands as JPEG 2000, as in a SAFE product (tiles taller than a strip)
        for tif in sorted((root / "bands").glob("*.tif")):
            rasterio.shutil.copy(tif, tif.with_suffix(".jp2"), driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES",
                                 BLOCKXSIZE=256, BLOCKYSIZE=256)
            tif.unlink()
    cfg = SceneConfig.model_validate({"scene": {"bands_dir": str(root / "bands"), "id": "t"},
                                      "dem": {"path": str(root / "dem.tif")}, "channels": CHANNELS,
                                      "grid": {"block_size": 256}})
    return stack_scene(cfg, CHANNELS)


def _model(channels: list[str], normalization: dict) -> ModelArtefact:
    torch.manual_seed(3)
    module = build_model("PlainUnet", None, len(channels), base_channels=4, depth=2).eval()
    return ModelArtefact("PlainUnet", None, channels, normalization=normalization, tile_size=64, module=module)


def _computed(pred: object) -> list[np.ndarray]:
    parts = [pred.probability, *(pred.layers.values())] + ([pred.uncertainty] if pred.uncertainty is not None else [])
    with dask.config.set(scheduler="threads"):
        return [np.asarray(a) for a in dask.compute(*[p.data for p in parts], pred.coarse)]


@pytest.mark.parametrize(("jp2", "reordered", "tta"), [(False, False, False), (True, False, True), (False, True, False)])
def test_blocks_read_in_strips_give_the_raster_of_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jp2: bool, reordered: bool, tta: bool,
) -> None:
    """Strips of one window row (batches that span strips, the block normalized strip by strip or
    each batch normalized, kept channels read again when the block is finished, coarse means per
    strip) give the probability, spread, kept channels and coarse means of one read, bit for bit;
    a JPEG 2000 file is opened once per block task, not once per strip."""
    stack = _stack(tmp_path, jp2)
    fixed = {"method": "fixed", "mean": [0.05, 0.05, 0.05, 20.0, 600.0], "std": [0.02, 0.02, 0.02, 10.0, 100.0],
             "clip": 10.0}
    art = _model(CHANNELS[::-1] if reordered else CHANNELS,
                 {**fixed, "mean": fixed["mean"][::-1], "std": fixed["std"][::-1]} if reordered else fixed)
    opts = InferenceOptions(device="cpu", overlap=16, block_size=144, batch_size=5, tta=tta, uncertainty=tta)

    def run() -> list[np.ndarray]:
        return _computed(predict(stack.data, stack.mask, stack.grid, [art], opts, keep=["SLOPE", "DEM"],
                                 reader=stack.reader, coarse=(["B04", "B03", "B02"], 4)))

    whole = run()
    opened: list[str] = []
    real_open = rasterio.open

    def counting(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(blocks, "STRIP_BYTES", 1)
    monkeypatch.setattr(rasterio, "open", counting)
    strips = run()
    for a, b in zip(whole, strips, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(whole[0]).mean() > 0.9
    tasks = len(block_spans(300, 144)) ** 2
    per_band = [sum(p.endswith(f"{band}.jp2") or p.endswith(f"{band}.tif") for p in opened)
                for band in ("B02", "B03", "B04")]
    assert all(n == tasks for n in per_band) if jp2 else all(n > 2 * tasks for n in per_band)


# -- rolling sums are the whole extent's sums --------------------------------------------
def test_rolling_sums_settle_rows_into_the_values_and_strips_of_whole_sums() -> None:
    """Windows added row by row, rows settled as soon as no window reaches them: the divided values,
    the sums later blocks take and the blend with earlier blocks' strips are those of sums over the
    whole extent, bit for bit."""
    rng = np.random.default_rng(7)
    wg = WindowGrid(500, 500, 64, 16)
    rows = cols = (96, 288)
    (ry0, ry1), (rx0, rx1) = wg.block_read_extent(rows, cols)
    bh, bw, shape = rows[1] - rows[0], cols[1] - cols[0], (ry1 - ry0, rx1 - rx0)
    valid = rng.random((bh, bw)) > 0.05
    whole = BlockSums.zeros(valid, 2, shape)
    rolling = RollingSums(valid, 2, shape, top=16, left=16)
    wr, wc = wg.block_windows(rows, cols)
    for r in wr:
        for c in wc:
            values = rng.random((2, 64, 64)).astype(np.float32)
            w = window_weights(64, 16, 4, int(r), int(c), 500, 500)
            whole.add(values, w, int(r) - ry0, int(c) - rx0)
            rolling.add(values, w, int(r) - ry0, int(c) - rx0)
        rolling.settle(int(r) - ry0 + 48)  # the next row of windows starts one stride on
    compact = rolling.result()
    assert compact.values.dtype == np.float32 and compact.values.shape == (2, bh, bw)
    for part in (((0, bh), (bw, shape[1])), ((bh, shape[0]), (0, bw)), ((bh, shape[0]), (bw, shape[1]))):
        for a, b in zip(whole.strip(*part), compact.strip(*part), strict=True):
            np.testing.assert_array_equal(a, b)
    incoming = [((0, 0), (rng.random((2, 16, bw)), rng.random((16, bw)))),
                ((0, 0), (rng.random((2, bh, 16)), rng.random((bh, 16)))),
                ((0, 0), (rng.random((2, 16, 16)), rng.random((16, 16))))]
    np.testing.assert_array_equal(blend_block(2, whole, incoming), blend_block(2, compact, incoming))
    np.testing.assert_array_equal(blend_block(2, whole, []), compact.values)
