"""Freed malloc memory goes back to the OS on the housekeeping tick (glibc only)."""

from __future__ import annotations

import pytest

from app.memory import _TRIM, release_free_memory


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(_TRIM is None, reason="malloc_trim is glibc's")
def test_memory_freed_below_the_top_of_the_heap_is_released() -> None:
    # 8 KiB buffers come from malloc's heap, not mmap; the last one, kept, pins the heap's top, so
    # glibc's own trimming (top of the heap only) cannot give back what is freed below it.
    buffers = [bytearray(8192) for _ in range(12_000)]
    pin = buffers[-1]
    del buffers[:-1]
    before = rss_mib()
    assert release_free_memory()
    after = rss_mib()
    assert before - after > 50, (before, after)  # ~94 MiB were freed below the pin
    assert len(pin) == 8192
