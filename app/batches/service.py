"""Batches (OpenAI's Batch API for images): create, read, cancel, and the runner that advances them.

A batch moves validating → in_progress → finalizing → completed (or failed, expired, cancelling →
cancelled). Whichever process holds a batch's lease advances it one step at a time, so any node may
take over from one that died:

- **validating** reads the input file twice, streamed: once to check every line (a structural
  error fails the batch with OpenAI's ``errors`` list and nothing is reserved), once to write one
  ``batch_lines`` row per line (pending).
- **in_progress** admits pending lines, at most ``max_batch_lines_in_flight`` at a time, through
  ``TaskService.submit``: the gateway's one admission path (validate → moderate → rate-limit →
  reserve) and its fair queue. A line reserves only when it is admitted, never the whole file up
  front. A line refused at admission (invalid, blocked by moderation, ``insufficient_quota``) ends
  in the error file and the batch goes on; a per-minute limit or a full queue only pauses feeding.
  The task's idempotency key is the line's, so a line re-admitted after a crash finds its task.
- Finished tasks are collected into their lines; when no line is pending or queued, **finalizing**
  streams the output and error files to the store from the rows (never built in memory).
- **cancelling** (and expiry) stops the lines not yet running at once: pending lines end, queued
  tasks are failed while still queued and their holds go back; running lines finish and are billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.keys import Caller, KeyService
from app.batches.edits import spool_edit
from app.batches.files import FileService
from app.batches.forward import BatchForwarder
from app.batches.forward_lines import UPSTREAM
from app.batches.lines import ENDPOINTS, GENERATIONS, parsed_lines, validate_file
from app.billing.ledger import Hold
from app.core.errors import GatewayError, InvalidRequestError, NotFoundError, RateLimitError
from app.db.tables import Batch, BatchLine, LedgerEntry, Task, utcnow
from app.images.admission.requests import EditDraft, GenerationDraft, InputLimits
from app.images.intake.spool import SPOOL_PREFIX
from app.images.service import ImageService
from app.tasks.queue import FAILED, QUEUED, SUCCEEDED
from app.tasks.service import TaskService
from app.webhooks.endpoints import NO_WEBHOOK, WebhookEndpoints
from app.webhooks.outbox import Outbox

log = logging.getLogger(__name__)

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
WINDOWS = {"24h": 24 * 3600}
PENDING, QUEUED_LINE, OK, ERROR = "pending", "queued", "ok", "error"
INSERT_CHUNK = 500
PAGE = 200
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "insufficient_quota": 429,
    "rate_limit_error": 429,
}


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def batch_object(row: Batch) -> dict[str, Any]:
    """The SDK's ``Batch`` (``types/batch.py``); ``cost`` is the gateway's extension (micro-units)."""
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": row.errors,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": _ts(row.created_at),
        "in_progress_at": _ts(row.in_progress_at),
        "expires_at": _ts(row.expires_at),
        "finalizing_at": _ts(row.finalizing_at),
        "completed_at": _ts(row.completed_at),
        "failed_at": _ts(row.failed_at),
        "expired_at": _ts(row.expired_at),
        "cancelling_at": _ts(row.cancelling_at),
        "cancelled_at": _ts(row.cancelled_at),
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": row.metadata_,
        "cost_micros": row.cost_micros,
    }


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_lines_in_flight: int
    lease_s: float
    max_validation_errors: int


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if (
        not isinstance(metadata, dict)
        or len(metadata) > 16
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in metadata.items()
        )
    ):
        raise InvalidRequestError(
            "metadata must be an object of at most 16 string keys (64 characters) and string values "
            "(512 characters).",
            param="metadata",
            code="invalid_value",
        )
    return metadata


class BatchService:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        files: FileService,
        tasks: TaskService,
        images: ImageService,
        keys: KeyService,
        limits: BatchLimits,
        spool_root: Path,
        input_limits: InputLimits,
        outbox: Outbox | None = None,
        endpoints: WebhookEndpoints | None = None,
        forwarder: BatchForwarder | None = None,
    ) -> None:
        self._sessions = sessions
        # Lines routed to an upstream with its own Batch API go there as one batch (forward.py).
        self._forward = forwarder
        self._files = files
        self._tasks = tasks
        self._images = images
        self._keys = keys
        self._limits = limits
        self._spool_root = spool_root
        self._input_limits = input_limits
        self._outbox = outbox
        self._endpoints = endpoints
        self.wakeup = asyncio.Event()

    # ----- the API -------------------------------------------------------------------------------

    async def create(self, caller: Caller, payload: Any, *, base_url: str) -> Batch:
        if not isinstance(payload, dict):
            raise InvalidRequestError("The body must be a JSON object.", code="invalid_value")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(payload.get(name), str):
                raise InvalidRequestError(
                    f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
                )
        endpoint, window = payload["endpoint"], payload["completion_window"]
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"This gateway runs batches for {', '.join(ENDPOINTS)}; '{endpoint[:64]}' is not one.",
                param="endpoint",
                code="invalid_value",
            )
        if window not in WINDOWS:
            raise InvalidRequestError(
                "completion_window must be '24h'.", param="completion_window", code="invalid_value"
            )
        metadata = _check_metadata(payload.get("metadata"))
        source = await self._files.get(payload["input_file_id"], caller.key_id)
        if source.purpose != "batch":
            raise InvalidRequestError(
                "The input file must have been uploaded with purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )
        now = utcnow()
        row = Batch(
            id=new_batch_id(),
            key_id=caller.key_id,
            endpoint=endpoint,
            input_file_id=source.id,
            completion_window=window,
            status="validating",
            metadata_=metadata,
            base_url=base_url[:300],
            created_at=now,
            expires_at=now + timedelta(seconds=WINDOWS[window]),
        )
        async with self._sessions() as session, session.begin():
            session.add(row)
        self.wakeup.set()
        return row

    async def get(self, batch_id: str, key_id: str) -> Batch:
        async with self._sessions() as session:
            row = await session.get(Batch, batch_id)
        if row is None or row.key_id != key_id:
            raise NotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
        return row

    async def page(self, key_id: str, *, limit: int, after: str | None) -> tuple[Sequence[Batch], bool]:
        query = select(Batch).where(Batch.key_id == key_id)
        if after is not None:
            anchor = await self.get(after, key_id)
            query = query.where(
                or_(
                    Batch.created_at < anchor.created_at,
                    and_(Batch.created_at == anchor.created_at, Batch.id < anchor.id),
                )
            )
        query = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        return rows[:limit], len(rows) > limit

    async def cancel(self, batch_id: str, key_id: str) -> Batch:
        row = await self.get(batch_id, key_id)
        if row.status in ("cancelling", "cancelled"):
            return row
        if row.status not in ("validating", "in_progress"):
            raise InvalidRequestError(
                f"Cannot cancel a batch with status '{row.status}'.", param="batch_id", code="invalid_value"
            )
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(Batch)
                .where(Batch.id == row.id, Batch.status.in_(("validating", "in_progress")))
                .values(status="cancelling", cancelling_at=utcnow())
            )
        self.wakeup.set()
        return await self.get(batch_id, key_id)

    # ----- the runner ----------------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event, *, worker: str, poll_s: float) -> None:
        """Advance due batches until ``stop``; a failed round is logged and retried."""
        while not stop.is_set():
            try:
                busy = await self.advance_due(worker)
            except Exception:
                log.exception("advancing batches failed; retrying")
                busy = False
            if busy:
                await asyncio.sleep(0)
                continue
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=poll_s)

    async def advance_due(self, worker: str, *, now: datetime | None = None) -> bool:
        """One step of every active batch whose lease is free; whether any made progress."""
        current = now or utcnow()
        async with self._sessions() as session:
            ids = (
                await session.scalars(
                    select(Batch.id)
                    .where(
                        Batch.status.in_(ACTIVE),
                        or_(Batch.lease_until.is_(None), Batch.lease_until < current, Batch.worker == worker),
                    )
                    .order_by(Batch.created_at)
                    .limit(20)
                )
            ).all()
        moved = False
        for batch_id in ids:
            if not await self._lease(batch_id, worker, current):
                continue
            moved = await self.step(batch_id) or moved
        return moved

    async def _lease(self, batch_id: str, worker: str, now: datetime) -> bool:
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(Batch)
                .where(
                    Batch.id == batch_id,
                    or_(Batch.lease_until.is_(None), Batch.lease_until < now, Batch.worker == worker),
                )
                .values(worker=worker, lease_until=now + timedelta(seconds=self._limits.lease_s))
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def step(self, batch_id: str) -> bool:
        async with self._sessions() as session:
            row = await session.get(Batch, batch_id)
        if row is None:
            return False
        if row.status == "validating":
            await self._validate(row)
            return True
        if row.status == "finalizing":
            await self._finalize(row, "completed")
            return True
        expired = row.status == "in_progress" and utcnow() >= row.expires_at
        if row.status == "cancelling" or expired:
            code = "batch_cancelled" if row.status == "cancelling" else "batch_expired"
            await self._stop_unstarted(row, code)
        moved = False
        if self._forward is not None:
            stopping = (
                "batch_cancelled" if row.status == "cancelling" else "batch_expired" if expired else None
            )
            moved, scanning = await self._forward.advance(row, stopping=stopping, recount=self._recount)
            if scanning:
                return moved  # no line runs as a task until the forwarded ones are taken out
        moved = await self._collect(row) or moved
        if row.status == "in_progress" and not expired:
            moved = await self._feed(row) or moved
        counts = await self._counts(row.id)
        if not any(counts.get(state, 0) for state in (PENDING, QUEUED_LINE, UPSTREAM)):
            final = "completed" if row.status == "in_progress" and not expired else None
            if final == "completed" and self._forward is not None and await self._forward.expired(row.id):
                final = "expired"  # its upstream batch expired: so does it, as OpenAI's would
            if row.status == "cancelling":
                final = "cancelled"
            elif expired:
                final = "expired"
            assert final is not None
            await self._finalize(row, final)
            return True
        return moved

    async def _validate(self, row: Batch) -> None:
        source = await self._files.get(row.input_file_id, row.key_id)
        checked = await validate_file(
            self._files.content(source), row.endpoint, max_errors=self._limits.max_validation_errors
        )
        if checked.error_count:
            hooks = await self._hook_endpoints(row)
            async with self._sessions() as session, session.begin():
                failed = await session.execute(
                    update(Batch)
                    .where(Batch.id == row.id, Batch.status == "validating")
                    .values(
                        status="failed",
                        failed_at=utcnow(),
                        errors={"object": "list", "data": checked.errors},
                    )
                )
                await self._event_in(session, row, "failed", failed.rowcount, hooks)  # type: ignore[attr-defined]
            self._tasks.on_events()
            return
        async with self._sessions() as session, session.begin():
            # A validation cut short by a crash left some rows: start over.
            await session.execute(delete(BatchLine).where(BatchLine.batch_id == row.id))
        chunk: list[dict[str, Any]] = []
        total = 0
        async for line in parsed_lines(self._files.content(source), row.endpoint):
            chunk.append(
                {
                    "batch_id": row.id,
                    "line": line.line,
                    "custom_id": line.custom_id,
                    "body": line.body,
                    "state": PENDING,
                }
            )
            total += 1
            if len(chunk) >= INSERT_CHUNK:
                await self._insert(chunk)
                chunk = []
        if chunk:
            await self._insert(chunk)
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(Batch)
                .where(Batch.id == row.id, Batch.status == "validating")
                .values(status="in_progress", in_progress_at=utcnow(), total=total)
            )
            # Cancelled while validating: nothing was admitted, so it ends here.
            await session.execute(
                update(Batch).where(Batch.id == row.id, Batch.status == "cancelling").values(total=total)
            )

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        async with self._sessions() as session, session.begin():
            await session.execute(BatchLine.__table__.insert(), rows)  # type: ignore[attr-defined]

    async def _counts(self, batch_id: str) -> dict[str, int]:
        async with self._sessions() as session:
            result = await session.execute(
                select(BatchLine.state, func.count())
                .where(BatchLine.batch_id == batch_id)
                .group_by(BatchLine.state)
            )
            return {state: int(count) for state, count in result.all()}

    async def _feed(self, row: Batch) -> bool:
        counts = await self._counts(row.id)
        room = self._limits.max_lines_in_flight - await self._in_flight(row.key_id)
        if room <= 0 or counts.get(PENDING, 0) == 0:
            return False
        async with self._sessions() as session:
            lines = (
                await session.scalars(
                    select(BatchLine)
                    .where(BatchLine.batch_id == row.id, BatchLine.state == PENDING)
                    .order_by(BatchLine.line)
                    .limit(room)
                )
            ).all()
        try:
            caller = await self._keys.caller_for(row.key_id)
        except GatewayError as exc:
            # The key was revoked or disabled: its remaining lines cannot run.
            for line in lines:
                await self._end_line(row, line, exc)
            return bool(lines)
        moved = False
        for line in lines:
            try:
                task = await self._admit(row, line, caller)
            except RateLimitError:
                break  # a per-minute limit or a full queue: the line waits for a later round
            except GatewayError as exc:
                await self._end_line(row, line, exc)
                moved = True
                continue
            async with self._sessions() as session, session.begin():
                await session.execute(
                    update(BatchLine)
                    .where(BatchLine.batch_id == row.id, BatchLine.line == line.line)
                    .values(state=QUEUED_LINE, task_id=task.id)
                )
            moved = True
        return moved

    async def _admit(self, row: Batch, line: BatchLine, caller: Caller) -> Task:
        """Admit one line as a task: the gateway's one admission path, as its endpoint's request."""
        request_id = f"{row.id}-{line.line}"
        idempotency_key = f"batch:{row.id}:{line.line}"
        if row.endpoint == GENERATIONS:
            draft = GenerationDraft(payload=line.body, request_id=request_id)
            task, _ = await self._tasks.submit(
                caller=caller, draft=draft, idempotency_key=idempotency_key, webhooks=[NO_WEBHOOK]
            )
            return task
        existing = await self._tasks.queue.find(caller.key_id, idempotency_key)
        if existing is not None:  # admitted before a crash: never twice
            return existing
        form = await spool_edit(line.body, key_id=row.key_id, files=self._files, spool_root=self._spool_root)
        try:
            edit = EditDraft(form=form, request_id=request_id, limits=self._input_limits)
            task, _ = await self._tasks.submit(
                caller=caller, draft=edit, idempotency_key=idempotency_key, form=form, webhooks=[NO_WEBHOOK]
            )
            return task
        finally:
            await asyncio.to_thread(form.cleanup)

    async def _in_flight(self, key_id: str) -> int:
        async with self._sessions() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(BatchLine)
                .join(Batch, Batch.id == BatchLine.batch_id)
                .where(Batch.key_id == key_id, Batch.status.in_(ACTIVE), BatchLine.state == QUEUED_LINE)
            )
        return int(count or 0)

    async def _end_line(self, row: Batch, line: BatchLine, exc: GatewayError) -> None:
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(BatchLine)
                .where(BatchLine.batch_id == row.id, BatchLine.line == line.line, BatchLine.state == PENDING)
                .values(state=ERROR, status_code=exc.status_code, error=exc.to_body()["error"])
            )
        await self._recount(row.id)

    async def _collect(self, row: Batch) -> bool:
        """Move the lines whose tasks finished to ok/error, and add their cost to the batch."""
        async with self._sessions() as session:
            done = (
                await session.execute(
                    select(BatchLine.line, Task.status, Task.error, Task.cost_micros)
                    .join(Task, Task.id == BatchLine.task_id)
                    .where(
                        BatchLine.batch_id == row.id,
                        BatchLine.state == QUEUED_LINE,
                        Task.status.in_((SUCCEEDED, FAILED)),
                    )
                )
            ).all()
        if not done:
            return False
        cost = 0
        async with self._sessions() as session, session.begin():
            for number, status, error, task_cost in done:
                ok = status == SUCCEEDED
                result = await session.execute(
                    update(BatchLine)
                    .where(
                        BatchLine.batch_id == row.id,
                        BatchLine.line == number,
                        BatchLine.state == QUEUED_LINE,
                    )
                    .values(
                        state=OK if ok else ERROR,
                        status_code=200 if ok else _status_of(error),
                        error=None if ok else error,
                    )
                )
                if result.rowcount:  # type: ignore[attr-defined]
                    cost += int(task_cost or 0)
            await session.execute(
                update(Batch).where(Batch.id == row.id).values(cost_micros=Batch.cost_micros + cost)
            )
            # The lines' ledger rows (written when their tasks settled) carry the batch's id.
            await session.execute(
                update(LedgerEntry)
                .where(
                    LedgerEntry.key_id == row.key_id,
                    LedgerEntry.request_id.in_([f"{row.id}-{number}" for number, *_ in done]),
                )
                .values(batch_id=row.id)
            )
        await self._recount(row.id)
        return True

    async def _recount(self, batch_id: str) -> None:
        counts = await self._counts(batch_id)
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(Batch)
                .where(Batch.id == batch_id)
                .values(completed=counts.get(OK, 0), failed=counts.get(ERROR, 0))
            )

    async def _stop_unstarted(self, row: Batch, code: str) -> None:
        """End the lines not yet running: pending ones at once, queued tasks while still queued
        (their holds go back: nothing was called upstream). Running lines finish and are billed."""
        message = (
            "This request was not run: the batch was cancelled."
            if code == "batch_cancelled"
            else "This request could not be executed before the completion window expired."
        )
        error = {"code": code, "message": message}
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(BatchLine)
                .where(BatchLine.batch_id == row.id, BatchLine.state == PENDING)
                .values(state=ERROR, error=error)
            )
        async with self._sessions() as session:
            queued = (
                (
                    await session.execute(
                        select(Task)
                        .join(BatchLine, BatchLine.task_id == Task.id)
                        .where(
                            BatchLine.batch_id == row.id,
                            BatchLine.state == QUEUED_LINE,
                            Task.status == QUEUED,
                        )
                    )
                )
                .scalars()
                .all()
            )
        for task in queued:
            async with self._sessions() as session, session.begin():
                result = await session.execute(
                    update(Task)
                    .where(Task.id == task.id, Task.status == QUEUED)
                    .values(status=FAILED, finished_at=utcnow(), lease_until=None, error=error)
                )
            if result.rowcount:  # type: ignore[attr-defined]
                # It never reached an upstream: its hold goes back whole.
                await self._images.release(
                    Hold(
                        id=task.hold_id or "",
                        key_id=task.key_id,
                        period=task.hold_period or "",
                        amount_micros=task.hold_micros,
                    )
                )
        await self._recount(row.id)

    async def _finalize(self, row: Batch, final: str) -> None:
        now = utcnow()
        if row.status != "finalizing" and final == "completed":
            async with self._sessions() as session, session.begin():
                await session.execute(
                    update(Batch)
                    .where(Batch.id == row.id, Batch.status == "in_progress")
                    .values(status="finalizing", finalizing_at=now)
                )
        output = await self._write_file(row, ok=True)
        errors = await self._write_file(row, ok=False)
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final]
        hooks = await self._hook_endpoints(row)
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(Batch)
                .where(Batch.id == row.id, Batch.status.in_(ACTIVE))
                .values(
                    status=final,
                    output_file_id=output,
                    error_file_id=errors,
                    worker=None,
                    lease_until=None,
                    **{stamp: utcnow()},
                )
            )
            await self._event_in(session, row, final, result.rowcount, hooks)  # type: ignore[attr-defined]
        if not result.rowcount:  # type: ignore[attr-defined]
            # Another process finished it first: drop this copy's files.
            for file_id in (output, errors):
                if file_id is not None:
                    with contextlib.suppress(NotFoundError):
                        await self._files.delete(file_id, row.key_id)
        else:
            await self._recount(row.id)
            self._tasks.on_events()

    async def _hook_endpoints(self, row: Batch) -> list[str]:
        """The key's enabled webhook endpoints, read before the transaction that ends the batch
        (on SQLite a second connection inside it would wait for the one it holds)."""
        if self._endpoints is None:
            return []
        return await self._endpoints.choose(row.key_id, None)

    async def _event_in(
        self, session: AsyncSession, row: Batch, status: str, changed: int, endpoints: list[str]
    ) -> None:
        """Queue ``batch.<status>`` for ``endpoints`` in the transaction that ends the batch (only
        when it did end it here: never twice)."""
        if not changed or self._outbox is None or not endpoints:
            return
        outbox = self._outbox
        snapshot = {"id": row.id, "object": "batch", "status": status}
        await session.run_sync(
            lambda sync: outbox.enqueue_event_in(
                sync.connection(),
                key_id=row.key_id,
                subject_id=row.id,
                event_type=f"batch.{status}",
                snapshot=snapshot,
                endpoints=endpoints,
            )
        )

    async def render(self, batch_id: str) -> dict[str, Any] | None:
        """The batch object for a webhook event; None when it is gone."""
        async with self._sessions() as session:
            row = await session.get(Batch, batch_id)
        return batch_object(row) if row is not None else None

    async def _write_file(self, row: Batch, *, ok: bool) -> str | None:
        """Stream the output (or error) lines to a temporary file, page by page, then store it."""
        await asyncio.to_thread(self._spool_root.mkdir, parents=True, exist_ok=True)
        # A spool folder like an upload's: the orphan sweep removes it if this process dies here.
        folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=SPOOL_PREFIX, dir=self._spool_root))
        path = folder / "file.jsonl"
        handle = await asyncio.to_thread(path.open, "wb")
        written = lines = 0
        try:
            after = 0
            states = (OK,) if ok else (ERROR,)
            while True:
                async with self._sessions() as session:
                    page = (
                        await session.scalars(
                            select(BatchLine)
                            .where(
                                BatchLine.batch_id == row.id,
                                BatchLine.state.in_(states),
                                BatchLine.line > after,
                            )
                            .order_by(BatchLine.line)
                            .limit(PAGE)
                        )
                    ).all()
                for line in page:
                    data = orjson.dumps(await self._output_line(row, line)) + b"\n"
                    await asyncio.to_thread(handle.write, data)
                    written += len(data)
                    lines += 1
                if len(page) < PAGE:
                    break
                after = page[-1].line
            await asyncio.to_thread(handle.close)
            if not lines:
                return None
            kind = "output" if ok else "error"
            stored = await self._files.keep(
                row.key_id,
                path,
                filename=f"{row.id}_{kind}.jsonl",
                purpose="batch_output",
                size=written,
                lines=lines,
            )
            return stored.id
        finally:
            handle.close()
            await asyncio.to_thread(shutil.rmtree, folder, True)

    async def _output_line(self, row: Batch, line: BatchLine) -> dict[str, Any]:
        """One line of the output or error file, in OpenAI's batch output shape: ``response`` is the
        request's answer (status, request id, body), ``error`` the batch's own (expired, cancelled)."""
        request_id = f"{row.id}-{line.line}"
        response: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        if line.state == OK and line.task_id is None and self._forward is not None:
            response = await self._forward.response(row, line)
            if response is None:
                error = {"code": "result_gone", "message": "The result was purged before the batch ended."}
        elif line.state == OK and line.task_id is not None:
            view = await self._tasks.render(line.task_id, base_url=row.base_url)
            if view is not None and "result" in view:
                response = {"status_code": 200, "request_id": request_id, "body": view["result"]}
            else:
                error = {"code": "result_gone", "message": "The result was purged before the batch ended."}
        elif line.status_code is None:
            error = line.error
        else:
            # The request's own OpenAI error object, as a single request would have answered it.
            response = {
                "status_code": line.status_code,
                "request_id": request_id,
                "body": dict(error=line.error),
            }
        return {
            "id": f"batch_req_{row.id[6:]}_{line.line}",
            "custom_id": line.custom_id,
            "response": response,
            "error": error,
        }


def _status_of(error: dict[str, Any] | None) -> int | None:
    """The HTTP status a failed line's request would have had; None for the batch's own errors."""
    if (error or {}).get("code") in ("batch_cancelled", "batch_expired"):
        return None
    return _STATUS_BY_TYPE.get(str((error or {}).get("type")), 500)
