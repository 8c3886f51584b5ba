"""Benchmark (issue 20): the pipeline's hand-written pieces against the libraries that do the same job.

Each piece runs next to its library alternative on the same realistic input,
on 2 threads, repeats interleaved (ours, library, ..., then the reverse order),
timed with :func:`time.perf_counter`; the table gives the medians, the ratio
library / ours (above 1: ours is faster) and whether the results are the same
(and the largest difference). Below the table: what was measured about what
each side does beyond speed (block consistency, determinism, error messages,
atomic writes).

1. 20 m -> 10 m same-CRS bilinear upsampling of a 2048 x 2048 block
   (:mod:`pipeline.io.upsample`) vs ``rasterio.warp.reproject`` (GDAL's warper)
   on the same source window; a window without no-data, and one across a
   swath edge.
2. A 1 arc-second EPSG:4326 DEM onto a 2048 x 2048 10 m UTM block
   (:mod:`pipeline.io.reproject`, the lattice) vs ``rasterio.warp.reproject``
   and GDAL's warper through a ``WarpedVRT`` with the near-exact transformer.
3. Opening then closing with disks of radius 1 and 3 px on a 2048 x 2048 mask
   (:mod:`postprocess.morphology`, row runs) vs ``scipy.ndimage`` and
   ``skimage.morphology`` with the same footprint and border rules.
4. 4-connected labelling of a 4096 x 4096 mask in 1024 px dask blocks with a
   per-object pixel count (:mod:`postprocess.labels` as
   :func:`postprocess.objects.clean_objects` uses it) vs
   ``dask_image.ndmeasure.label`` (+ ``ndmeasure.area``).
5. The safetensors header of ``pipeline/models/default.safetensors``
   (:func:`pipeline.model.artefact._read_header`) vs
   ``safetensors.safe_open(path, "numpy").metadata()``.
6. A 4096 x 4096 uint8 dask array to a COG (:func:`pipeline.io.cog.write_cog`)
   vs ``odc.geo.cog.save_cog_with_dask`` and ``rio_cogeo.cog_translate``.

Libraries that are not installed are reported as such (scikit-image,
dask-image, odc-geo, rio-cogeo are not dependencies of the project).

    python benchmarks/bench_libraries.py               # about 3 minutes on 2 cores
    python benchmarks/bench_libraries.py --repeats 7
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
os.environ.setdefault("GDAL_NUM_THREADS", "2")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import dask  # noqa: E402
import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402
import rasterio.errors  # noqa: E402
from affine import Affine  # noqa: E402
from rasterio.crs import CRS  # noqa: E402
from rasterio.enums import Resampling  # noqa: E402
from rasterio.vrt import WarpedVRT  # noqa: E402
from rasterio.warp import reproject as gdal_reproject  # noqa: E402
from rasterio.warp import transform_bounds  # noqa: E402
from rasterio.windows import Window  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.grid import Grid  # noqa: E402
from pipeline.io import reproject as lattice  # noqa: E402
from pipeline.io import upsample, warp  # noqa: E402
from pipeline.io.cog import write_cog  # noqa: E402
from pipeline.io.raster_check import verify_raster  # noqa: E402
from pipeline.io.raster_source import open_raster  # noqa: E402
from pipeline.model import artefact  # noqa: E402
from postprocess import morphology, objects  # noqa: E402
from postprocess.labels import (  # noqa: E402
    STRUCTURES,
    BlockLayout,
    apply_block_luts,
    order_by_first_pixel,
    resolve,
    run_blocks,
)

THREADS = 2
UTM33 = CRS.from_epsg(32633)
LONLAT = CRS.from_epsg(4326)
X0, Y0 = 399960.0, 5100000.0     # origin of a Sentinel-2 tile in UTM 33N (about 45.9 N, 13.7 E)
BLOCK = 2048
MODEL = ROOT / "pipeline" / "models" / "default.safetensors"


def optional(module: str) -> Any | None:
    """``module`` imported, or None when it is not installed."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------
# timing and the table
# --------------------------------------------------------------------------
def bench(candidates: dict[str, Callable[[], Any]], repeats: int, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate: one untimed warm-up each, then ``repeats`` rounds,
    interleaved (the order reversed every other round); ``inner`` calls per timing."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(inner):
                candidates[name]()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class Row:
    component: str
    ours: str
    library: str
    t_ours: float | None
    t_lib: float | None
    equal: str
    diff: str

    @property
    def ratio(self) -> float | None:
        if self.t_ours is None or self.t_lib is None:
            return None
        return self.t_lib / self.t_ours


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, list[str]] = field(default_factory=dict)

    def add(self, *args: Any) -> None:
        self.rows.append(Row(*args))

    def fact(self, component: str, text: str) -> None:
        self.facts.setdefault(component, []).append(text)
        print(f"  [{component}] {text}", file=sys.stderr, flush=True)


