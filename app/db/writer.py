"""Write transactions on the hot path: one function, one transaction, run where it is cheapest.

Metering writes twice per request (a reservation, then a settlement) and the task queue a few
times per task. Through the async ORM each statement paid for a session, a greenlet switch and,
on SQLite, a thread hop through aiosqlite: about 3 ms of CPU per request, most of the gateway's
cost (profile in BENCHMARKS.md). Here a write is a plain synchronous function over a Core
``Connection`` with pre-built statements, and the whole function runs in one go:

- SQLite: right away on the event loop when the database's write lock is free (``BEGIN
  IMMEDIATE`` with no busy wait: a transaction of a few statements takes tens of microseconds,
  less than a hop to a thread and back); when another connection or process holds the lock, on a
  dedicated thread whose connection waits for it, so the event loop never sleeps on a lock.
- Other databases (PostgreSQL): through the async engine's pool with ``run_sync``; each statement
  still awaits the network, but without ORM sessions.

Every call returns once its transaction has committed, so nothing is acknowledged that is not
durable (a crash loses no ledger row: the crash tests check it).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import sqlite_pragmas
from app.db.transient import is_transient, retrying, rolled_back

T = TypeVar("T")
Work = Callable[[Connection], T]

# Inline commits between two WAL checkpoints. The inline connection never checkpoints itself (a
# checkpoint writes and syncs the database file, which must not happen on the event loop); the
# writer thread does, often enough that the WAL stays a few megabytes (each commit appends every
# page it touched: ~50 kB for a ledger transaction).
CHECKPOINT_EVERY = 200
# How long a checkpoint may wait for readers to leave the WAL before giving up until the next one.
# Writers queue behind it meanwhile, so it is short.
CHECKPOINT_WAIT_MS = 200


class WouldBlock(Exception):
    """``run_now`` could not start its transaction without waiting; use ``run``."""


class Writer(Protocol):
    """Runs ``work`` in a transaction of its own and returns its result once committed; an
    exception raised by ``work`` rolls the transaction back and propagates."""

    dialect: str

    def run_now(self, work: Work[T]) -> T:
        """Run ``work`` synchronously if that needs no waiting, else raise ``WouldBlock``."""
        ...

    async def run(self, work: Work[T]) -> T: ...

    async def aclose(self) -> None: ...


class SqliteWriter:
    """SQLite: inline when the write lock is free, else on one thread that waits for it."""

    dialect = "sqlite"

    def __init__(self, waiting: Engine, inline: Engine, *, busy_timeout_ms: int = 30_000) -> None:
        self._waiting = waiting
        self._busy_timeout_ms = busy_timeout_ms
        self._inline_engine = inline
        self._inline: Connection | None = None
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writer")
        self._commits = 0

    def run_now(self, work: Work[T]) -> T:
        connection = self._inline
        if connection is None or connection.closed or connection.invalidated:
            connection = self._inline = self._inline_engine.connect()
        try:
            result = _transact(connection, work)
        except sqlite3.OperationalError as exc:
            if _locked(exc):  # raised by BEGIN IMMEDIATE: nothing ran
                raise WouldBlock from None
            raise
        self._committed()
        return result

    async def run(self, work: Work[T]) -> T:
        try:
            return self.run_now(work)
        except WouldBlock:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, self._call, work)
            # Commits on the thread grow the WAL too; left uncounted, a busy spell (when most writes
            # wait for the lock) stretched the gap between checkpoints far past CHECKPOINT_EVERY.
            self._committed()
            return result

    def _committed(self) -> None:
        # Called on the event loop only, so the counter needs no lock.
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0:
            self._pool.submit(self._checkpoint)

    def _connection(self) -> Connection:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is None or connection.closed or connection.invalidated:
            connection = self._waiting.connect()
            self._local.connection = connection
        return connection

    def _call(self, work: Work[T]) -> T:
        return _transact(self._connection(), work)

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and start it over from zero bytes.

        A PASSIVE checkpoint is not enough under steady load: the WAL only starts over when a
        writer begins after *every* frame was copied, and inline commits keep appending while this
        thread copies, so it grew by ~15 MB/s in the soak. TRUNCATE holds off writers while it
        works (they wait on this thread's queue), briefly: few distinct pages change between two
        checkpoints.
        """
        raw = self._connection().connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        raw.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
        try:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError:
            pass  # readers stayed too long: the next checkpoint will do it
        finally:
            raw.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")

    def _close(self) -> None:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
        self._waiting.dispose()

    async def aclose(self) -> None:
        # Queued writes run first: the pool executes in order, and this is queued last.
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close)
        self._pool.shutdown(wait=True)
        if self._inline is not None:
            self._inline.close()
        self._inline_engine.dispose()


