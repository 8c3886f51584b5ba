"""One band of an input raster file: opened and checked lazily, read onto a grid block by block.

Opening a raster (:func:`open_raster`) checks that the file passes the input
allow-list, opens with GDAL, is georeferenced and is not visibly truncated,
without reading pixels. Pixels are read later, one destination block at a time,
by :meth:`RasterSource.read_onto`, which reads only the source window that
block needs and resamples it: directly when the block lies on the raster's own
pixels, else by same-CRS upsampling (:mod:`pipeline.io.upsample`), bilinear
upsampling from another CRS (:mod:`pipeline.io.reproject`) or GDAL's warper
(:mod:`pipeline.io.warp`).

Value conventions of :meth:`RasterSource.read_onto`: float32, no-data as NaN,
physical value = (stored value + ``offset``) * ``scale``. For Sentinel-2 bands
that gives reflectance = (DN + offset) / quantification, with DN 0 (or the
file's no-data value) masked before the offset is applied.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.core.errors import InputError
from pipeline.core.grid import Bounds, Grid
from pipeline.io import reproject, upsample, warp
from pipeline.io.allow_list import JP2_DRIVERS, NO_VRT, VrtPolicy, input_driver
from pipeline.io.gdal import error_detail

#: Gives an open (read-only) dataset of a path: :meth:`RasterSource.read_onto`'s ``opener``.
Opener = Callable[[Path], "rasterio.io.DatasetReader"]


@dataclass(frozen=True)
class RasterSource:
    """One band of a raster file plus how to turn stored values into physical units.

    Attributes are plain values (no open handles), so a source can be pickled
    into dask tasks; every read opens the file in the calling thread.
    """

    path: Path
    role: str
    crs: CRS
    transform: Affine
    width: int
    height: int
    dtype: str
    band: int = 1
    nodata: tuple[float, ...] = ()
    offset: float = 0.0
    scale: float = 1.0
    driver: str | None = None     # the GDAL driver the file was checked with; reads use only that one

    @property
    def bounds(self) -> Bounds:
        """(left, bottom, right, top) in the source CRS."""
        t = self.transform
        return (t.c, t.f + self.height * t.e, t.c + self.width * t.a, t.f)

    @property
    def res(self) -> tuple[float, float]:
        """(x, y) pixel size, positive."""
        return (self.transform.a, -self.transform.e)

    def bounds_in(self, crs: CRS) -> Bounds:
        """Bounds transformed to ``crs`` (densified edges)."""
        if crs == self.crs:
            return self.bounds
        return transform_bounds(self.crs, crs, *self.bounds, densify_pts=21)

    # -- pixel access ------------------------------------------------------
    def to_physical(self, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stored values -> float32 physical values with NaN for no-data.

        ``out`` (float32, ``raw``'s shape, for example a window of a block's channel) receives the
        values and is returned instead of a new array: the conversion, offset and scale are applied
        on the way in (the same float32 operations, the same values).
        """
        if out is None:
            out = np.empty(raw.shape, np.float32)
        elif out.shape != raw.shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {raw.shape}, got {out.dtype} {out.shape}")
        values = [v for v in self.nodata if not math.isnan(v)]
        bad = None
        if raw.dtype.kind == "f":
            bad = np.isnan(raw)
        for value in values:
            hit = raw == value
            bad = hit if bad is None else np.logical_or(bad, hit, out=bad)
        if self.offset != 0.0:
            np.add(raw, np.float32(self.offset), out=out, dtype=np.float32, casting="unsafe")
        else:
            np.copyto(out, raw, casting="unsafe")
        if self.scale != 1.0:
            np.multiply(out, np.float32(self.scale), out=out)
        if bad is not None:
            np.copyto(out, np.float32(np.nan), where=bad)
        return out

    def warp_scale(self, crs: CRS, resolution: tuple[float, float]) -> tuple[float, float]:
        """Destination pixels per source pixel (x, y) when warping to ``crs`` at ``resolution``.

        GDAL widens interpolation kernels when downsampling by this factor and
        otherwise estimates it for each block from the block's own window.
        Passing one value, derived from the whole source, keeps blocks (and
        grids cut to different areas of interest) consistent.
        """
        try:
            left, bottom, right, top = self.bounds_in(crs)
        except RasterioError:
            return (1.0, 1.0)
        if not all(map(math.isfinite, (left, bottom, right, top))) or right <= left or top <= bottom:
            return (1.0, 1.0)
        return ((right - left) / resolution[0] / self.width, (top - bottom) / resolution[1] / self.height)

    def read_onto(self, grid: Grid, resampling: Resampling = Resampling.bilinear,
                  scale: tuple[float, float] | None = None, *, opener: Opener | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Read the part of this raster that ``grid`` needs and resample it onto ``grid``.

        Only the source window covering the destination bounds (plus a margin
        for the resampling kernel) is read, so memory depends on the size of
        ``grid``, not of the file. Returns float32 (rows, cols), NaN where
        the source has no data or does not reach. ``scale`` is
        :meth:`warp_scale` of the full grid when ``grid`` is one block of it.
        ``opener`` gives an open dataset of a path, kept open by the caller
        (many small reads of the same files); by default the file is opened
        for this read. ``out`` (float32, ``grid``'s shape, for example one
        channel of a block) receives the values and is returned, instead of a
        new array.
        """
        if out is None:
            out = np.full(grid.shape, np.nan, dtype=np.float32)
        else:
            if out.shape != grid.shape or out.dtype != np.float32:
                raise ValueError(f"out must be float32 of shape {grid.shape}, got {out.dtype} {out.shape}")
            out.fill(np.nan)
        failure: str | None = None
        try:
            with (contextlib.nullcontext(opener(self.path)) if opener is not None
                  else rasterio.open(self.path, driver=self.driver)) as ds:
                self._resample(ds, grid, resampling, scale, out)
        except (RasterioError, OSError) as exc:
            failure = error_detail(exc)
        if failure is not None:
            # raised outside the except block: no GDAL exception in the context chain,
            # so the error pickles back from dask worker processes with its type
            raise InputError(
                f"{self.path}: cannot read pixels of the {self.role} ({failure}); "
                "the file may be truncated or corrupt"
            )
        return out

    def _resample(self, ds: rasterio.io.DatasetReader, grid: Grid, resampling: Resampling,
                  scale: tuple[float, float] | None, out: np.ndarray) -> None:
        """Fill ``out`` by the first way of reading that applies to ``grid``."""
        direct = self._aligned_offsets(grid)
        if direct is not None:
            self._read_direct(ds, grid, direct, out)
        elif upsample.applies(self, grid, resampling):
            upsample.upsample_onto(self, ds, grid, resampling, out)
        else:
            scale = scale or self.warp_scale(grid.crs, grid.res)
            if not reproject.reproject_onto(self, ds, grid, resampling, out, scale):
                warp.warp_onto(self, ds, grid, resampling, out, scale)

    def read_decimated(self, grid: Grid, factor: int, out: np.ndarray) -> bool:
        """Fill ``out`` (``grid``'s rows and columns // ``factor``) with the mean of each ``factor`` x
        ``factor`` block of pixels, in physical values, NaN where a block has no data.

        Only for a raster on ``grid``'s own pixels and covering it; returns False
        (``out`` untouched) otherwise. GDAL's decimating read averages the
        valid pixels (the file's no-data value, else the first one declared
        here: DN 0 for Sentinel-2; saturated DN are averaged in), taking an
        overview or JPEG 2000 resolution level when the file has one: exact
        on full-resolution pixels, an overview's average otherwise, which is
        what a quicklook needs.
        """
        offsets = self._aligned_offsets(grid)
        rows, cols = out.shape
        if offsets is None or rows == 0 or cols == 0:
            return False
        row0, col0 = offsets
        if row0 < 0 or col0 < 0 or row0 + rows * factor > self.height or col0 + cols * factor > self.width:
            return False
        window = Window(col0, row0, cols * factor, rows * factor)
        failure: str | None = None
        try:
            with rasterio.open(self.path, driver=self.driver) as ds:
                if self.nodata and ds.nodata is None:
                    # declare our no-data values to GDAL through a VRT so that the average skips them
                    with WarpedVRT(ds, src_nodata=self.nodata[0], nodata=self.nodata[0], dtype="float32") as vrt:
                        raw = vrt.read(self.band, window=window, out_shape=(rows, cols), out_dtype="float32",
                                       resampling=Resampling.average, masked=True)
                else:
                    raw = ds.read(self.band, window=window, out_shape=(rows, cols), out_dtype="float32",
                                  resampling=Resampling.average, masked=True)
        except (RasterioError, OSError) as exc:
            failure = error_detail(exc)
        if failure is not None:
            raise InputError(f"{self.path}: cannot read pixels of the {self.role} ({failure})")
        values = self.to_physical(np.ma.getdata(raw))
        values[np.ma.getmaskarray(raw)] = np.nan
        out[:] = values
        return True

    def _aligned_offsets(self, grid: Grid) -> tuple[int, int] | None:
        """(row, col) offset of ``grid`` in this raster if both share one pixel grid."""
        if grid.crs != self.crs:
            return None
        (sx, sy), (gx, gy) = self.res, grid.res
        if not (math.isclose(sx, gx, rel_tol=1e-9) and math.isclose(sy, gy, rel_tol=1e-9)):
            return None
        col = (grid.transform.c - self.transform.c) / sx
        row = (self.transform.f - grid.transform.f) / sy
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None
        return round(row), round(col)

    def _read_direct(self, ds: rasterio.io.DatasetReader, grid: Grid, offsets: tuple[int, int],
                     out: np.ndarray) -> None:
        row0, col0 = offsets
        r0, c0 = max(row0, 0), max(col0, 0)
        r1, c1 = min(row0 + grid.height, self.height), min(col0 + grid.width, self.width)
        if r1 <= r0 or c1 <= c0:
            return
        raw = ds.read(self.band, window=Window(c0, r0, c1 - c0, r1 - r0))
        self.to_physical(raw, out=out[r0 - row0:r1 - row0, c0 - col0:c1 - col0])


# ---------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------
def open_raster(path: Path, role: str, *, band: int = 1, nodata: Sequence[float] = (),
                use_file_nodata: bool = True, offset: float = 0.0, scale: float = 1.0,
                vrt: VrtPolicy = NO_VRT) -> RasterSource:
    """Open ``path`` for metadata only and check it can be used as ``role``.

    Checks: the file passes the input allow-list (:func:`~pipeline.io.allow_list.input_driver`:
    a local GeoTIFF/COG or JPEG 2000 file, or a checked VRT when ``vrt`` allows it), GDAL
    opens it with that driver only, it has a CRS and a north-up geotransform,
    the band exists and (GeoTIFF, JPEG 2000) the file is not shorter than its
    own index says. No pixels are read. Raises :class:`InputError` naming the
    file.
    """
    opened_as = input_driver(path, role, vrt)
    path = Path(path)
    try:
        with rasterio.open(path, driver=opened_as) as ds:
            crs, transform = ds.crs, ds.transform
            width, height, count = ds.width, ds.height, ds.count
            driver = ds.driver
            file_nodata = ds.nodatavals[band - 1] if 0 < band <= count else None
            dtype = ds.dtypes[band - 1] if 0 < band <= count else ds.dtypes[0]
            if driver == "GTiff":
                _check_tiff_blocks(ds, path, role)
    except InputError:
        raise
    except (RasterioError, OSError) as exc:
        raise InputError(f"{path}: {role} cannot be opened as a raster by GDAL ({error_detail(exc)})") from None
    if not 0 < band <= count:
        raise InputError(f"{path}: {role} has {count} band(s), band {band} was asked for")
    _check_georeferencing(path, role, crs, transform)
    if driver in JP2_DRIVERS:
        _check_jp2_boxes(path, role)
    values = [float(v) for v in nodata]
    if use_file_nodata and file_nodata is not None:
        values.append(float(file_nodata))
    unique = tuple(dict.fromkeys(v for v in values if not math.isnan(v)))
    return RasterSource(path=path, role=role, crs=CRS.from_user_input(crs), transform=transform,
                        width=width, height=height, dtype=str(dtype), band=band, nodata=unique,
                        offset=offset, scale=scale, driver=opened_as)


def _check_georeferencing(path: Path, role: str, crs: CRS | None, transform: Affine) -> None:
    """Fail unless the raster has a CRS and a north-up geotransform without rotation."""
    if crs is None:
        raise InputError(
            f"{path}: {role} has no CRS (coordinate reference system); assign the right one, "
            f"for example: gdal_edit.py -a_srs EPSG:32633 {path}"
        )
    if transform.is_identity:
        raise InputError(f"{path}: {role} has no geotransform (pixel positions unknown)")
    if transform.b != 0 or transform.d != 0 or transform.a <= 0 or transform.e >= 0:
        raise InputError(
            f"{path}: {role} must be a north-up raster without rotation, got geotransform "
            f"{tuple(transform)[:6]}; warp it first (gdalwarp)"
        )


def _check_tiff_blocks(ds: rasterio.io.DatasetReader, path: Path, role: str) -> None:
    """Fail when a GeoTIFF's block index points past the end of the file."""
    size = path.stat().st_size
    bh, bw = ds.block_shapes[0]
    nrow, ncol = math.ceil(ds.height / bh), math.ceil(ds.width / bw)
    bands = range(1, ds.count + 1) if ds.interleaving and ds.interleaving.name == "BAND" else (1,)
    if nrow * ncol * len(bands) > 500_000:
        return
    for bidx in bands:
        for r in range(nrow):
            for c in range(ncol):
                off = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=bidx)
                nbytes = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=bidx)
                if off is None or nbytes is None:
                    return
                if int(off) + int(nbytes) > size:
                    raise InputError(
                        f"{path}: {role} is truncated or corrupt: block ({r}, {c}) of band {bidx} "
                        f"ends at byte {int(off) + int(nbytes)} but the file has {size} bytes"
                    )


def _check_jp2_boxes(path: Path, role: str) -> None:
    """Fail when a JPEG 2000 file is shorter than its boxes say or its codestream lacks an end."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[4:8] != b"jP  ":
            return  # raw codestream (.j2k) or unusual layout: GDAL opened it, let reads decide
        pos = 0
        while pos < size:
            fh.seek(pos)
            header = fh.read(16)
            if len(header) < 8:
                break
            length, kind = struct.unpack(">I4s", header[:8])
            if length == 1:
                length = struct.unpack(">Q", header[8:16])[0]
            elif length == 0:
                length = size - pos
            if length < 8 or pos + length > size:
                raise InputError(
                    f"{path}: {role} is truncated or corrupt: JPEG 2000 box {kind!r} at byte {pos} "
                    f"needs {length} bytes, the file has {size - pos} left"
                )
            if kind == b"jp2c":
                fh.seek(pos + length - 2)
                if fh.read(2) != b"\xff\xd9":
                    raise InputError(
                        f"{path}: {role} is truncated or corrupt: JPEG 2000 codestream has no end marker"
                    )
            pos += length