def fmt_t(t: float | None) -> str:
    if t is None:
        return "n/a"
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def table(report: Report) -> str:
    head = ("| component | ours | library | median ours | median library | ratio library / ours "
            "(> 1: ours faster) | equal results | max difference |")
    lines = [head, "|" + "---|" * 8]
    for r in report.rows:
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.component} | {r.ours} | {r.library} | {fmt_t(r.t_ours)} | {fmt_t(r.t_lib)} | "
                     f"{ratio} | {r.equal} | {r.diff} |")
    return "\n".join(lines)


def nan_compare(a: np.ndarray, b: np.ndarray) -> tuple[str, str]:
    """(equal?, largest difference) of two float arrays with NaN as no data."""
    same_nan = np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a) & ~np.isnan(b)
    d = float(np.abs(a[ok].astype(np.float64) - b[ok]).max()) if ok.any() else 0.0
    bits = same_nan and np.array_equal(a[ok].view(np.uint32), b[ok].view(np.uint32))
    mism = int((np.isnan(a) != np.isnan(b)).sum())
    if bits:
        return "yes (bit-identical)", "0"
    identical = float((a[ok].view(np.uint32) == b[ok].view(np.uint32)).mean()) * 100
    nan_note = "same no-data" if same_nan else f"no-data differs at {mism} px"
    return "no", f"{d:.3g} ({nan_note}; {identical:.1f} % of values bit-identical)"


# --------------------------------------------------------------------------
# realistic inputs
# --------------------------------------------------------------------------
def smooth_field(shape: tuple[int, int], seed: int, scales: tuple[float, ...] = (40, 10, 2)) -> np.ndarray:
    """Multi-scale smooth noise, about unit variance, float32."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.float32)
    for i, s in enumerate(scales):
        # smooth at a reduced size then zoom: cheap large-scale structure
        f = max(1, int(s // 2))
        small = rng.standard_normal((shape[0] // f + 2, shape[1] // f + 2)).astype(np.float32)
        small = ndi.gaussian_filter(small, 2.0)
        big = ndi.zoom(small, f, order=1)[: shape[0], : shape[1]]
        out += big / (big.std() + 1e-9) / (i + 1)
    return out / out.std()


def write_s2_band(path: Path, size: int) -> None:
    """A 20 m Sentinel-2-like band (uint16 DN, no data 0): reflectance texture, a swath edge in the
    south-east corner (no data beyond a diagonal), tiled uncompressed GeoTIFF."""
    tex = smooth_field((size, size), seed=1)
    dn = np.clip(1800 + 700 * tex, 1, 10000).astype(np.uint16)
    rows, cols = np.mgrid[0:size, 0:size]
    dn[rows + cols > 1.62 * size] = 0
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint16",
                       crs=UTM33, transform=Affine(20, 0, X0, 0, -20, Y0), nodata=0,
                       tiled=True, blockxsize=512, blockysize=512) as ds:
        ds.write(dn, 1)


def write_dem(path: Path, grid: Grid, margin_deg: float = 0.05) -> None:
    """A 1 arc-second EPSG:4326 DEM (float32 m, no data -9999) over ``grid`` plus a margin:
    hills, valleys and 2 m of noise."""
    left, bottom, right, top = transform_bounds(grid.crs, LONLAT, *grid.bounds, densify_pts=21)
    res = 1 / 3600
    c0 = np.floor((left - margin_deg) / res) * res
    r0 = np.ceil((top + margin_deg) / res) * res
    width = int(np.ceil((right + margin_deg - c0) / res))
    height = int(np.ceil((r0 - bottom + margin_deg) / res))
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    hills = 900 + 350 * np.sin(rows / 70.0) * np.cos(cols / 95.0) + 0.3 * cols
    dem = hills + 60 * smooth_field((height, width), seed=2, scales=(20, 5)) \
        + np.random.default_rng(3).normal(0, 2, (height, width)).astype(np.float32)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="float32",
                       crs=LONLAT, transform=Affine(res, 0, c0, 0, -res, r0), nodata=-9999,
                       tiled=True, blockxsize=512, blockysize=512) as ds:
        ds.write(dem.astype(np.float32), 1)


def landslide_mask(size: int, seed: int) -> np.ndarray:
    """A thresholded-probability-like mask: blobs of 5 to 100 px across (about 7 % of the pixels)
    and 0.5 % speckle."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((size // 2, size // 2)).astype(np.float32)
    blobs = ndi.zoom(ndi.gaussian_filter(noise, 3.0), 2, order=1)
    mask = blobs > np.quantile(blobs[::7, ::7], 0.93)
    mask ^= rng.random((size, size)) < 0.005
    return mask


