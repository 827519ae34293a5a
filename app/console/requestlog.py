"""The request log: one row per ``/v1`` request, admitted or refused, for the console.

The ledger only holds requests that reached an upstream, so a refused call (validation, moderation,
quota, rate limit, auth) left no trace an operator could search. This log records them all, off the
hot path, like the access log: the request's middleware hands a ``Seen`` (plain values it already
had) to ``record``, which appends it to a bounded in-memory queue and returns; a background task
(``run_forever``) writes what accumulated in one multi-row INSERT per batch. Parsing the error body,
hashing the prompt and reading tokens from the ledger all happen there, never in the request.

When the queue is full (the database is slower than the traffic) an entry is dropped and counted
(``dropped``, ``gateway_request_log_dropped`` on /metrics) rather than making a request wait: the
log is the record of traffic, not of money, and must never cost a request anything.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import orjson
from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.prepared import Prepared
from app.db.tables import LedgerEntry, RequestLogEntry
from app.db.writer import Writer

log = logging.getLogger(__name__)

# Every column but the id: what ``RequestLog._row`` builds, and so the INSERT's parameters.
_COLUMNS = tuple(column.name for column in RequestLogEntry.__table__.columns if column.name != "id")
_INSERT = Prepared(insert(RequestLogEntry), columns=_COLUMNS)

# Rows per transaction at most: bounds how long one write holds SQLite's lock (and, when the
# lock is free, the event loop: ~12 µs a row, so ~2.5 ms a batch).
MAX_BATCH = 200
# Rows deleted per purge transaction: memory and lock time stay flat however many are due.
PURGE_CHUNK = 5_000
# Longest error message kept (the column's width).
MAX_MESSAGE = 1_000
# Only this much of an error body is kept by the middleware (an OpenAI error body is far smaller).
MAX_ERROR_BODY = 4_096

STATUS_CLASSES = ("ok", "4xx", "5xx", "blocked")


@dataclass(slots=True)
class Seen:
    """What the middleware knew when a request ended: cheap to build, processed later."""

    at: float  # wall-clock seconds since the epoch, when the request came in
    request_id: str
    method: str
    route: str
    status: int
    latency_ms: int
    key_id: str | None = None
    key_name: str | None = None
    model: str | None = None
    upstream: str | None = None
    cost_micros: int | None = None
    prompt: str | None = None
    error_body: bytes | None = None


def status_class(status: int, error_code: str | None) -> str:
    if error_code == "moderation_blocked":
        return "blocked"
    if status >= 500:
        return "5xx"
    if status >= 400:
        return "4xx"
    return "ok"


def parse_error(body: bytes | None) -> tuple[str | None, str | None]:
    """The OpenAI error body's code (or type) and message; (None, None) for anything else."""
    if not body:
        return None, None
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None, None
    code = error.get("code") or error.get("type")
    message = error.get("message")
    return (
        str(code)[:100] if code else None,
        str(message)[:MAX_MESSAGE] if message else None,
    )


