"""Engine and session factory from settings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """PostgreSQL connections one process may hold: ``size`` kept open, ``overflow`` more under
    load (so ``size + overflow`` at most), waiting ``timeout_s`` for one when all are in use.
    ``pgbouncer``: the URL points at PgBouncer in transaction mode, where a server connection
    changes between transactions, so asyncpg must not keep prepared statements across them."""

    size: int = 10
    overflow: int = 20
    timeout_s: float = 30.0
    pgbouncer: bool = False

    @property
    def most(self) -> int:
        return self.size + self.overflow


def create_engine(url: str, *, echo: bool = False, pool: PoolConfig | None = None) -> AsyncEngine:
    """An async engine; for SQLite, the file's folder is created and WAL mode turned on."""
    parsed = make_url(url)
    # hide_parameters: a failed statement's error (logged with its traceback) never carries the
    # values it was given, a prompt or a key's hash among them; ``echo`` logs statements only.
    kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
        # SQLite takes one writer at a time; several pooled connections only contend for its
        # lock (seconds of p99 under load, measured in bench/). One connection queues the work
        # in the gateway instead, where waiting is cheap and fair.
        kwargs.update(pool_size=1, max_overflow=0, pool_timeout=60)
    else:
        pool = pool or PoolConfig()
        kwargs.update(
            pool_size=pool.size, max_overflow=pool.overflow, pool_timeout=pool.timeout_s, pool_pre_ping=True
        )
        if pool.pgbouncer and parsed.get_backend_name() == "postgresql":
            # SQLAlchemy's documented settings for asyncpg behind PgBouncer: no statement caches,
            # and unique names for the prepared statements asyncpg still makes per query.
            kwargs["connect_args"] = {
                "statement_cache_size": 0,
                "prepared_statement_cache_size": 0,
                "prepared_statement_name_func": _statement_name,
            }
    engine = create_async_engine(url, **kwargs)
    event.listen(engine.sync_engine, "handle_error", summarize_error)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", sqlite_pragmas)
    return engine


# A value quoted after a colon: "invalid input syntax for type integer: \"<the value>\"".
_QUOTED_VALUE = re.compile(r"(:\s*)(\"[^\"]*\"|'[^']*')")


def summarize_error(context: ExceptionContext) -> None:
    """Strips the values out of a database error before anything logs it.

    PostgreSQL's driver error carries a DETAIL ("Failing row contains (…, <the prompt>, …)",
    "Key (key_hash)=(<hash>) already exists") and some messages quote the offending value. The
    driver's own exception is cut from the chain (a logged traceback would print it), and what
    is left names the error and its constraint, never a value. Exception classes are unchanged,
    so an ``IntegrityError`` is still caught as one.
    """
    original = context.original_exception
    message = str(original)
    summary = _QUOTED_VALUE.sub(r'\1"[redacted]"', message.split("\n", 1)[0])
    original.args = (summary,)
    wrapped = context.sqlalchemy_exception
    if wrapped is not None and wrapped.args and isinstance(wrapped.args[0], str):
        # Its message was formatted from the driver's before this hook ran.
        wrapped.args = (wrapped.args[0].replace(message, summary), *wrapped.args[1:])
    original.__cause__ = None
    original.__context__ = None
    original.__suppress_context__ = True


def _statement_name() -> str:
    return f"__asyncpg_{uuid4()}__"


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run while a writer commits; busy_timeout waits instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL is safe against a crashed process (a commit is never half-applied); only
    # an OS crash or power loss can drop the last commits. It saves an fsync per transaction.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
