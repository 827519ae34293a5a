"""Giving freed memory back to the operating system.

CPython returns its own small-object arenas when they empty, but buffers it gets from glibc's
malloc (request and response bodies, SQLite's page caches, the threads that write files) stay with
the process after a burst unless glibc trims them, which it does only at the top of the main heap.
In the soak (BENCHMARKS.md) such a burst left the gateway's RSS tens of megabytes above its steady
state for many minutes. ``malloc_trim`` releases free pages in every arena; it is called on the
gateway's housekeeping tick. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS)
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True if anything was released. Blocking: call it off the
    event loop (it walks every malloc arena)."""
    return bool(_TRIM(0)) if _TRIM is not None else False
