"""Sentinel-2 processing baselines: the radiometric offset is applied exactly once, DN 0 stays no data.

What ``tests/test_readers.py`` covers already: the metadata offsets of L1C and L2A at 04.00 and
before, the 05.00 offset of an L2A product's metadata (``BandFile.offset``), and stacked
reflectance of real Slovenia DN at L2A 02.14 / 04.00 and L1C 03.01 / 04.00 through the stack's
dask array.

What this module adds, for L1C and L2A at a baseline before 04.00 (no offset), at 04.00 and at
05.10 (``RADIO_ADD_OFFSET`` / ``BOA_ADD_OFFSET`` of -1000), on products written by the SAFE
builder (``tests/safe_builder.py``, the ESA layout and metadata):

* the DN that sit at the edges of the offset: 0 (no data), 1, 999, 1000 (reflectance 0 with the
  offset: a measurement, not no data), 1001, 65534, and 65535 (saturated: no data);
* every read path of the stacked bands: the dask array, the stack's window reader (what
  inference reads) and the quicklook's decimated read (:func:`pipeline.stack.layers.read_coarse`);
* a 20 m band upsampled to 10 m: the offset once, no data where the 20 m pixel has none.

Expected reflectance is (DN + offset) / 10000 with the offset of the parameter table below (the
ESA rule: -1000 from baseline 04.00 on), never taken from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
from affine import Affine
from rasterio.windows import Window
from safe_builder import build_safe
from small_scene import write_raster

from pipeline.core.config import SceneConfig
from pipeline.stack.coarse import read_coarse
from pipeline.stack.layers import stack_scene

CRS = "EPSG:32654"
X0, Y0 = 600000.0, 5000040.0
SIZE = 48  # 10 m px
EDGE_DN = (0, 1, 999, 1000, 1001, 65534, 65535)
NO_DATA_DN = (0, 65535)
B05_DN = 3456

BASELINES = [  # (level, baseline, offset the product's metadata declares)
    ("L1C", "03.01", 0.0),
    ("L1C", "04.00", -1000.0),
    ("L1C", "05.10", -1000.0),
    ("L2A", "02.14", 0.0),
    ("L2A", "04.00", -1000.0),
    ("L2A", "05.10", -1000.0),
]


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def _dn() -> dict[str, np.ndarray]:
    """DN of B02, B03, B04 (10 m) and B05 (20 m).

    B04: each edge DN in a 2 x 2 px cell (rows 0-1, one cell per value and column pair), the rest
    random in 1..20000 with whole no-data cells; B02 and B03 random, valid everywhere. B05: one
    value, DN 0 in a 3 x 3 block of 20 m pixels."""
    rng = np.random.default_rng(19)
    b04 = rng.integers(1, 20001, (SIZE, SIZE)).astype(np.uint16)
    for k, value in enumerate(EDGE_DN):
        b04[0:2, 2 * k:2 * k + 2] = value
        b04[10 + 2 * k, 30:40] = value  # and as single pixels among others
    b04[20:24, 4:8] = 0
    b04[30:32, 12:14] = 65535
    b02 = rng.integers(1, 20001, (SIZE, SIZE)).astype(np.uint16)
    b03 = rng.integers(1, 20001, (SIZE, SIZE)).astype(np.uint16)
    b05 = np.full((SIZE // 2, SIZE // 2), B05_DN, np.uint16)
    b05[8:11, 5:8] = 0
    return {"B02": b02, "B03": b03, "B04": b04, "B05": b05}


def _reflectance(dn: np.ndarray, offset: float) -> np.ndarray:
    """(DN + offset) / 10000 in float64, NaN for DN 0 and 65535."""
    refl = (dn.astype(np.float64) + offset) / 10000.0
    return np.where(np.isin(dn, NO_DATA_DN), np.nan, refl)


def _config(tmp_path: Path, level: str, baseline: str, dn: dict[str, np.ndarray]) -> SceneConfig:
    t10 = Affine(10, 0, X0, 0, -10, Y0)
    t20 = Affine(20, 0, X0, 0, -20, Y0)
    bands = {b: (dn[b], t10, CRS) for b in ("B02", "B03", "B04")}
    bands["B05"] = (dn["B05"], t20, CRS)
    safe = build_safe(tmp_path / "safe", bands, product=level, baseline=baseline)
    dem = write_raster(tmp_path / "dem.tif", np.full((SIZE + 10, SIZE + 10), 600.0, np.float32),
                       Affine(10, 0, X0 - 50, 0, -10, Y0 + 50), crs=CRS)
    return SceneConfig.model_validate({"scene": {"safe": str(safe)}, "dem": {"path": str(dem)},
                                       "grid": {"crs": CRS, "block_size": 256}, "mask": {"cloud_buffer_m": 0}})


@pytest.mark.parametrize(("level", "baseline", "offset"), BASELINES,
                         ids=[f"{lv}-{bl}" for lv, bl, _ in BASELINES])
def test_reflectance_has_the_offset_once_and_dn0_stays_no_data(tmp_path: Path, level: str, baseline: str,
                                                               offset: float) -> None:
    dn = _dn()
    cfg = _config(tmp_path, level, baseline, dn)
    stack = stack_scene(cfg, ["B02", "B03", "B04", "B05", "DEM"])
    assert stack.product == f"S2_{level}"
    assert stack.grid.shape == (SIZE, SIZE) and stack.grid.transform == Affine(10, 0, X0, 0, -10, Y0)
    data, valid = dask.compute(stack.data, stack.valid)
    data, valid = np.asarray(data.values), np.asarray(valid.values)

    # 10 m bands: exactly (DN + offset) / 10000; DN 0 and 65535 no data, DN 1000 a reflectance
    for k, band in enumerate(("B02", "B03", "B04")):
        expected = _reflectance(dn[band], offset)
        got = data[k]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=band)
        np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=1e-6, atol=1e-7,
                                   err_msg=band)
    b04 = data[2]
    for k, value in enumerate(EDGE_DN):
        cell = b04[0:2, 2 * k:2 * k + 2]
        if value in NO_DATA_DN:
            assert np.isnan(cell).all(), value
        else:
            np.testing.assert_allclose(cell, (value + offset) / 10000.0, rtol=1e-6, atol=1e-7, err_msg=str(value))
    if offset:
        assert (b04[0:2, 6:8] == 0.0).all()  # DN 1000: reflectance 0, kept
        assert (b04[0:2, 2:6] < 0).all()     # DN 1 and 999: small negative reflectance, kept
    # the valid mask: exactly where every band has a value
    np.testing.assert_array_equal(valid, ~np.isin(dn["B04"], NO_DATA_DN) & ~np.isin(
        np.repeat(np.repeat(dn["B05"], 2, 0), 2, 1), NO_DATA_DN))

    # 20 m band upsampled: no data under its DN-0 pixels, else the one value with the offset once
    parent = np.repeat(np.repeat(dn["B05"], 2, 0), 2, 1)
    b05 = data[3]
    np.testing.assert_array_equal(np.isnan(b05), parent == 0)
    np.testing.assert_allclose(b05[parent > 0], (B05_DN + offset) / 10000.0, rtol=1e-6)

    # the window reader (inference's path) gives the same values, bit for bit
    assert stack.reader is not None
    window = stack.reader.read([0, 1, 2, 3], Window(3, 5, 37, 29))
    np.testing.assert_array_equal(window, data[:4, 5:34, 3:40])


PATCH = 8  # px: the quicklook test's B04 is made of constant 8 x 8 patches


def _patches() -> tuple[np.ndarray, np.ndarray]:
    """B04 of constant 8 x 8 px patches (the edge DN but 65535, and other values), and the DN of
    each patch (6 x 6)."""
    values = np.array([v for v in EDGE_DN if v != 65535] + [250, 4321, 12000, 1500, 800], np.uint16)
    per_patch = np.resize(values, (SIZE // PATCH) ** 2).reshape(SIZE // PATCH, SIZE // PATCH)
    per_patch[1] = per_patch[1][::-1]  # neighbours differ from row to row
    return np.repeat(np.repeat(per_patch, PATCH, 0), PATCH, 1), per_patch


@pytest.mark.parametrize(("level", "baseline", "offset"), BASELINES,
                         ids=[f"{lv}-{bl}" for lv, bl, _ in BASELINES])
def test_quicklook_means_have_the_offset_once_and_dn0_stays_no_data(tmp_path: Path, level: str, baseline: str,
                                                                    offset: float) -> None:
    """The quicklook's decimated read (by 2, from the JPEG 2000 resolution levels where GDAL has
    them: averages are exact only on constant areas, so each patch's inner cells are checked):
    the offset once, DN 1000 a reflectance of 0, DN 0 no data."""
    dn = _dn()
    dn["B04"], per_patch = _patches()
    cfg = _config(tmp_path, level, baseline, dn)
    grid = stack_scene(cfg, ["B04", "DEM"]).grid
    coarse = read_coarse(cfg, ["B04"], grid, 2)[0]
    cells = PATCH // 2
    assert coarse.shape == (SIZE // 2, SIZE // 2)
    for (i, j), value in np.ndenumerate(per_patch):
        inner = coarse[i * cells + 1:(i + 1) * cells - 1, j * cells + 1:(j + 1) * cells - 1]
        if value == 0:
            assert np.isnan(inner).all(), (i, j)
        else:
            np.testing.assert_allclose(inner, (int(value) + offset) / 10000.0, rtol=1e-6, atol=1e-7,
                                       err_msg=f"patch {i, j}: DN {value}")
    assert (per_patch == 0).any() and (per_patch == 1000).any() and (per_patch == 1).any()