class AsyncWriter:
    """Any other database: the async engine's pool, one connection per transaction.

    A transient error (no connection to be had, a dropped connection, a serialization failure:
    app/db/transient.py) runs the whole transaction again after a backoff, for as long as the
    context's patience allows (``retry_s`` by default). Never when the connection dropped during
    COMMIT: whether that transaction landed is unknown, so it is not written a second time."""

    def __init__(self, engine: AsyncEngine, *, retry_s: float = 10.0) -> None:
        self._engine = engine
        self.dialect = engine.dialect.name
        self._retry_s = retry_s

    def run_now(self, work: Work[T]) -> T:  # noqa: ARG002
        raise WouldBlock  # every statement is network I/O

    async def run(self, work: Work[T]) -> T:
        ran = False

        def tracked(connection: Connection) -> T:
            nonlocal ran
            result = work(connection)
            ran = True
            return result

        async def attempt() -> T:
            nonlocal ran
            ran = False
            async with self._engine.begin() as connection:
                return await connection.run_sync(tracked)

        def retryable(error: BaseException) -> bool:
            return is_transient(error) and (not ran or rolled_back(error))

        return await retrying(attempt, what="write", usual_s=self._retry_s, retryable=retryable)

    async def aclose(self) -> None:
        """The engine belongs to the caller, which disposes of it."""


def create_writer(engine: AsyncEngine, *, retry_s: float = 10.0) -> Writer:
    """The writer for ``engine``'s database (SQLite gets synchronous connections of its own);
    ``retry_s``: how long a write waits out transient errors by default (app/db/transient.py)."""
    if engine.url.get_backend_name() != "sqlite":
        return AsyncWriter(engine, retry_s=retry_s)
    return SqliteWriter(_sqlite(engine, busy_timeout_s=30), _sqlite(engine, busy_timeout_s=0))


def _sqlite(engine: AsyncEngine, *, busy_timeout_s: float) -> Engine:
    """A one-connection synchronous engine on ``engine``'s file whose transactions take the write
    lock up front (``BEGIN IMMEDIATE``): a deferred transaction that reads before it writes can
    fail to upgrade its lock without waiting, which SQLite reports as busy at once."""
    sync = create_engine(
        engine.url.set(drivername="sqlite"),
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
        pool_size=1,
        max_overflow=0,
    )
    waits = busy_timeout_s > 0

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        sqlite_pragmas(dbapi_connection, record)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        if not waits:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()
        # Transactions are begun by `_transact`, not by the driver before the first write.
        dbapi_connection.isolation_level = None

    event.listen(sync, "connect", on_connect)
    return sync


def _transact(connection: Connection, work: Work[T]) -> T:
    """``work`` in a transaction that holds the write lock from its first statement.

    The BEGIN goes straight to the driver: if it fails (the lock is taken) nothing has started,
    on either side, so the connection is clean for the next attempt.
    """
    raw = connection.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    raw.execute("BEGIN IMMEDIATE")
    try:
        result = work(connection)
        connection.commit()  # SQLAlchemy's own transaction, begun by the first statement
        if raw.in_transaction:  # `work` ran nothing through SQLAlchemy
            raw.commit()
    except BaseException:
        connection.rollback()
        if raw.in_transaction:
            raw.rollback()
        raise
    return result


def _locked(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED") or "locked" in str(exc)
