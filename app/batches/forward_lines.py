"""The lines of a batch forwarded to an upstream's Batch API (app/batches/forward.py): reading
them back for the upload, settling each answer of the upstream's output and error files exactly once,
ending the ones it never ran, and showing their results in the gateway batch's output file.

A line's answer is settled through the one settlement path (``Settlement.settle``), priced from the
line's own ``usage`` at the price fixed when it was sent; the line's move out of state ``upstream``
is the settlement's ``also`` hook, a conditional UPDATE in the same transaction as the ledger row, so
a repeated or concurrent collection never charges a line twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from sqlalchemy import Connection, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth.keys import Caller
from app.billing.ledger import Hold, SettlementAbandoned
from app.core.errors import GatewayError, UpstreamError
from app.db.tables import Batch, BatchLine, LedgerEntry
from app.domain.catalog import Catalog
from app.domain.jobs import ImageJob, TokenUsage
from app.images.delivery import render_images, store_images
from app.images.service import ImageService
from app.images.settlement import UpstreamOutcome, shielded
from app.storage import ImageStore
from app.tasks.inputs import job_from_spec, upgraded

log = logging.getLogger(__name__)

UPSTREAM = "upstream"  # a batch line's state while an upstream batch has it
PENDING, OK, ERROR = "pending", "ok", "error"
PAGE = 200
_ENDED = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not run: the batch was cancelled.",
    "batch_failed": "The upstream batch failed before this request was run.",
}

Recount = Callable[[str], Awaitable[None]]


class ForwardedLines:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        catalog: Catalog,
        images: ImageService,
        store: ImageStore,
        url_ttl_s: int,
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._images = images
        self._store = store
        self._url_ttl_s = url_ttl_s

    async def lines(self, batch_id: str, name: str) -> AsyncIterator[BatchLine]:
        after = 0
        while True:
            async with self._sessions() as session:
                page = (
                    await session.scalars(
                        select(BatchLine)
                        .where(
                            BatchLine.batch_id == batch_id,
                            BatchLine.state == UPSTREAM,
                            BatchLine.line > after,
                        )
                        .order_by(BatchLine.line)
                        .limit(PAGE)
                    )
                ).all()
            for line in page:
                if (line.forward or {}).get("upstream") == name:
                    yield line
            if len(page) < PAGE:
                return
            after = page[-1].line

    async def settle(self, row: Batch, name: str, raw: bytes) -> None:
        """One line of the upstream's output or error file, settled exactly once."""
        try:
            item = orjson.loads(raw)
            number = int(str(item["custom_id"])[1:])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning(
                "an upstream batch output line was unreadable", extra={"fields": {"batch_id": row.id}}
            )
            return
        async with self._sessions() as session:
            line = await session.get(BatchLine, (row.id, number))
        if line is None or line.state != UPSTREAM or (line.forward or {}).get("upstream") != name:
            return  # settled already (a repeated collection after a restart), or not this upstream's
        forward = line.forward
        assert forward is not None
        job = self._job(forward["job"])
        response: dict[str, Any] = item["response"] if isinstance(item.get("response"), dict) else {}
        body: dict[str, Any] = response["body"] if isinstance(response.get("body"), dict) else {}
        status_code = response.get("status_code")
        data = body.get("data")
        ok = status_code == 200 and isinstance(data, list)
        stored: dict[str, Any] | None = None
        usage: TokenUsage | None = None
        raw_usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        if ok:
            try:
                stored = await store_images(body, self._store, output_format=job.output_format)
            except GatewayError as exc:
                ok, status_code, body = False, exc.status_code, exc.to_body()
            else:
                usage = TokenUsage.from_openai(raw_usage) if raw_usage else None
        error = body.get("error") if isinstance(body.get("error"), dict) else item.get("error")
        if not isinstance(error, dict):
            error = {"code": "upstream_error", "message": "The upstream answered this request with an error."}
        code = int(status_code) if isinstance(status_code, int) else None
        if not ok and code is None and error.get("code") in ("batch_expired", "batch_cancelled"):
            # Never run upstream (its batch expired or was cancelled first): nothing was billed, so
            # no ledger row; the hold goes back, as for the gateway's own expired lines.
            if await self.end_line(row.id, number, UPSTREAM, None, _ended(str(error["code"]))):
                await shielded(self._images.release(Hold(key_id=row.key_id, **forward["hold"])))
            return

        def record(c: Connection, cost: int) -> bool:
            values: dict[str, Any] = (
                {"state": OK, "status_code": 200, "result": stored}
                if ok
                # A request the upstream answered with an error keeps its status; one it could not run
                # (no response) shows the upstream's ``error`` object, as OpenAI's error file does.
                else {"state": ERROR, "status_code": code if code and code >= 400 else None, "error": error}
            )
            changed = c.execute(
                update(BatchLine)
                .where(BatchLine.batch_id == row.id, BatchLine.line == number, BatchLine.state == UPSTREAM)
                .values(**values)
            )
            if changed.rowcount != 1:
                return False  # settled by another process first: this charge is not made
            c.execute(update(Batch).where(Batch.id == row.id).values(cost_micros=Batch.cost_micros + cost))
            c.execute(
                update(LedgerEntry)
                .where(LedgerEntry.request_id == job.request_id, LedgerEntry.key_id == row.key_id)
                .values(batch_id=row.id)
            )
            return True

        outcome = UpstreamOutcome(
            job=job,
            caller=_caller(row.key_id, int(forward["ppm"])),
            hold=Hold(key_id=row.key_id, **forward["hold"]),
            upstream=name,
            status="succeeded" if ok else "failed",
            images=len(data) if ok and isinstance(data, list) else 0,
            usage=usage,
            started=time.monotonic(),
            raw_usage=raw_usage if ok else None,
            error_code=None if ok else str(error.get("code") or "upstream_error")[:100],
        )
        try:
            await self._images.settlement.settle(outcome, also=record)
        except SettlementAbandoned:
            pass

    async def end_rest(
        self, row: Batch, name: str, code: str, recount: Recount, *, error: GatewayError | None = None
    ) -> None:
        """End the upstream's lines it never answered; their holds go back (nothing was billed)."""
        body = error.to_body()["error"] if error is not None else _ended(code)
        status = error.status_code if error is not None else None
        async for line in self.lines(row.id, name):
            assert line.forward is not None
            if await self.end_line(row.id, line.line, UPSTREAM, status, body):
                hold = line.forward["hold"]
                await shielded(self._images.release(Hold(key_id=row.key_id, **hold)))
        await recount(row.id)

    async def end_line(
        self, batch_id: str, number: int, state: str, status: int | None, error: dict[str, Any]
    ) -> bool:
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(BatchLine)
                .where(BatchLine.batch_id == batch_id, BatchLine.line == number, BatchLine.state == state)
                .values(state=ERROR, status_code=status, error=error)
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def response(self, row: Batch, line: BatchLine) -> dict[str, Any] | None:
        """A forwarded line's answer as the output file shows it: its stored images as it asked."""
        if line.result is None or line.forward is None:
            return None
        shown = await render_images(
            line.result,
            self._store,
            response_format=str(line.forward["job"].get("response_format") or "b64_json"),
            base_url=row.base_url,
            ttl_s=self._url_ttl_s,
        )
        return {"status_code": 200, "request_id": f"{row.id}-{line.line}", "body": shown}

    def _job(self, spec: dict[str, Any]) -> ImageJob:
        caps = self._catalog.get(str(spec["model"]))
        if caps is None:
            raise UpstreamError("The model of a forwarded line is no longer in the catalog.")
        return job_from_spec(upgraded(spec), caps)  # generations only: no input images


def _ended(code: str) -> dict[str, Any]:
    return {"code": code, "message": _ENDED[code]}


def _caller(key_id: str, ppm: int) -> Caller:
    """The key as its forwarded lines' settlement needs it: settled even if the key was revoked
    since (the upstream did the work), at the price fixed when the line was sent."""
    return Caller(
        key_id=key_id, name="", owner=None, models=None, moderation="default", price_multiplier_ppm=ppm
    )
