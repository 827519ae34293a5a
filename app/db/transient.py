"""Which database errors are transient, and how long a caller waits them out: the one place.

Many nodes share one PostgreSQL. When their pools together ask for more connections than it
allows ("too many clients"), when it restarts or a connection is dropped, or when a transaction
loses a serialization race, the work itself was fine: trying again a moment later succeeds. Such
an error must never fail a task whose worker lives, nor become a 500; a synchronous request that
cannot reach the database within ``database.retry_s`` is answered 503 with ``retry-after``.

How long to keep trying depends on who waits, so it is a context variable (``patience``): a
client's request waits ``database.retry_s`` (the writer's default), a running task and a
settlement (the upstream has answered; its charge must land) wait until the database is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from sqlalchemy import exc as sa_exc

log = logging.getLogger(__name__)
T = TypeVar("T")

# SQLSTATE classes and codes that say "the database could not do it now", not "it is wrong":
# 08 connection exceptions, 53 insufficient resources (53300 too_many_connections), 57P01-57P03
# shutdown / crash / cannot connect now, 40001 serialization failure, 40P01 deadlock, 55P03 lock
# not available.
_CLASSES = ("08", "53")
_CODES = frozenset({"57P01", "57P02", "57P03", "40001", "40P01", "55P03"})
# Of those, the ones after which the server certainly rolled the transaction back, so a failed
# COMMIT may be tried again (a dropped connection during COMMIT leaves its outcome unknown).
_ROLLED_BACK = frozenset({"40001", "40P01", "55P03"})

# Seconds to keep trying; None: until it succeeds (or the caller is cancelled); USUAL: the
# caller's own default (the writer's is ``database.retry_s``).
USUAL = -1.0
patience: ContextVar[float | None] = ContextVar("db_patience", default=USUAL)

INITIAL_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0


def sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None), error):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def is_transient(error: BaseException) -> bool:
    """A database error worth waiting out (see the module docstring).

    Only database errors count: SQLAlchemy's and the drivers' (with what caused them), and the
    bare connection errors asyncpg raises while connecting. An error of the gateway's own that
    merely happened while handling one (an upstream's refused connect) is not the database's."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True  # asyncpg reaching the server: refused, reset, timed out
    if not isinstance(error, sa_exc.SQLAlchemyError | sqlite3.Error) and not _from_driver(error):
        return False
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.TimeoutError):  # the pool had no connection to give in time
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        code = sqlstate(current)
        if code is not None and (code in _CODES or code[:2] in _CLASSES):
            return True
        driver = getattr(current, "orig", current)
        if isinstance(driver, sqlite3.OperationalError) and "locked" in str(driver):
            return True
        if isinstance(current, ConnectionError | TimeoutError) or type(current).__name__ in (
            "ConnectionDoesNotExistError",
            "CannotConnectNowError",
            "TooManyConnectionsError",
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def _from_driver(error: BaseException) -> bool:
    return type(error).__module__.startswith("asyncpg")


def rolled_back(error: BaseException) -> bool:
    """The server rolled the transaction back (so even a failed COMMIT may be retried)."""
    return sqlstate(error) in _ROLLED_BACK


@contextmanager
def patient(seconds: float | None) -> Iterator[None]:
    """Wait transient database errors out for ``seconds`` (None: until they pass) in this context."""
    token = patience.set(seconds)
    try:
        yield
    finally:
        patience.reset(token)


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    usual_s: float = 10.0,
    retryable: Callable[[BaseException], bool] = is_transient,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``attempt()`` until it succeeds, retrying errors ``retryable`` accepts with jittered
    exponential backoff for as long as the context's ``patience`` allows; then the last error."""
    limit = patience.get()
    if limit == USUAL:
        limit = usual_s
    deadline = None if limit is None else clock() + limit
    delay = INITIAL_BACKOFF_S
    tries = 0
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not retryable(exc):
                raise
            tries += 1
            if deadline is not None and clock() + delay > deadline:
                raise
            if tries == 1 or tries % 20 == 0:
                log.warning(
                    "database busy or unreachable; retrying",
                    extra={"fields": {"what": what, "tries": tries, "error": type(exc).__name__}},
                )
        await sleep(delay * random.uniform(0.5, 1.0))
        delay = min(MAX_BACKOFF_S, delay * 2)
