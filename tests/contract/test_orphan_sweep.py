"""The orphan sweep is wired into a running gateway: folders left by a killed process go."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import LOCAL_UPSTREAM, Gateway

DAY = 86_400


def _old(path: Path) -> None:
    then = time.time() - DAY
    for item in [*path.rglob("*"), path]:
        os.utime(item, (then, then))


def test_a_started_gateway_sweeps_orphans_of_a_dead_process(
    tmp_path: Path, gateway_with: Callable[..., Gateway]
) -> None:
    data_dir = tmp_path / "gw0"  # where gateway_with puts its first gateway
    dead_spool = data_dir / "spool" / "upload-dead"
    live_spool = data_dir / "spool" / "upload-live"
    dead_inputs = data_dir / "task_inputs" / ("task_" + "ab" * 16)
    for folder in (dead_spool, live_spool, dead_inputs):
        folder.mkdir(parents=True)
        (folder / "000-image").write_bytes(b"\x89PNG")
    _old(dead_spool)
    _old(dead_inputs)

    gateway_with(LOCAL_UPSTREAM)

    deadline = time.monotonic() + 20
    while (dead_spool.exists() or dead_inputs.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not dead_spool.exists()
    assert not dead_inputs.exists()  # no task row: nobody will ever run it
    assert (live_spool / "000-image").exists()  # recent: may belong to a request in flight
