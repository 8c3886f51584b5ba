"""Handing freed memory back to the system in a worker process."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


def trim_heap() -> None:
    """Hand the memory freed in this process back to the system. glibc keeps freed allocations of
    up to 32 MiB (a strip, a batch, the model's activations) in the heap of the thread that made
    them, so a worker's threads would each hold on to a block task's worth. A few milliseconds,
    against a second or more of model time per strip. No-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