def cloud_known(size: int) -> np.ndarray:
    """Known pixels: everything but two 'clouds' (discs of no data)."""
    rows, cols = np.mgrid[0:size, 0:size]
    cloud = ((rows - 0.3 * size) ** 2 + (cols - 0.6 * size) ** 2 < (0.08 * size) ** 2) | \
        ((rows - 0.75 * size) ** 2 + (cols - 0.2 * size) ** 2 < (0.05 * size) ** 2)
    return ~cloud


# --------------------------------------------------------------------------
# 1. same-CRS upsampling
# --------------------------------------------------------------------------
def upsample_window(source: Any, grid: Grid) -> Window:
    """The source window :func:`pipeline.io.upsample.upsample_onto` reads for ``grid``."""
    t, g = source.transform, grid.transform
    x = upsample._axis((g.c - t.c) / t.a, g.a / t.a, grid.width, source.width, t.a / g.a)
    y = upsample._axis((t.f - g.f) / -t.e, g.e / t.e, grid.height, source.height, t.e / g.e)
    (row0, row1), (col0, col1) = upsample._span(y, Resampling.bilinear), upsample._span(x, Resampling.bilinear)
    return Window(col0, row0, col1 - col0, row1 - row0)


def bench_upsample(report: Report, tmp: Path, repeats: int) -> None:
    path = tmp / "B05.tif"
    write_s2_band(path, 2560)
    source = open_raster(path, "band B05", scale=1e-4)
    blocks = {
        "1a. 20 m -> 10 m bilinear, same CRS, 2048² block, no no-data": (1024, 1024),
        "1b. same, block across a swath edge (no-data in the window)": (3072, 2048),
    }
    with rasterio.open(path) as ds:
        for label, (r0, c0) in blocks.items():
            grid = Grid(UTM33, Affine(10, 0, X0 + 10 * c0, 0, -10, Y0 - 10 * r0), BLOCK, BLOCK)
            win = upsample_window(source, grid)

            def ours(grid: Grid = grid) -> np.ndarray:
                out = np.full(grid.shape, np.nan, np.float32)
                upsample.upsample_onto(source, ds, grid, Resampling.bilinear, out)
                return out

            def gdal(grid: Grid = grid, win: Window = win) -> np.ndarray:
                src = source.to_physical(ds.read(1, window=win))
                out = np.full(grid.shape, np.nan, np.float32)
                gdal_reproject(src, out, src_transform=ds.window_transform(win), src_crs=source.crs,
                               dst_transform=grid.transform, dst_crs=grid.crs, resampling=Resampling.bilinear,
                               src_nodata=np.nan, dst_nodata=np.nan, num_threads=1)
                return out

            def read_only(win: Window = win) -> np.ndarray:
                return source.to_physical(ds.read(1, window=win))

            t = bench({"ours": ours, "gdal": gdal, "read": read_only}, repeats)
            a, b = ours(), gdal()
            eq, diff = nan_compare(a, b)
            report.add(label, "`upsample.upsample_onto`", "`rasterio.warp.reproject` (GDAL, 1 thread)",
                       t["ours"], t["gdal"], eq, diff)
            report.fact("1", f"{label[:3]} both include reading the same {int(win.width)} x {int(win.height)} px "
                             f"window and DN -> reflectance ({fmt_t(t['read'])}); no-data in the result: "
                             f"{np.isnan(a).mean() * 100:.1f} %")


