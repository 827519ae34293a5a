"""Cluster-wide housekeeping under a lease in the database (issue 24): one node runs each shared
chore per period, another takes over once the holder's lease lapses, and `python -m app worker`
does its share of housekeeping too (a cluster of workers alone stays clean).

The two nodes are two housekeepers with their own engines (their own connection pools, as two
processes have) on one PostgreSQL database; time is an injected clock, never a sleep.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from app.db.engine import create_engine
from app.db.leases import Leases
from app.db.migrate import upgrade_head
from app.db.writer import Writer, create_writer
from app.tasks.housekeeping import Chore, Housekeeper
from bench.books import query
from bench.gateway_process import MODELS_FILE, ROOT
from tests.conftest import ADMIN_KEY
from tests.services import fresh_postgres_database

PERIOD_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def writers(pg_url: str) -> AsyncIterator[list[Writer]]:
    """Two nodes' writers: two engines, two pools, one database."""
    engines = [create_engine(pg_url) for _ in range(2)]
    await upgrade_head(engines[0])
    made = [create_writer(engine) for engine in engines]
    try:
        yield made
    finally:
        for writer, engine in zip(made, engines, strict=True):
            await writer.aclose()
            await engine.dispose()


def nodes(writers: list[Writer], clock: Clock, runs: list[str]) -> list[tuple[Housekeeper, Chore]]:
    made = []
    for name, writer in zip(("node-a", "node-b"), writers, strict=True):

        async def purge(name: str = name) -> int:
            runs.append(name)
            return 0

        chore = Chore("task-purge", PERIOD_S, purge)
        made.append((Housekeeper(Leases(writer, holder=name, clock=clock), [chore]), chore))
    return made


async def test_one_node_runs_a_chore_per_period_and_another_takes_over(writers: list[Writer]) -> None:
    clock, runs = Clock(), []
    (a, chore_a), (b, chore_b) = nodes(writers, clock, runs)

    # Both try at the same moment, every period: exactly one runs it, and it stays the same one.
    for _ in range(5):
        ran = await asyncio.gather(a.step(chore_a), b.step(chore_b))
        assert sorted(ran) == [False, True]
        clock.advance(PERIOD_S)
    holder = runs[0]
    assert runs == [holder] * 5
    live, other = ((a, chore_a), (b, chore_b)) if holder == "node-a" else ((b, chore_b), (a, chore_a))

    # The holder dies (it stops running). Within its lease the other still may not run it ...
    clock.advance(PERIOD_S - 1)  # one period and a bit less since its last renewal
    assert not await other[0].step(other[1])
    # ... and once the lease lapsed (two periods), the other takes over, and keeps it.
    clock.advance(PERIOD_S + 2)
    assert await other[0].step(other[1])
    assert not await live[0].step(live[1])  # the old holder, back, finds it taken
    assert runs[-1] != holder and len(runs) == 6


async def test_a_holder_that_stops_cleanly_hands_over_at_once(writers: list[Writer]) -> None:
    clock, runs = Clock(), []
    (a, _), (b, chore_b) = nodes(writers, clock, runs)
    running = asyncio.create_task(a.run_forever())
    while a.runs["task-purge"] == 0:
        await asyncio.sleep(0.01)
    assert not await b.step(chore_b)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert await b.step(chore_b)  # released on the way out: no lease to wait out
    assert runs == ["node-a", "node-b"]


def test_standalone_worker_does_the_housekeeping(tmp_path: Path) -> None:
    """`python -m app worker` alone takes and runs every cluster-wide chore."""
    data = tmp_path / "data"
    config = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(data),
        "models_file": MODELS_FILE,
        "storage": {"path": str(data / "images")},
        "upstreams": [{"name": "local", "kind": "local", "models": ["*"]}],
        "logging": {"level": "INFO"},
    }
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "app", "--config", str(path), "worker"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    db = f"sqlite+aiosqlite:///{data / 'gateway.db'}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            try:
                held = {r["name"] for r in query(db, "SELECT name FROM leases")}
            except Exception:  # the schema is not there yet
                held = set()
            if {"task-purge", "hold-reconcile"} <= held:
                break
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.1)
    finally:
        worker.terminate()
        assert worker.wait(60) == 0
        log.close()
    # Given up on a clean exit, so another node takes them at once.
    assert query(db, "SELECT name FROM leases") == []