class RequestLog:
    """A bounded queue of ``Seen`` entries and the task that writes them in batches."""

    def __init__(
        self,
        engine: AsyncEngine,
        writer: Writer,
        *,
        capacity: int = 10_000,
        store_prompts: bool = False,
        linger_s: float = 0.2,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._capacity = capacity
        self._store_prompts = store_prompts
        self._linger_s = linger_s
        self._on_drop = on_drop
        self._queue: deque[Seen] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        # Counted for tests and /metrics.
        self.dropped = 0
        self.written = 0

    def record(self, seen: Seen) -> None:
        """Queue ``seen`` for the next batch; never waits. A full queue drops it (counted)."""
        if len(self._queue) >= self._capacity:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return
        self._queue.append(seen)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def flush(self) -> int:
        """Write everything queued now; returns how many rows were written."""
        written = 0
        async with self._lock:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                try:
                    await self._write(batch)
                except Exception:
                    # The log is not worth a retry loop that could grow without bound.
                    log.exception("request log batch lost", extra={"fields": {"entries": len(batch)}})
                    continue
                written += len(batch)
                await asyncio.sleep(0)  # a long backlog is written without starving requests
        self.written += written
        return written

    async def run_forever(self, *, retention: timedelta, purge_every_s: float) -> None:
        """Write batches as entries arrive, and purge rows older than ``retention`` now and then."""
        loop = asyncio.get_running_loop()
        next_purge = loop.time()
        while True:
            try:
                if loop.time() >= next_purge:
                    await self.purge(datetime.now(UTC) - retention)
                    next_purge = loop.time() + purge_every_s
                try:
                    async with asyncio.timeout(max(next_purge - loop.time(), 0.0)):
                        await self._wake.wait()
                except TimeoutError:
                    continue
                self._wake.clear()
                # Let a burst gather into one batch: one INSERT instead of many.
                await asyncio.sleep(self._linger_s)
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("request log write failed; retrying later")
                await asyncio.sleep(1.0)

    async def purge(self, cutoff: datetime) -> int:
        """Delete entries older than ``cutoff``, a chunk per transaction."""
        purged = 0
        while True:
            async with self._engine.begin() as conn:
                ids = (
                    (
                        await conn.execute(
                            select(RequestLogEntry.id)
                            .where(RequestLogEntry.created_at < cutoff)
                            .limit(PURGE_CHUNK)
                        )
                    )
                    .scalars()
                    .all()
                )
                if ids:
                    await conn.execute(delete(RequestLogEntry).where(RequestLogEntry.id.in_(ids)))
            purged += len(ids)
            if len(ids) < PURGE_CHUNK:
                if purged:
                    log.info("purged request log entries", extra={"fields": {"count": purged}})
                return purged

    async def _write(self, batch: Sequence[Seen]) -> None:
        rows = [self._row(seen) for seen in batch]
        await self._writer.run(partial(_insert, rows))

    def _row(self, seen: Seen) -> dict[str, Any]:
        code, message = parse_error(seen.error_body) if seen.status >= 400 else (None, None)
        # A lone surrogate (valid JSON, not valid UTF-8) would fail the batch on PostgreSQL.
        prompt = seen.prompt.encode("utf-8", "replace").decode() if seen.prompt is not None else None
        return {
            "created_at": datetime.fromtimestamp(seen.at, UTC),
            "request_id": seen.request_id,
            "key_id": seen.key_id,
            "key_name": seen.key_name,
            "method": seen.method[:10],
            "route": seen.route[:200],
            "model": seen.model[:100] if seen.model else None,
            "status": seen.status,
            "status_class": status_class(seen.status, code),
            "error_code": code,
            "error_message": message,
            "upstream": seen.upstream[:100] if seen.upstream else None,
            "latency_ms": seen.latency_ms,
            "tokens": 0,
            "cost_micros": seen.cost_micros or 0,
            "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest() if prompt is not None else None,
            "prompt": prompt if prompt is not None and self._store_prompts else None,
        }


def _insert(rows: list[dict[str, Any]], connection: Connection) -> None:
    """One batch in one transaction, on the gateway's writer (app/db/writer.py).

    On SQLite the writer runs it inline when the write lock is free, serialised with the ledger's
    own writes: through a separate aiosqlite connection, the log's transactions held the lock
    while the ledger's inline writes needed it, which sent those to the writer's thread and cost
    every request ~0.09 ms of CPU with the log on (``python -m bench.ab --config``, issue 26)."""
    admitted = [row["request_id"] for row in rows if row["status"] < 400]
    if admitted:
        # Tokens are the ledger's (written before the response ended): one read per batch.
        tokens = (
            LedgerEntry.text_input_tokens
            + LedgerEntry.image_input_tokens
            + LedgerEntry.text_output_tokens
            + LedgerEntry.image_output_tokens
        )
        found = connection.execute(
            select(LedgerEntry.request_id, func.sum(tokens), func.sum(LedgerEntry.cost_micros))
            .where(LedgerEntry.request_id.in_(admitted))
            .group_by(LedgerEntry.request_id)
        )
        usage = {request_id: (int(t or 0), int(c or 0)) for request_id, t, c in found}
        for row in rows:
            if row["request_id"] in usage:
                row["tokens"], cost = usage[row["request_id"]]
                row["cost_micros"] = row["cost_micros"] or cost
    _INSERT.execute_many(connection, rows)
