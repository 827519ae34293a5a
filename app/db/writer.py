"""Write transactions on the hot path: one function, one transaction, run where it is cheapest.

Metering writes twice per request (a reservation, then a settlement) and the task queue a few
times per task. Through the async ORM each statement paid for a session, a greenlet switch and,
on SQLite, a thread hop through aiosqlite: about 3 ms of CPU per request, most of the gateway's
cost (profile in BENCHMARKS.md). Here a write is a plain synchronous function over a Core
``Connection`` with pre-built statements, and the whole function runs in one go:

- SQLite: on one dedicated thread that owns its own connection, so a transaction costs one hop
  to that thread and back, and writes from the whole process queue there instead of contending
  for SQLite's lock (its busy handler sleeps for milliseconds when they collide).
- Other databases (PostgreSQL): through the async engine's pool with ``run_sync``; each statement
  still awaits the network, but without ORM sessions.

Every call waits for its own commit before returning, so nothing is acknowledged that is not
durable (a crash loses no ledger row: the crash tests check it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import sqlite_pragmas

T = TypeVar("T")
Work = Callable[[Connection], T]


class Writer(Protocol):
    """Runs ``work`` in a transaction of its own and returns its result once committed; an
    exception raised by ``work`` rolls the transaction back and propagates."""

    dialect: str

    async def run(self, work: Work[T]) -> T: ...

    async def aclose(self) -> None: ...


class ThreadWriter:
    """SQLite: every write of this process on one thread and one connection, in arrival order."""

    dialect = "sqlite"

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writer")

    def _connection(self) -> Connection:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is None or connection.closed or connection.invalidated:
            connection = self._engine.connect()
            self._local.connection = connection
        return connection

    def _call(self, work: Work[T]) -> T:
        connection = self._connection()
        try:
            with connection.begin():
                return work(connection)
        except BaseException:
            if connection.invalidated:
                connection.close()
            raise

    async def run(self, work: Work[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, work)

    def _close(self) -> None:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
        self._engine.dispose()

    async def aclose(self) -> None:
        # Queued writes run first: the pool executes in order, and this is queued last.
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close)
        self._pool.shutdown(wait=True)


class AsyncWriter:
    """Any other database: the async engine's pool, one connection per transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.dialect = engine.dialect.name

    async def run(self, work: Work[T]) -> T:
        async with self._engine.begin() as connection:
            return await connection.run_sync(work)

    async def aclose(self) -> None:
        """The engine belongs to the caller, which disposes of it."""


def create_writer(engine: AsyncEngine) -> Writer:
    """The writer for ``engine``'s database (SQLite gets its own synchronous connection)."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return AsyncWriter(engine)
    sync = create_engine(
        url.set(drivername="sqlite"),
        connect_args={"timeout": 30, "check_same_thread": False},
        pool_size=1,
        max_overflow=0,
    )
    event.listen(sync, "connect", sqlite_pragmas)
    return ThreadWriter(sync)
