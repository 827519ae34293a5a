"""How a request's outcome is settled: its ledger record, its metrics, its log line, and the
stream object that relays events and settles once whatever way the stream ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.billing.ledger import Hold, LedgerRecord, LedgerService
from app.billing.pricing import apply_multiplier, request_cost
from app.billing.svg import SvgCharge
from app.images.jobs import ImageJob, ProviderEvent, TokenUsage
from app.keys import Caller
from app.metrics import Metrics
from app.upstream.router import OpenStream

log = logging.getLogger("app.images.service")

StreamStatus = Literal["succeeded", "failed", "cancelled"]


class ImageSink(Protocol):
    """Something that keeps a copy of completed images (the console's thumbnails)."""

    def wants(self, caller: Caller) -> bool: ...

    def keep(
        self, *, caller: Caller, request_id: str, images: list[str], first_position: int = 0
    ) -> None: ...


@dataclass(slots=True)
class ImageStream:
    """A committed stream: relays events, remembers what completed, and settles exactly once."""

    job: ImageJob
    caller: Caller
    opened: OpenStream
    ledger: LedgerService
    hold: Hold
    started: float
    metrics: Metrics
    completed: int = 0
    reported: TokenUsage | None = None
    raw_usage: dict[str, Any] = field(default_factory=dict)
    settled: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    # Called once when the stream ends, to free what the request held (its slot, its spooled files).
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Keeps a copy of each completed image (the console's thumbnails), when the key wants one.
    sink: ImageSink | None = None

    @property
    def upstream(self) -> str:
        return self.opened.upstream

    async def events(self) -> AsyncIterator[ProviderEvent]:
        """Every event, first one included; an upstream failure mid-stream is raised."""
        yield self._track(self.opened.first)
        async for event in self.opened.rest:
            yield self._track(event)

    def _track(self, event: ProviderEvent) -> ProviderEvent:
        if event.is_completed:
            self.completed += 1
            b64 = event.data.get("b64_json")
            if self.sink is not None and isinstance(b64, str):
                try:
                    self.sink.keep(
                        caller=self.caller,
                        request_id=self.job.request_id,
                        images=[b64],
                        first_position=self.completed - 1,
                    )
                except Exception:
                    # A copy for the console is never worth breaking a stream that is being billed.
                    log.exception("keeping image copies failed")
            usage = event.usage
            if usage is not None:
                self.reported = usage if self.reported is None else self.reported + usage
                merge_usage(self.raw_usage, event.data.get("usage"))
        return event

    async def close(self) -> None:
        """Release the upstream connection (at once, when the client has gone) and the slot."""
        try:
            await self.opened.aclose()
        finally:
            closers, self.closers = self.closers, []
            for close in closers:
                await close()

    async def settle(self, status: StreamStatus, error_code: str | None = None) -> int:
        """Bill what the upstream reported as completed, whatever the ending; returns the cost."""
        if self.settled:
            return 0
        self.settled = True
        cost, usage = 0, self.reported
        if self.completed:
            cost, usage = request_cost(self.job, self.reported, self.completed)
            cost = apply_multiplier(cost, self.caller.price_multiplier_ppm)
        await self.ledger.settle(
            self.hold,
            ledger_record(
                self.job,
                self.caller,
                self.upstream,
                status,
                self.completed,
                usage,
                cost,
                self.started,
                self.raw_usage or None,
                error_code=error_code,
            ),
        )
        observe_outcome(self.metrics, self.job, usage, cost, self.completed)
        if status == "succeeded":
            log_completed(self.job, self.caller, self.upstream, self.completed, cost, self.started)
        return cost


# Shielded operations still running after their caller was cancelled; referenced so that they
# finish (the event loop itself keeps only weak references to tasks).
_PENDING: set[asyncio.Future[None]] = set()


async def shielded(operation: Coroutine[Any, Any, None]) -> None:
    """Finish a money movement (or a slot's release) even if the request's task is cancelled."""
    task = asyncio.ensure_future(operation)
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    await asyncio.shield(task)


def observe_outcome(
    metrics: Metrics, job: ImageJob, usage: TokenUsage | None, cost: int, images: int
) -> None:
    tokens = usage or TokenUsage()
    metrics.observe_usage(
        model=job.model,
        text_input=tokens.text_input,
        image_input=tokens.image_input,
        text_output=tokens.text_output,
        image_output=tokens.image_output,
        cost_micros=cost,
        images=images,
    )


def merge_usage(total: dict[str, Any], usage: Any) -> None:
    """Sum OpenAI usage objects field by field (nested details included), for the ledger's copy."""
    if not isinstance(usage, dict):
        return
    for key, value in usage.items():
        if isinstance(value, dict):
            merge_usage(total.setdefault(key, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


def ledger_record(
    job: ImageJob,
    caller: Caller,
    upstream: str,
    status: str,
    images: int,
    usage: TokenUsage | None,
    cost: int,
    started: float,
    raw_usage: Any = None,
    *,
    error_code: str | None = None,
    svg: SvgCharge | None = None,
) -> LedgerRecord:
    return LedgerRecord(
        request_id=job.request_id,
        key_id=caller.key_id,
        model=job.model,
        upstream=upstream,
        endpoint=job.endpoint,
        status=status,
        images=images,
        usage=usage,
        cost_micros=cost,
        latency_ms=ms_since(started),
        error_code=error_code,
        raw_usage=raw_usage,
        svg=svg,
    )


def log_completed(
    job: ImageJob, caller: Caller, upstream: str, images: int, cost: int, started: float
) -> None:
    log.info(
        "image request completed",
        extra={
            "fields": {
                "key_id": caller.key_id,
                "model": job.model,
                "upstream": upstream,
                "images": images,
                "cost_micros": cost,
                "latency_ms": ms_since(started),
                "stream": job.stream,
            }
        },
    )


def ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
