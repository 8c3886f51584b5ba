"""Boolean masks kept bit-packed in memory: one bit per pixel, each dask block on its own.

The cleaning computes the opened and closed mask, and the mask after the size
and hole steps, once and keeps them packed (:func:`persist_mask`), so the
morphology and the labelling are not redone by every later pass or by the
writer of the mask raster.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np


def _unpack(packed: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    width = block_info[None]["chunk-shape"][1] if block_info else packed.shape[1] * 8
    return np.unpackbits(packed, axis=1, count=width).astype(bool)


def pack_mask(mask: da.Array) -> da.Array:
    """``mask`` bit-packed along rows (lazy, uint8): one bit per pixel, each block on its own."""
    packed_chunks = (mask.chunks[0], tuple((w + 7) // 8 for w in mask.chunks[1]))
    return mask.map_blocks(np.packbits, axis=1, dtype=np.uint8, chunks=packed_chunks)


def unpack_mask(packed: np.ndarray, chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> da.Array:
    """The lazy boolean mask (in ``chunks``) of bits computed from :func:`pack_mask` with those chunks."""
    packed_chunks = (chunks[0], tuple((w + 7) // 8 for w in chunks[1]))
    return da.from_array(packed, chunks=packed_chunks).map_blocks(_unpack, dtype=bool, chunks=chunks)


def persist_mask(mask: da.Array) -> da.Array:
    """``mask`` computed now (on the current scheduler) and kept bit-packed; the same lazy boolean array.

    Later graphs built on the result start from the stored bits instead of
    recomputing ``mask``'s whole history. Memory: one bit per pixel. The bits
    come back to this process (not a distributed ``persist``): graphs computed
    later may share keys with ``mask``'s history, and a scheduler that still
    holds that history would see the same keys with differently fused tasks.
    """
    return unpack_mask(pack_mask(mask).compute(), mask.chunks)
