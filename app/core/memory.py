"""How the gateway uses glibc's malloc: large buffers reused, freed memory given back on a tick.

Image answers are big (3.5 MB of base64 for one high-quality image, 14 MB for four), and each
passes through buffers of that size (the upstream read, chunk by chunk, then the body). With its
defaults glibc grew the heap for them and trimmed it again as soon as they were freed (or mapped and
unmapped them), so every request faulted its pages in anew: 19 ms of system time per n=4 answer,
more than all the rest of the request (strace showed the heap's top going up and down by the
answer's size on each request). :func:`tune_allocator` keeps that memory in the heap for the next
answer: 25 → 11 ms of CPU per n=4 answer, 7 → 4 ms for one image (BENCHMARKS.md).

The memory kept that way, and what else a burst leaves behind (CPython returns its own arenas, but
not what it got from malloc), goes back to the OS when :func:`release_free_memory` runs on the
gateway's housekeeping tick: ``malloc_trim`` releases free pages in every arena. Elsewhere than
glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import cast

log = logging.getLogger(__name__)


def _glibc(name: str, *argtypes: type[ctypes.c_int] | type[ctypes.c_size_t]) -> Callable[..., int] | None:
    """One of glibc's malloc functions, or None where the C library is another (musl, macOS)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return cast("Callable[..., int]", function)


_TRIM = _glibc("malloc_trim", ctypes.c_size_t)
_MALLOPT = _glibc("mallopt", ctypes.c_int, ctypes.c_int)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Allocations below this come from the heap, not their own mapping: glibc's ceiling (32 MiB on
# 64-bit), above the largest answer the catalog allows in one buffer (n=4 high-quality images).
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory at the top of the heap kept for reuse instead of trimmed at once (default 128 KiB):
# room for several answers in flight; the housekeeping tick's malloc_trim gives it back.
TRIM_THRESHOLD = 128 * 1024 * 1024


def tune_allocator() -> bool:
    """Keep large buffers in malloc's heap for reuse (see the module's docstring); True if set.
    Fixed values also stop glibc adapting its thresholds to the sizes it has seen freed, under which
    the same benchmark cell ran at one speed or at half of it from one start to the next."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        _MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True if anything was released. Blocking: call it off the
    event loop (it walks every malloc arena)."""
    return bool(_TRIM(0)) if _TRIM is not None else False