# --------------------------------------------------------------------------
# 2. DEM from EPSG:4326 onto a UTM block
# --------------------------------------------------------------------------
def bench_reproject(report: Report, tmp: Path, repeats: int) -> None:
    grid = Grid(UTM33, Affine(10, 0, X0 + 20480, 0, -10, Y0 - 20480), BLOCK, BLOCK)
    path = tmp / "dem.tif"
    write_dem(path, grid)
    source = open_raster(path, "DEM")
    scale = source.warp_scale(grid.crs, grid.res)
    # a neighbouring block grown by a 64 px halo: overlaps ``grid`` by 1088 x 1088 px
    other = Grid(UTM33, grid.transform * Affine.translation(BLOCK // 2 - 64, BLOCK // 2 - 64), BLOCK, BLOCK)

    with rasterio.open(path) as ds:
        def ours(g: Grid = grid) -> np.ndarray:
            out = np.full(g.shape, np.nan, np.float32)
            assert lattice.reproject_onto(source, ds, g, Resampling.bilinear, out, scale), "lattice refused"
            return out

        def gdal_reproject_block(g: Grid = grid) -> np.ndarray:
            win = warp._source_window(source, g)
            src = source.to_physical(ds.read(1, window=win))
            out = np.full(g.shape, np.nan, np.float32)
            gdal_reproject(src, out, src_transform=ds.window_transform(win), src_crs=source.crs,
                           dst_transform=g.transform, dst_crs=g.crs, resampling=Resampling.bilinear,
                           src_nodata=np.nan, dst_nodata=np.nan, num_threads=1)
            return out

        def gdal_vrt(g: Grid = grid) -> np.ndarray:
            with WarpedVRT(ds, crs=g.crs, transform=g.transform, width=g.width, height=g.height,
                           resampling=Resampling.bilinear, src_nodata=-9999, nodata=np.nan, dtype="float32",
                           tolerance=warp.WARP_TOLERANCE,
                           XSCALE=f"{scale[0]:.12g}", YSCALE=f"{scale[1]:.12g}") as vrt:
                return vrt.read(1)

        t = bench({"ours": ours, "reproject": gdal_reproject_block, "vrt": gdal_vrt}, repeats)
        a, b, c = ours(), gdal_reproject_block(), gdal_vrt()
        label = "2. DEM 1\" EPSG:4326 -> 2048² 10 m UTM block, bilinear"
        eq, diff = nan_compare(a, b)
        report.add(f"{label} (vs default warp)", "`reproject.reproject_onto` (lattice)",
                   "`rasterio.warp.reproject` (GDAL, approx. transformer 0.125 px)", t["ours"], t["reproject"], eq, diff)
        eq, diff = nan_compare(a, c)
        report.add(f"{label} (vs near-exact warp)", "`reproject.reproject_onto` (lattice)",
                   "GDAL `WarpedVRT(tolerance=1e-4)` (the pipeline's fallback)", t["ours"], t["vrt"], eq, diff)

        # the same destination pixels computed in two overlapping blocks
        r, cc = BLOCK // 2 - 64, BLOCK // 2 - 64
        for name, fn in (("ours", ours), ("rasterio.warp.reproject", gdal_reproject_block),
                         ("WarpedVRT tol 1e-4", gdal_vrt)):
            whole, part = fn(grid), fn(other)
            x, y = whole[r:, cc:], part[: BLOCK - r, : BLOCK - cc]
            same = np.array_equal(x.view(np.uint32), y.view(np.uint32))
            d = float(np.nanmax(np.abs(x.astype(np.float64) - y)))
            report.fact("2", f"{name}: overlap of two neighbouring blocks "
                             f"{'bit-identical' if same else f'differs, up to {d:.3g} m'}")
        report.fact("2", "`rasterio.warp.reproject` accepts `tolerance=` without error but ignores it "
                         f"(results with tolerance=0: {'unchanged' if tolerance_ignored(source, ds, grid) else 'changed'})")


def tolerance_ignored(source: Any, ds: Any, grid: Grid) -> bool:
    win = warp._source_window(source, grid)
    src = source.to_physical(ds.read(1, window=win))
    outs = []
    for kw in ({}, {"tolerance": 0.0}):
        out = np.full(grid.shape, np.nan, np.float32)
        gdal_reproject(src, out, src_transform=ds.window_transform(win), src_crs=source.crs,
                       dst_transform=grid.transform, dst_crs=grid.crs, resampling=Resampling.bilinear,
                       src_nodata=np.nan, dst_nodata=np.nan, **kw)
        outs.append(out)
    return np.array_equal(outs[0], outs[1], equal_nan=True)


# --------------------------------------------------------------------------
# 3. morphology
# --------------------------------------------------------------------------
def open_close_with(erode_fn: Callable[..., np.ndarray], dilate_fn: Callable[..., np.ndarray],
                    mask: np.ndarray, known: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """:func:`postprocess.morphology.open_close_array` with library erosion and dilation
    (unknown and outside pixels: foreground for erosion, background for dilation)."""
    out = mask & known
    out = dilate_fn(erode_fn(out | ~known, fp) & known, fp) & known     # opening
    return erode_fn(dilate_fn(out, fp) & known | ~known, fp) & known    # closing


def bench_morphology(report: Report, mask4096: np.ndarray, repeats: int) -> None:
    mask = mask4096[:BLOCK, :BLOCK].copy()
    known = cloud_known(BLOCK)
    skm = optional("skimage.morphology")
    for r in (1, 3):
        fp = morphology.disk(float(r))

        def ours(fp: np.ndarray = fp) -> np.ndarray:
            return morphology.open_close_array(mask, known, fp, fp)

        def scipy_same(fp: np.ndarray = fp) -> np.ndarray:
            return open_close_with(lambda x, s: ndi.binary_erosion(x, s, border_value=1),
                                   lambda x, s: ndi.binary_dilation(x, s, border_value=0), mask, known, fp)

        def scipy_plain(fp: np.ndarray = fp) -> np.ndarray:
            # binary_opening / binary_closing as they are (border 0 for both), unknown pixels as background
            return ndi.binary_closing(ndi.binary_opening(mask & known, fp), fp) & known

        cands: dict[str, Callable[[], np.ndarray]] = {"ours": ours, "scipy": scipy_same, "plain": scipy_plain}
        if skm is not None:
            assert np.array_equal(skm.disk(r).astype(bool), fp), "skimage's disk differs"
            sk_fp = skm.disk(r, decomposition="crosses")   # exact for a disk, fewer taps (checked below)

            def sk(fp: Any = sk_fp) -> np.ndarray:
                # mode="ignore": outside pixels never erode nor grow anything (ours' rule at the edge)
                return open_close_with(lambda x, s: skm.erosion(x, s, mode="ignore"),
                                       lambda x, s: skm.dilation(x, s, mode="ignore"), mask, known, fp)

            cands["skimage"] = sk
        t = bench(cands, repeats)
        a = ours()
        for key, lib in (("scipy", "`scipy.ndimage.binary_erosion/dilation` (border rules as ours)"),
                         ("plain", "`scipy.ndimage.binary_opening` + `binary_closing` (defaults)"),
                         ("skimage", f"`skimage.morphology.erosion/dilation(mode='ignore')`, "
                                     f"`disk(r, decomposition='crosses')` (scikit-image {version('scikit-image')})")):
            if key not in cands:
                report.add(f"3. opening + closing, disk r = {r} px, 2048²", "`morphology.open_close_array`",
                           "scikit-image: not installed", t["ours"], None, "n/a", "n/a")
                continue
            b = cands[key]()
            n = int((a != b).sum())
            report.add(f"3. opening + closing, disk r = {r} px, 2048²", "`morphology.open_close_array` (row runs)",
                       lib, t["ours"], t[key], "yes" if n == 0 else "no",
                       "0 px" if n == 0 else f"{n} px differ (all within {4 * r} px of the raster edge or of "
                       f"unknown pixels: {'yes' if near_edge_only(a != b, known, 4 * r) else 'no'})")
    report.fact("3", f"mask: {mask.mean() * 100:.1f} % foreground, {(~known).mean() * 100:.1f} % unknown (clouds)")


def near_edge_only(diff: np.ndarray, known: np.ndarray, width: int) -> bool:
    """Are all differing pixels within ``width`` px of the raster's edge or of an unknown pixel?"""
    near = ndi.binary_dilation(~known, iterations=width)
    near[:width], near[-width:], near[:, :width], near[:, -width:] = True, True, True, True
    return not (diff & ~near).any()


# --------------------------------------------------------------------------
# 4. block-wise labelling
# --------------------------------------------------------------------------
def ours_labels(mask: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (ids in row-major order of the first pixel) and per-object pixel counts, the way
    :func:`postprocess.objects.clean_objects` computes them (no value layers)."""
    arr = da.from_array(mask, chunks=chunk)
    layout = BlockLayout.of(arr)
    summaries = run_blocks(objects._final_block, [arr], layout, names=(), with_pieces=False)
    comps = resolve(summaries, layout, 4)
    ids = order_by_first_pixel(comps.stats["first"], np.ones(comps.n_components, bool))
    counts = comps.stats["count"][np.argsort(ids)] if comps.n_components else np.zeros(0, np.int64)
    luts = {ix: comps.block_lut(ix, ids, 0).astype(np.int32) for ix in layout.indices()}
    labels = apply_block_luts(objects._final_labels, [arr], luts, layout, np.int32).compute()
    return labels, counts


def same_partition(a: np.ndarray, b: np.ndarray) -> tuple[bool, str]:
    """Do two label rasters have the same components (ids may differ)?"""
    fa, fb = a > 0, b > 0
    if not np.array_equal(fa, fb):
        return False, f"foreground differs at {int((fa != fb).sum())} px"
    nb = int(b.max())
    pairs = np.unique(a[fa].astype(np.int64) * (nb + 1) + b[fa])
    ua, ub = np.unique(a[fa]).size, np.unique(b[fa]).size
    ok = pairs.size == ua == ub
    return ok, f"{ua} vs {ub} components, {pairs.size} (ours, theirs) pairs"


def bench_labels(report: Report, mask4096: np.ndarray, repeats: int) -> None:
    mask = ndi.binary_closing(ndi.binary_opening(mask4096, morphology.disk(1.0)), morphology.disk(1.0))
    dim = optional("dask_image.ndmeasure")
    s4 = STRUCTURES[4]

    def ours() -> tuple[np.ndarray, np.ndarray]:
        return ours_labels(mask, 1024)

    cands: dict[str, Callable[[], Any]] = {"ours": ours}
    if dim is not None:
        def lib_label(chunk: int = 1024) -> np.ndarray:
            lab, _ = dim.label(da.from_array(mask, chunks=chunk), structure=s4)
            return lab.compute()

        def lib_label_count() -> tuple[np.ndarray, np.ndarray]:
            # dask-image's labels, then per-object pixel counts with dask's bincount (ndmeasure.area
            # is far slower with thousands of labels: timed once below)
            lab, n = dask.persist(*dim.label(da.from_array(mask, chunks=1024), structure=s4))
            counts = da.bincount(lab.ravel(), minlength=int(n.compute()) + 1)[1:]
            return lab.compute(), counts.compute()

        cands["label"] = lib_label
        cands["count"] = lib_label_count
    t = bench(cands, repeats)
    a, counts = ours()
    whole, _ = ndi.label(mask, structure=s4)
    label = "4. 4-connected labels of a 4096² mask in 1024² dask blocks"
    if dim is None:
        report.add(label, "`postprocess.labels` (+ counts)", "dask-image: not installed", t["ours"], None, "n/a", "n/a")
    else:
        b = lib_label()
        ok, note = same_partition(a, b)
        report.add(f"{label} (labels only)", "`postprocess.labels` run_blocks/resolve/apply_block_luts "
                   "(+ per-object count, first pixel)", f"`dask_image.ndmeasure.label` (dask-image {version('dask-image')})",
                   t["ours"], t["label"], "same partition" if ok else "no",
                   note + ("; ids differ" if not np.array_equal(a, b) else "; identical ids"))
        lb, cnt = lib_label_count()
        ok2 = same_partition(a, lb)[0] and np.array_equal(np.sort(cnt.astype(np.int64)), np.sort(counts))
        report.add(f"{label} (labels + per-object pixel count)", "same (counts come with the labels)",
                   "`ndmeasure.label` (persisted) + `dask.array.bincount`", t["ours"], t["count"],
                   "same partition and counts" if ok2 else "no", "0" if ok2 else "counts differ")
        # ndmeasure.area, the dask-image reduction, on the first 100 labels only (its cost grows with the
        # number of labels asked for)
        lab = dim.label(da.from_array(mask, chunks=1024), structure=s4)[0].persist()
        t0 = time.perf_counter()
        area = dim.area(da.from_array(mask, chunks=1024), lab, np.arange(1, 101)).compute()
        t_area = time.perf_counter() - t0
        lb = lab.compute()
        ref = np.bincount(lb.ravel(), minlength=101)[1:101]
        report.fact("4", f"`dask_image.ndmeasure.area` for 100 of the {int(a.max())} labels (label raster "
                         f"persisted): {t_area:.1f} s once (right counts: {np.array_equal(area, ref)}); it grows "
                         f"linearly with the labels asked for: about {t_area * a.max() / 100:.0f} s for all")
        for chunk in (512, 2048):
            other = lib_label(chunk)
            report.fact("4", f"dask-image ids with {chunk}² blocks vs 1024² blocks: "
                             f"{'identical' if np.array_equal(other, b) else 'different'} "
                             f"(same partition: {same_partition(other, b)[0]})")
    report.fact("4", f"ours vs scipy.ndimage.label on the whole array: "
                     f"{'identical ids' if np.array_equal(a, whole) else 'ids differ'}; {int(a.max())} objects, "
                     f"{mask.mean() * 100:.1f} % foreground")
    for chunk in (512, 2048, 4096):
        other, _ = ours_labels(mask, chunk)
        report.fact("4", f"ours with {chunk}² blocks vs 1024² blocks: "
                         f"{'identical ids' if np.array_equal(other, a) else 'ids differ'}")
    report.fact("4", "(from the code) the pipeline never holds a label raster: ours keeps per-block label "
                     "tables and relabels each block when it is consumed; dask-image's reductions need the "
                     "label raster persisted (or the labelling computed twice)")


# --------------------------------------------------------------------------
# 5. safetensors header
# --------------------------------------------------------------------------
def bench_safetensors(report: Report, tmp: Path, repeats: int) -> None:
    st = optional("safetensors")
    path = MODEL

    def ours() -> dict[str, str]:
        return artefact._read_header(path)["__metadata__"]

    def ours_full() -> Any:
        return artefact.read_metadata(path)

    cands: dict[str, Callable[[], Any]] = {"ours": ours, "full": ours_full}
    if st is not None:
        def lib() -> dict[str, str]:
            with st.safe_open(str(path), framework="numpy") as f:
                return f.metadata()

        cands["lib"] = lib
    t = bench(cands, repeats, inner=200)
    label = f"5. safetensors header of default.safetensors ({path.stat().st_size / 1e6:.1f} MB)"
    if st is None:
        report.add(label, "`artefact._read_header`", "safetensors: not installed", t["ours"], None, "n/a", "n/a")
        return
    eq = ours() == lib()
    report.add(label, "`artefact._read_header` (struct + json, checks the byte ranges fill the file)",
               f"`safetensors.safe_open(...).metadata()` ({version('safetensors')})", t["ours"], t["lib"],
               "yes" if eq else "no", "identical metadata dict" if eq else "metadata differs")
    report.fact("5", f"`artefact.read_metadata` as a whole (header + validation + sha256 of the file): "
                     f"{fmt_t(t['full'])} per call")
    data = path.read_bytes()
    bad = tmp / "bad.safetensors"
    readers = (lambda: artefact._read_header(bad), lambda: st.safe_open(str(bad), framework="numpy").metadata())
    for kind, blob in (("truncated by 1000 bytes", data[:-1000]), ("10 bytes appended", data + b"\0" * 10)):
        bad.write_bytes(blob)
        msgs = []
        for fn in readers:
            try:
                fn()
                msgs.append("accepted")
            except Exception as exc:  # noqa: BLE001 - reporting what each says
                msgs.append(f"{type(exc).__name__}: {str(exc).replace(str(tmp) + '/', '')}")
        report.fact("5", f"file {kind}: ours -> \"{msgs[0]}\"; safetensors -> \"{msgs[1]}\"")


# --------------------------------------------------------------------------
# 6. dask array -> COG
# --------------------------------------------------------------------------
def bench_cog(report: Report, tmp: Path, repeats: int) -> None:
    size = 4096
    grid = Grid(UTM33, Affine(10, 0, X0, 0, -10, Y0), size, size)
    prob = 1 / (1 + np.exp(-3 * smooth_field((size, size), seed=5)))
    values = np.round(prob * 100).astype(np.uint8)
    values[~cloud_known(size)] = 255
    arr = da.from_array(values, chunks=BLOCK)   # the pipeline's block size
    out_dir = tmp / "cog"
    out_dir.mkdir()
    odc_cog = optional("odc.geo.cog")
    rio_cogeo = optional("rio_cogeo.cogeo")

    def ours() -> Path:
        return write_cog(arr, grid, out_dir / "ours.tif", dtype="uint8", nodata=255, overview_resampling="average")

    cands: dict[str, Callable[[], Any]] = {"ours": ours}
    if odc_cog is not None:
        from odc.geo.geobox import GeoBox
        from odc.geo.xr import wrap_xr

        xx = wrap_xr(arr, GeoBox((size, size), grid.transform, grid.crs), nodata=255)

        def odc() -> Path:
            dst = out_dir / "odc.tif"
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            odc_cog.save_cog_with_dask(xx, dst, compression="deflate", level=1, predictor=2, blocksize=512,
                                       overview_resampling="average").compute()
            return dst

        cands["odc"] = odc
    if rio_cogeo is not None:
        from rio_cogeo.profiles import cog_profiles

        def rio() -> Path:
            dst = out_dir / "rio.tif"
            profile = cog_profiles.get("deflate")
            profile.update(blockxsize=512, blockysize=512, zlevel=1, predictor=2)
            data = arr.compute()   # rio-cogeo reads a GDAL dataset: the array is computed into memory first
            with rasterio.MemoryFile() as mem:
                with mem.open(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs=grid.crs,
                              transform=grid.transform, nodata=255) as tmpds:
                    tmpds.write(data, 1)
                with mem.open() as src:
                    rio_cogeo.cog_translate(src, dst, profile, overview_resampling="average", in_memory=True,
                                            quiet=True, config={"GDAL_NUM_THREADS": str(THREADS)})
            return dst

        cands["rio"] = rio
    t = bench(cands, repeats)
    label = "6. 4096² uint8 dask array -> COG (DEFLATE 1, predictor, 512 tiles, average overviews)"
    ref = read_levels(ours())
    report.fact("6", f"ours: {(out_dir / 'ours.tif').stat().st_size / 1e6:.2f} MB, overviews "
                     f"{[lv.shape for lv in ref[1:]]}, valid COG: {valid_cog(out_dir / 'ours.tif')}")
    t0 = time.perf_counter()
    verify_raster(out_dir / "ours.tif", width=size, height=size, count=1, dtype="uint8")
    report.fact("6", f"ours' read-back check of the finished COG (`verify_raster`, run on the temporary "
                     f"tiled file and on the COG before each moves): {fmt_t(time.perf_counter() - t0)} for the COG")
    for key, lib in (("odc", f"`odc.geo.cog.save_cog_with_dask` (odc-geo {version('odc-geo')})"),
                     ("rio", f"`rio_cogeo.cog_translate` (rio-cogeo {version('rio-cogeo')}) of the computed array")):
        if key not in cands:
            report.add(label, "`pipeline.io.cog.write_cog`", f"{lib.split(' ')[0]}: not installed",
                       t["ours"], None, "n/a", "n/a")
            continue
        p = cands[key]()
        got = read_levels(p)
        full_eq = np.array_equal(got[0], ref[0])
        levels = [lv.shape for lv in got[1:]]
        ov = [int(np.abs(x.astype(int) - y).max()) if x.shape == y.shape else None
              for x, y in zip(ref[1:], got[1:], strict=False)]
        report.add(label, "`pipeline.io.cog.write_cog` (store to tiled tmp, GDAL COG copy, read-back check)", lib,
                   t["ours"], t[key], "full resolution yes" if full_eq else "no",
                   f"full res 0; overviews max |diff| {ov} (levels {levels})" if full_eq else "full resolution differs")
        report.fact("6", f"{key}: {p.stat().st_size / 1e6:.2f} MB, valid COG: {valid_cog(p)}")
    report.fact("6", "(from the code) ours: blocks stream into a temporary tiled GeoTIFF, GDAL's COG driver "
                     "copies it, both files are read back (`verify_written`) and only then `os.replace`d into "
                     "place (atomic; a failure leaves no file); `write_rasters` writes several rasters from "
                     "one dask computation")
    report.fact("6", "(from the code) odc-geo: streams from dask too and returns a Delayed (several outputs can "
                     "be computed together); its local sink writes parts beside the destination, then renames the first "
                     "part to the destination and appends the others (not atomic: a half-assembled file is "
                     "visible at the destination meanwhile); it encodes "
                     "with its own TIFF writer, not GDAL's COG driver")
    report.fact("6", "(from the code) rio-cogeo: reads a GDAL dataset, so a dask array has to be computed into "
                     "memory (as here) or written to a temporary file first")


def read_levels(path: Path) -> list[np.ndarray]:
    with rasterio.open(path) as ds:
        levels = [ds.read(1)]
        n = len(ds.overviews(1))
    for i in range(n):
        with rasterio.open(path, overview_level=i) as ds:
            levels.append(ds.read(1))
    return levels


def valid_cog(path: Path) -> str:
    cogeo = optional("rio_cogeo.cogeo")
    if cogeo is None:
        return "not checked (rio-cogeo not installed)"
    ok, errors, _ = cogeo.cog_validate(str(path), quiet=True)
    return "yes" if ok else f"no ({'; '.join(errors)})"


# --------------------------------------------------------------------------
def machine() -> str:
    model, cores = platform.processor() or "?", os.cpu_count()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "CPU(s)":
                cores = int(value.strip())
    return f"{model}, {cores} CPU(s)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per candidate (>= 5 for the table)")
    ap.add_argument("--only", nargs="*", type=int, choices=range(1, 7), help="run only these components")
    args = ap.parse_args(argv)
    only = set(args.only or range(1, 7))
    dask.config.set(scheduler="threads", num_workers=THREADS)
    # rio-cogeo's in-memory overview dataset has no geotransform (harmless: the COG has it)
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)

    started = time.perf_counter()
    load_start = os.getloadavg()
    report = Report()
    tmp = Path(tempfile.mkdtemp(prefix="bench_libraries_"))
    try:
        mask4096 = landslide_mask(4096, seed=7) if only & {3, 4} else None
        steps: list[tuple[int, Callable[[], None]]] = [
            (1, lambda: bench_upsample(report, tmp, args.repeats)),
            (2, lambda: bench_reproject(report, tmp, args.repeats)),
            (3, lambda: bench_morphology(report, mask4096, args.repeats)),
            (4, lambda: bench_labels(report, mask4096, args.repeats)),
            (5, lambda: bench_safetensors(report, tmp, args.repeats)),
            (6, lambda: bench_cog(report, tmp, args.repeats)),
        ]
        for n, step in steps:
            if n in only:
                t0 = time.perf_counter()
                print(f"component {n} ...", file=sys.stderr, flush=True)
                step()
                print(f"component {n} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    libs = ["numpy", "scipy", "rasterio", "dask", "safetensors", "scikit-image", "dask-image", "odc-geo", "rio-cogeo"]
    print("# Hand-written pieces vs libraries (issue 20)\n")
    print(f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- machine: {machine()}")
    print(f"- command: `python benchmarks/bench_libraries.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`")
    print(f"- Python {platform.python_version()}, GDAL {rasterio.__gdal_version__}; "
          + ", ".join(f"{d} {version(d)}" for d in libs))
    print("- scikit-image, dask-image, odc-geo and rio-cogeo are not project dependencies: they were "
          "installed with `pip install scikit-image dask-image rio-cogeo odc-geo` for this benchmark only")
    print(f"- {THREADS} threads (dask threaded scheduler with {THREADS} workers, GDAL_NUM_THREADS={THREADS}, "
          f"OMP/BLAS {THREADS}); per-block kernels single-threaded on both sides (the pipeline runs blocks "
          "in parallel); medians of "
          f"{args.repeats} interleaved repeats after one warm-up; component 5: per call, 200 calls per repeat")
    load_end = os.getloadavg()
    print(f"- 1-minute load average at start / end: {load_start[0]:.1f} / {load_end[0]:.1f} on {os.cpu_count()} "
          "CPU(s) (other processes on the machine add noise; repeats are interleaved so both sides share it)")
    print()
    print(table(report))
    print()
    print("## Facts beyond speed (measured, except those marked as read from the code)\n")
    for comp, lines in report.facts.items():
        for line in lines:
            print(f"- {comp}: {line}")
    print(f"\nTotal run time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
