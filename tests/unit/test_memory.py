"""glibc's malloc: large buffers reused, freed memory back to the OS on the housekeeping tick."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.core.memory import _MALLOPT, _TRIM, release_free_memory


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


FAULTS_OF_REPEATED_ANSWERS = """
import resource, sys
from app.core.memory import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()


def answer():
    # As the upstream read builds a body: 256 KiB chunks, joined into one 14 MiB answer (four
    # high-quality images in base64), all freed once relayed.
    chunks = [b"x" * (256 * 1024) for _ in range(56)]
    return b"".join(chunks)


for _ in range(3):
    answer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    answer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(_MALLOPT is None, reason="mallopt is glibc's")
def test_large_buffers_are_reused_instead_of_faulted_in_again() -> None:
    # Page faults are counted by the kernel, not timed. By default glibc trims the heap's top as
    # soon as an answer is freed, so the next one faults its ~7,000 pages in again (the gateway
    # spent 19 ms of system time per n=4 answer that way); tuned, the heap keeps them for reuse.
    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", FAULTS_OF_REPEATED_ANSWERS, mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(done.stdout)

    assert faults("default") > 10 * 3_000
    assert faults("tuned") < 1_000
