"""Forwarding a batch's lines to an upstream's own Batch API (an ``openai`` upstream, ``batch: true``).

The batch runner (app/batches/service.py) calls ``advance`` on each step of a batch it holds the
lease of, so one process at a time does all of this, and any other takes over from the database:

1. **Scan** (generations only): each pending line whose model routes first to a batch upstream is
   admitted like a single request (validated, moderated, its worst case reserved) and moves to
   state ``upstream`` with its admitted job, hold and price in ``forward``. A line refused here ends
   in the error file; a line that routes elsewhere stays pending and runs as a task. The scan goes
   ``forward_lines_per_step`` lines per step; its progress is on the row with an empty upstream.
2. **Upload and create**, per upstream: the lines go to one JSONL file (``custom_id`` is ``L`` and
   the gateway line number, so the tenant's ids never leave the gateway), uploaded with
   ``purpose=batch``; then one ``POST /batches``. Each id is written to ``upstream_batches`` before
   anything waits on it. An upload is preceded by a look for a file of its name, and a create by a
   look for a batch carrying this batch's id in its metadata, so one whose answer a crash or a lost
   connection took is found again, never made twice.
3. **Poll** with backoff (``poll_interval_s`` x1.5 up to ``poll_max_interval_s``), stored as
   ``next_poll_at``. A cancelled or expired gateway batch cancels the upstream one.
4. **Collect** (app/batches/forward_lines.py): the output and error files are read line by line.
   Each line is settled through the one settlement path, priced from its own ``usage``; the line's
   move out of ``upstream`` is the settlement's ``also`` hook, so a line is charged exactly once
   whatever crashes or repeats. Lines the upstream never answered (expired, cancelled, failed
   batch) end as errors; their holds go back.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.keys import Caller, KeyService
from app.batches.forward_lines import PENDING, UPSTREAM, ForwardedLines, Recount
from app.batches.lines import GENERATIONS
from app.core.errors import GatewayError, UpstreamError, UpstreamRejected
from app.db.tables import Batch, BatchLine, Reservation, UpstreamBatch, utcnow
from app.domain.catalog import Catalog
from app.images.admission.requests import GenerationDraft
from app.images.intake.spool import SPOOL_PREFIX
from app.images.service import ImageService
from app.storage import ImageStore
from app.tasks.inputs import job_spec
from app.upstream.providers.openai_batch import OpenAIBatchClient
from app.upstream.registry import ProviderRegistry

log = logging.getLogger(__name__)

SCAN = ""  # the upstream_batches row of a batch's scan
TERMINAL = ("completed", "failed", "expired", "cancelled")
METADATA_KEY = "gateway_batch_id"


@dataclass(frozen=True, slots=True)
class Discounts:
    """How much of the tenant's price a forwarded line is let off (ppm): the key's setting, else the
    model's, else the default. The upstream's own discount is the operator's either way."""

    default_ppm: int = 0
    models: dict[str, int] | None = None
    keys: dict[str, int] | None = None

    def for_line(self, key_id: str, model: str) -> int:
        if self.keys and key_id in self.keys:
            return self.keys[key_id]
        if self.models and model in self.models:
            return self.models[model]
        return self.default_ppm


