"""The SQLite writer: inline when the write lock is free, on its thread when it is not."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, event, text

from app.db.engine import create_engine
from app.db.writer import SqliteWriter, WouldBlock, Writer, create_writer


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[tuple[Writer, Path]]:
    path = tmp_path / "w.db"
    with sqlite3.connect(path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE t (x INTEGER)")
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    made = create_writer(engine)
    yield made, path
    await made.aclose()
    await engine.dispose()


def insert(value: int) -> Callable[[Connection], int]:
    def work(c: Connection) -> int:
        c.execute(text("INSERT INTO t VALUES (:x)"), {"x": value})
        return value

    return work


def rows(path: Path) -> list[int]:
    with sqlite3.connect(path) as reader:
        return [r[0] for r in reader.execute("SELECT x FROM t ORDER BY x")]


async def test_a_free_lock_means_the_write_is_done_on_return_of_run_now(writer: tuple[Writer, Path]) -> None:
    made, path = writer
    assert isinstance(made, SqliteWriter)
    assert made.run_now(insert(1)) == 1
    assert rows(path) == [1]


async def test_a_held_lock_sends_the_write_to_the_thread_which_waits_for_it(
    writer: tuple[Writer, Path],
) -> None:
    made, path = writer
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (10)")
    with pytest.raises(WouldBlock):
        made.run_now(insert(2))
    # The writer thread's connection reports each statement as it starts: BEGIN IMMEDIATE starting
    # while `other` holds the lock means the thread is now waiting for it.
    begun = threading.Event()
    assert isinstance(made, SqliteWriter)

    def trace(dbapi: sqlite3.Connection, _: object) -> None:
        dbapi.set_trace_callback(lambda sql: begun.set() if sql == "BEGIN IMMEDIATE" else None)

    event.listen(made._waiting, "connect", trace)
    pending = asyncio.ensure_future(made.run(insert(3)))
    assert await asyncio.to_thread(begun.wait, 30)  # the loop ran meanwhile: the wait is off it
    assert not pending.done()  # waiting on the lock, not refused (then this would be an error)
    other.execute("COMMIT")
    assert await asyncio.wait_for(pending, 30) == 3
    assert rows(path) == [3, 10]
    # The refused inline attempt left its connection clean.
    assert made.run_now(insert(4)) == 4
    assert rows(path) == [3, 4, 10]
    other.close()


async def test_an_error_in_the_work_rolls_the_whole_transaction_back(writer: tuple[Writer, Path]) -> None:
    made, path = writer

    def half(c: Connection) -> None:
        c.execute(text("INSERT INTO t VALUES (5)"))
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError):
        await made.run(half)
    assert rows(path) == []
    assert await made.run(insert(6)) == 6
    assert rows(path) == [6]


async def test_work_that_runs_nothing_still_ends_its_transaction(writer: tuple[Writer, Path]) -> None:
    made, path = writer
    assert await made.run(lambda c: None) is None
    # Were BEGIN IMMEDIATE still open, this other writer would time out.
    with sqlite3.connect(path, timeout=1) as other:
        other.execute("INSERT INTO t VALUES (7)")
    assert rows(path) == [7]


async def test_the_wal_is_checkpointed_and_kept_small_under_steady_writes(
    writer: tuple[Writer, Path],
) -> None:
    made, path = writer
    reader = sqlite3.connect(path)

    def big(c: Connection) -> None:
        c.execute(text("INSERT INTO t VALUES (:x)"), {"x": 1})
        c.execute(text("UPDATE t SET x = x + 1"))

    for round_ in range(12):
        for _ in range(100):
            await made.run(big)
        reader.execute("SELECT count(*) FROM t").fetchall()  # a reader between writes, as in the app
        await asyncio.sleep(0.01 if round_ % 2 else 0)
    await made.run(lambda c: None)
    # The writer thread runs its queue in order: once a job queued now has run, so has the
    # checkpoint queued at the last CHECKPOINT_EVERY-th commit (waiting on it, not on a timer).
    assert isinstance(made, SqliteWriter)
    await asyncio.get_running_loop().run_in_executor(made._pool, lambda: None)
    wal = path.with_name(path.name + "-wal")
    # Without checkpoints the WAL holds every commit's pages (~1,200 commits here); with them it
    # is truncated every CHECKPOINT_EVERY commits.
    assert wal.stat().st_size < 2 * 1024 * 1024, wal.stat().st_size
    reader.close()
