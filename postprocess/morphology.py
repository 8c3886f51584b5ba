"""Steps 1 and 2 of the cleaning: threshold, then opening and closing with disks in metres.

Both steps are local to each pixel's neighbourhood.

Blocks are processed with a halo equal to the sum of the structuring-element
radii (:func:`dask.array.map_overlap`), so the block-wise result is exactly the
whole-array result.

Pixels without data (``valid`` false, or outside the raster) are *unknown*:
they never erode a neighbour (erosion treats them as foreground) and never
grow (dilation treats them as background); the mask is always false there.
"""

from __future__ import annotations

import logging
import math

import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from pipeline.core.config import PostprocessSection
from pipeline.core.errors import ConfigError
from pipeline.core.grid import Grid

log = logging.getLogger(__name__)


def radius_in_pixels(radius_m: float, grid: Grid) -> float:
    """A radius in metres as a (fractional) number of pixels of ``grid``."""
    return float(radius_m) / float(grid.res[0])


def disk(radius_px: float, slack: float = 1e-9) -> np.ndarray | None:
    """Disk footprint: offsets with ``dx² + dy² <= r²``; None when ``r < 1`` (identity).

    ``slack`` is added to the radius and to its square so that a radius computed from metres
    (0.3 / 0.1, just under 3) gives the disk of the whole number it stands for. The SCL cloud
    buffer (:func:`pipeline.stack.masks.scl_exclusion`) uses none.
    """
    if radius_px < 1.0:
        return None
    half = int(math.floor(radius_px + slack))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    return (xx * xx + yy * yy) <= radius_px * radius_px + slack


def _halfwidth(structure: np.ndarray | None) -> int:
    return 0 if structure is None else structure.shape[0] // 2


def _row_runs(structure: np.ndarray) -> list[int] | None:
    """Half-widths of the footprint's rows when every row is one run centred on the middle column
    and the footprint is symmetric top to bottom (disks are), else None."""
    h, w = structure.shape
    if h % 2 == 0 or w % 2 == 0 or not np.array_equal(structure, structure[::-1]):
        return None
    mid = w // 2
    runs = []
    for row in structure:
        k = int(row.sum())
        if k == 0 or k % 2 == 0 or not row[mid - k // 2 : mid + k // 2 + 1].all():
            return None
        runs.append(k // 2)
    return runs


def _morph(x: np.ndarray, structure: np.ndarray, erosion: bool) -> np.ndarray:
    """Binary erosion (AND over the footprint, outside = true) or dilation (OR, outside = false)
    with a symmetric footprint of centred row runs.

    The same result as :func:`scipy.ndimage.binary_erosion` / ``binary_dilation`` with
    ``border_value`` 1 / 0, in a few whole-array passes: each row run is a sliding AND/OR along
    the rows, built by doubling (log2 of its length passes); the runs are then combined down the
    columns, instead of a generic walk over the neighbourhood.
    """
    runs = _row_runs(structure)
    if runs is None:  # any other footprint
        fn = ndi.binary_erosion if erosion else ndi.binary_dilation
        return fn(x, structure=structure, border_value=int(erosion))
    op = np.logical_and if erosion else np.logical_or
    half = len(runs) // 2
    wmax = max(runs)
    rows, cols = x.shape
    padded = np.pad(x, ((half, half), (wmax, wmax)), constant_values=erosion)
    along: dict[int, np.ndarray] = {}
    for w in sorted(set(runs)):
        base = padded[:, wmax - w : wmax + w + cols]  # output column j sees base[:, j : j + 2w + 1]
        length, span, acc = 2 * w + 1, 1, base
        while 2 * span <= length:  # acc[:, j] = op over base[:, j : j + 2 span]
            acc = op(acc[:, :-span], acc[:, span:])
            span *= 2
        along[w] = acc if span == length else op(acc[:, :cols], acc[:, length - span : length - span + cols])
    out = None
    for dy, w in enumerate(runs):
        part = along[w][dy : dy + rows, :cols]
        out = part.copy() if out is None else op(out, part, out=out)
    assert out is not None
    return out


def erode(mask: np.ndarray, known: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Erosion where unknown pixels (and the outside) count as foreground."""
    return _morph(mask | ~known, structure, True) & known


def dilate(mask: np.ndarray, known: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Dilation where unknown pixels (and the outside) count as background."""
    return _morph(mask & known, structure, False) & known


def open_close_array(
    mask: np.ndarray,
    known: np.ndarray,
    opening: np.ndarray | None,
    closing: np.ndarray | None,
) -> np.ndarray:
    """Opening then closing of one array (a whole raster or a block with its halo)."""
    out = np.asarray(mask, dtype=bool) & known
    if opening is not None:
        out = dilate(erode(out, known, opening), known, opening)
    if closing is not None:
        out = erode(dilate(out, known, closing), known, closing)
    return out


def threshold_mask(probability: da.Array, valid: da.Array, threshold: float) -> da.Array:
    """``probability >= threshold`` on valid pixels (NaN is never above)."""
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"postprocess.threshold: expected a value in (0, 1), got {threshold}")
    return da.map_blocks(
        lambda p, v: (p >= threshold) & v.astype(bool), probability, valid, dtype=bool
    )


def open_close(
    mask: da.Array,
    known: da.Array,
    opening_px: float,
    closing_px: float,
) -> da.Array:
    """Opening then closing (disk radii in pixels) per block with a halo.

    The halo is the sum of all four erosion/dilation radii, which is how far
    the edge of a block can influence the result: the output is identical to
    :func:`open_close_array` on the whole raster.
    """
    opening, closing = disk(opening_px), disk(closing_px)
    depth = 2 * _halfwidth(opening) + 2 * _halfwidth(closing)
    if depth == 0:
        return mask & known
    small = min(min(mask.chunks[0]), min(mask.chunks[1]))
    if depth > small:
        log.debug("halo %d px exceeds the smallest block (%d px); dask enlarges blocks", depth, small)
    out = da.map_overlap(
        open_close_array,
        mask,
        known,
        depth=depth,
        boundary=0,
        dtype=bool,
        trim=True,
        opening=opening,
        closing=closing,
    )
    # dask enlarges blocks smaller than the halo; later passes need the input layout
    return out if out.chunks == mask.chunks else out.rechunk(mask.chunks)


def opened_mask(probability: da.Array, known: da.Array, grid: Grid, params: PostprocessSection,
                threshold: float) -> da.Array:
    """Steps 1 and 2 (threshold, then opening and closing): the local start of
    :func:`postprocess.objects.clean_objects`, lazy, in ``probability``'s chunks.

    A caller that computes the probability anyway can compute this in the
    same computation (block by block, as soon as a block's neighbours are
    known), keep it with :func:`postprocess.packed_mask.pack_mask` and hand it to
    :func:`~postprocess.objects.clean_objects` as ``opened``.
    """
    mask = threshold_mask(probability, known, threshold)
    return open_close(
        mask, known, radius_in_pixels(params.opening_radius_m, grid), radius_in_pixels(params.closing_radius_m, grid)
    )