class BatchForwarder:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        registry: ProviderRegistry,
        catalog: Catalog,
        images: ImageService,
        keys: KeyService,
        store: ImageStore,
        url_ttl_s: int,
        spool_root: Path,
        discounts: Discounts,
        lines_per_step: int = 500,
        hold_ttl_s: float = 3600.0,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._catalog = catalog
        self._images = images
        self._keys = keys
        self._store = store
        self._url_ttl_s = url_ttl_s
        self._spool_root = spool_root
        self._discounts = discounts
        self._per_step = lines_per_step
        self._hold_ttl = timedelta(seconds=hold_ttl_s)
        # When this process last pushed back the holds of each batch's lines at an upstream.
        self._renewed: dict[str, float] = {}
        self._results = ForwardedLines(
            sessions=sessions, catalog=catalog, images=images, store=store, url_ttl_s=url_ttl_s
        )
        self._clients = {
            client.name: client
            for provider in registry.providers()
            if isinstance(client := getattr(provider, "batch_client", None), OpenAIBatchClient)
        }

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    def route(self, model: str) -> tuple[OpenAIBatchClient, str] | None:
        """The batch upstream a model's requests go to first (its first tier), and the model's name
        there; None when its first tier has none, so its lines run as tasks."""
        routes = self._registry.routes(model)
        if not routes:
            return None
        first = min(r.priority for r in routes)
        for r in routes:
            if r.priority == first and r.name in self._clients:
                return self._clients[r.name], r.upstream_model
        return None

    # ----- one step ------------------------------------------------------------------------------

    async def advance(self, row: Batch, *, stopping: str | None, recount: Recount) -> tuple[bool, bool]:
        """One step of the batch's forwarding: (whether it moved, whether the scan is still going:
        then no pending line may run as a task yet). ``stopping``: the batch is being cancelled
        (``batch_cancelled``) or has expired (``batch_expired``)."""
        if not self.enabled or row.endpoint != GENERATIONS:
            return False, False
        async with self._sessions() as session:
            rows = {
                r.upstream: r
                for r in (
                    await session.scalars(select(UpstreamBatch).where(UpstreamBatch.batch_id == row.id))
                )
            }
        scan = rows.pop(SCAN, None)
        moved = False
        if scan is None or scan.state != "done":
            if stopping is None:
                return await self._scan(row, scan, rows, recount), True
            await self._set(row.id, SCAN, state="done")  # stopped mid-scan: the rest is not sent
            rows = await self._open_all(row.id, rows)
            moved = True
        for name, upstream in rows.items():
            client = self._clients.get(name)
            if upstream.state == "done":
                continue
            if client is None:  # the upstream was removed from the configuration meanwhile
                await self._results.end_rest(row, name, "batch_failed", recount)
                await self._set(row.id, name, state="done")
                moved = True
                continue
            try:
                moved = await self._advance_one(row, upstream, client, stopping, recount) or moved
            except UpstreamRejected as exc:
                # Once the upstream batch exists it runs (and bills) whatever the gateway's calls
                # meet, so a refusal then is waited out until the batch is stopped.
                sent = upstream.state in ("running", "collecting") and stopping is None
                if sent or exc.status_code >= 500 or exc.status_code == 429:
                    await self._later(upstream, client)
                    continue
                log.warning(
                    "an upstream refused a forwarded batch; its lines fail",
                    extra={"fields": {"batch_id": row.id, "upstream": name, "status": exc.status_code}},
                )
                await self._results.end_rest(row, name, "batch_failed", recount, error=exc)
                await self._set(row.id, name, state="done")
                moved = True
            except UpstreamError:
                await self._later(upstream, client)  # unreachable for now: tried again later
        return moved, False

    async def _advance_one(
        self,
        row: Batch,
        upstream: UpstreamBatch,
        client: OpenAIBatchClient,
        stopping: str | None,
        recount: Recount,
    ) -> bool:
        now = utcnow()
        if upstream.next_poll_at is not None and upstream.next_poll_at > now:
            return False  # not yet time to ask again (a poll's backoff, or a retry's)
        if upstream.state == "uploading":
            if stopping is not None:
                await self._results.end_rest(row, upstream.upstream, stopping, recount)
                await self._set(row.id, upstream.upstream, state="done")
                return True
            # An upload whose answer a crash (or a lost connection) took is found again by name.
            filename = f"{row.id}-{upstream.upstream}.jsonl"
            file_id = await client.find_file(filename) or await self._upload(
                row, upstream.upstream, client, filename
            )
            await self._set(row.id, upstream.upstream, state="creating", input_file_id=file_id)
            return True
        if upstream.state == "creating":
            assert upstream.input_file_id is not None
            found = await client.find(key=METADATA_KEY, value=row.id)
            if found is None and stopping is not None:  # never created: nothing to cancel there
                await self._results.end_rest(row, upstream.upstream, stopping, recount)
                await self._set(row.id, upstream.upstream, state="done")
                return True
            created = found or await client.create(
                input_file_id=upstream.input_file_id,
                endpoint=GENERATIONS,
                metadata={METADATA_KEY: row.id},
            )
            await self._set(
                row.id,
                upstream.upstream,
                state="running",
                upstream_batch_id=created["id"],
                upstream_status=created["status"],
                next_poll_at=now + timedelta(seconds=client.poll_interval_s),
            )
            return True
        if upstream.state == "running":
            assert upstream.upstream_batch_id is not None
            if stopping is not None and upstream.upstream_status not in ("cancelling", *TERMINAL):
                answer = await client.cancel(upstream.upstream_batch_id)
                await self._set(row.id, upstream.upstream, upstream_status=answer["status"])
                return True
            await self._keep_holds(row)
            answer = await client.retrieve(upstream.upstream_batch_id)
            status = str(answer["status"])
            if status in TERMINAL:
                await self._set(
                    row.id,
                    upstream.upstream,
                    state="collecting",
                    upstream_status=status,
                    output_file_id=_str(answer.get("output_file_id")),
                    error_file_id=_str(answer.get("error_file_id")),
                )
                return True
            delay = min(client.poll_interval_s * 1.5 ** (upstream.polls + 1), client.poll_max_interval_s)
            await self._set(
                row.id,
                upstream.upstream,
                upstream_status=status,
                polls=upstream.polls + 1,
                next_poll_at=now + timedelta(seconds=delay),
            )
            return False
        if upstream.state == "collecting":
            for answers in (upstream.output_file_id, upstream.error_file_id):
                if answers is not None:
                    async for raw in client.lines(answers):
                        await self._results.settle(row, upstream.upstream, raw)
            code = {"expired": "batch_expired", "cancelled": stopping or "batch_cancelled"}.get(
                str(upstream.upstream_status), "batch_failed"
            )
            await self._results.end_rest(row, upstream.upstream, code, recount)
            await self._set(row.id, upstream.upstream, state="done")
            self._renewed.pop(row.id, None)
            await recount(row.id)
            return True
        return False

    async def _keep_holds(self, row: Batch) -> None:
        """Push back the expiry of the holds of this batch's lines at an upstream, so that the
        reconciler never takes them while the upstream batch runs, whichever process polls it (the
        process that reserved them renews them only while it lives). Done a few times per TTL."""
        last = self._renewed.get(row.id)
        if last is not None and time.monotonic() - last < self._hold_ttl.total_seconds() / 4:
            return
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(Reservation)
                .where(Reservation.key_id == row.key_id, Reservation.request_id.like(f"{row.id}-%"))
                .values(expires_at=utcnow() + self._hold_ttl)
            )
        self._renewed[row.id] = time.monotonic()

    async def response(self, row: Batch, line: BatchLine) -> dict[str, Any] | None:
        """A forwarded line's answer as the output file shows it."""
        return await self._results.response(row, line)

    async def expired(self, batch_id: str) -> bool:
        """Whether an upstream batch of this batch expired (the batch then ends ``expired``, as the
        upstream's did)."""
        async with self._sessions() as session:
            found = await session.scalar(
                select(UpstreamBatch.batch_id)
                .where(UpstreamBatch.batch_id == batch_id, UpstreamBatch.upstream_status == "expired")
                .limit(1)
            )
        return found is not None

    # ----- scan ----------------------------------------------------------------------------------

    async def _scan(
        self, row: Batch, scan: UpstreamBatch | None, rows: dict[str, UpstreamBatch], recount: Recount
    ) -> bool:
        if scan is None:
            async with self._sessions() as session, session.begin():
                session.add(UpstreamBatch(batch_id=row.id, upstream=SCAN, state="admitting", polls=0))
            after = 0
        else:
            after = scan.polls  # the scan row's `polls` is the last line it looked at
        async with self._sessions() as session:
            lines = (
                await session.scalars(
                    select(BatchLine)
                    .where(BatchLine.batch_id == row.id, BatchLine.line > after, BatchLine.state == PENDING)
                    .order_by(BatchLine.line)
                    .limit(self._per_step)
                )
            ).all()
        if not lines:
            await self._set(row.id, SCAN, state="done")
            await self._open_all(row.id, rows)
            return True
        try:
            caller = await self._keys.caller_for(row.key_id)
        except GatewayError:
            # A revoked or disabled key: the task path ends its lines with the key's error.
            await self._set(row.id, SCAN, state="done")
            return True
        ended = False
        for line in lines:
            ended = await self._admit(row, line, caller, rows) or ended
        await self._set(row.id, SCAN, polls=lines[-1].line)
        if ended:
            await recount(row.id)
        return True

    async def _admit(
        self, row: Batch, line: BatchLine, caller: Caller, rows: dict[str, UpstreamBatch]
    ) -> bool:
        """Send one line upstream if its model routes to a batch upstream; whether it ended here."""
        request_id = f"{row.id}-{line.line}"
        try:
            job = await self._images.validate(
                caller=caller, draft=GenerationDraft(payload=line.body, request_id=request_id)
            )
        except GatewayError:
            return False  # the task path refuses it with the same error
        routed = self.route(job.model)
        if routed is None:
            return False
        client, upstream_model = routed
        try:
            job = await self._images.screen(caller=caller, job=job)
            hold = await self._images.reserve(caller=caller, job=job)
        except GatewayError as exc:
            await self._results.end_line(row.id, line.line, PENDING, exc.status_code, exc.to_body()["error"])
            return True
        discount = self._discounts.for_line(row.key_id, job.model)
        forward = {
            "upstream": client.name,
            "body": job.upstream_body(upstream_model),
            "job": job_spec(job),
            "hold": {"id": hold.id, "period": hold.period, "amount_micros": hold.amount_micros},
            # The key's multiplier with the tenant's share of the discount taken off.
            "ppm": caller.price_multiplier_ppm * (1_000_000 - discount) // 1_000_000,
        }
        if client.name not in rows:
            async with self._sessions() as session, session.begin():
                if await session.get(UpstreamBatch, (row.id, client.name)) is None:
                    session.add(
                        UpstreamBatch(batch_id=row.id, upstream=client.name, state="admitting", polls=0)
                    )
            rows[client.name] = UpstreamBatch(batch_id=row.id, upstream=client.name, state="admitting")
        async with self._sessions() as session, session.begin():
            moved = await session.execute(
                update(BatchLine)
                .where(BatchLine.batch_id == row.id, BatchLine.line == line.line, BatchLine.state == PENDING)
                .values(state=UPSTREAM, forward=forward)
            )
        if not moved.rowcount:  # type: ignore[attr-defined]
            await self._images.release(hold)  # ended meanwhile (cancelled): nothing was sent
        return False

    async def _open_all(self, batch_id: str, rows: dict[str, UpstreamBatch]) -> dict[str, UpstreamBatch]:
        """The scan is over: each upstream's lines are complete, ready to upload."""
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(UpstreamBatch)
                .where(UpstreamBatch.batch_id == batch_id, UpstreamBatch.state == "admitting")
                .values(state="uploading")
            )
        async with self._sessions() as session:
            fresh = (
                await session.scalars(
                    select(UpstreamBatch).where(
                        UpstreamBatch.batch_id == batch_id, UpstreamBatch.upstream != SCAN
                    )
                )
            ).all()
        rows.clear()
        rows.update({r.upstream: r for r in fresh})
        return rows

    # ----- upload --------------------------------------------------------------------------------

    async def _upload(self, row: Batch, name: str, client: OpenAIBatchClient, filename: str) -> str:
        """The upstream's lines as one JSONL file, written page by page to the spool, then sent."""
        await asyncio.to_thread(self._spool_root.mkdir, parents=True, exist_ok=True)
        folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=SPOOL_PREFIX, dir=self._spool_root))
        path = folder / "batch.jsonl"
        try:
            with path.open("wb") as handle:
                async for line in self._results.lines(row.id, name):
                    assert line.forward is not None
                    item = {
                        "custom_id": f"L{line.line}",
                        "method": "POST",
                        "url": GENERATIONS,
                        "body": line.forward["body"],
                    }
                    await asyncio.to_thread(handle.write, orjson.dumps(item) + b"\n")
            return await client.upload(path, filename=filename)
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)

    # ----- helpers -------------------------------------------------------------------------------

    async def _set(self, batch_id: str, upstream: str, **values: Any) -> None:
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(UpstreamBatch)
                .where(UpstreamBatch.batch_id == batch_id, UpstreamBatch.upstream == upstream)
                .values(**values)
            )

    async def _later(self, upstream: UpstreamBatch, client: OpenAIBatchClient) -> None:
        delay = min(client.poll_interval_s * 1.5 ** (upstream.polls + 1), client.poll_max_interval_s)
        await self._set(
            upstream.batch_id,
            upstream.upstream,
            polls=upstream.polls + 1,
            next_poll_at=utcnow() + timedelta(seconds=delay),
        )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
