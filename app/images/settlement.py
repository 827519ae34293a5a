"""The one settlement path: an upstream outcome becomes one ledger row, exactly once.

``Settlement.settle`` is the only writer of settlement rows. JSON answers, URL delivery, streams
and tasks all end there, with an ``UpstreamOutcome`` saying which upstream was reached, how the
call ended, how many images completed and what usage the upstream reported. It prices the usage,
charges it against the request's hold (in full, even above the hold: the upstream has billed the
operator already, and the excess is recorded as an overrun on the row and in a metric), and runs
shielded from cancellation, so a client that leaves cannot cut a charge in half.

``ImageStream`` relays a committed stream and settles it once, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from sqlalchemy import Connection

from app.billing.ledger import Hold, LedgerRecord, LedgerService
from app.billing.pricing import PARTIAL_IMAGE_OUTPUT_TOKENS, request_cost
from app.billing.svg import SvgCharge
from app.domain.jobs import ImageJob, ProviderEvent, TokenUsage
from app.domain.money import apply_multiplier, format_micros
from app.errors import UpstreamError
from app.keys import Caller
from app.metrics import Metrics
from app.tracing import current_request
from app.upstream.router import OpenStream

log = logging.getLogger("app.images.service")
T = TypeVar("T")

StreamStatus = Literal["succeeded", "failed", "cancelled"]
# Work done inside a settlement's transaction, given the charge (a task recording its result);
# False aborts the whole settlement.
CostHook = Callable[[Connection, int], bool]
# The extra field of the last ``completed`` event of a stream: the charge, in the price unit.
# The SDKs ignore unknown fields; a stream's headers are sent before its cost is known.
COST_FIELD = "gateway_cost"


@dataclass(frozen=True, slots=True)
class UpstreamOutcome:
    """How one request's upstream call ended, as settlement needs it.

    ``upstream`` is None when no upstream was reached (nothing to record: the hold is released).
    ``usage`` is what the upstream reported for the completed images (None: it reported none, and
    the catalog's estimate is charged); ``partials`` are streamed partial images of an image that
    never completed, charged as OpenAI bills them (PARTIAL_IMAGE_OUTPUT_TOKENS each).
    """

    job: ImageJob
    caller: Caller
    hold: Hold | None
    upstream: str | None
    status: str  # succeeded | failed | cancelled
    images: int
    usage: TokenUsage | None
    started: float
    raw_usage: Any = None
    error_code: str | None = None
    partials: int = 0
    # SVG output: the author's tokens and their cost (multiplier applied), added to the charge.
    svg: SvgCharge | None = None


@dataclass(frozen=True, slots=True)
class Settled:
    cost_micros: int
    overrun_micros: int


class Settlement:
    """Turns upstream outcomes into ledger rows (see the module docstring)."""

    def __init__(self, ledger: LedgerService, metrics: Metrics) -> None:
        self._ledger = ledger
        self._metrics = metrics

    async def settle(self, outcome: UpstreamOutcome, *, also: CostHook | None = None) -> Settled:
        """Price ``outcome``, write its ledger row, charge it and release its hold, atomically and
        shielded from the caller's cancellation. ``also`` runs in the same transaction (a task
        recording its result); if it refuses, nothing is committed (``SettlementAbandoned``)."""
        job, caller, hold = outcome.job, outcome.caller, outcome.hold
        traced = current_request()
        if outcome.upstream is None:
            if hold is not None:
                await shielded(self._ledger.release(hold))
            traced.settled(upstream=None, usage=None, cost_micros=0, status=outcome.status)
            traced.end()
            return Settled(0, 0)
        cost, usage = 0, outcome.usage
        if outcome.images:
            cost, usage = request_cost(job, outcome.usage, outcome.images)
        if outcome.partials and job.caps.reports_usage:
            extra = TokenUsage(image_output=outcome.partials * PARTIAL_IMAGE_OUTPUT_TOKENS, estimated=True)
            usage = extra if usage is None else usage + extra
            cost, usage = request_cost(job, usage, max(outcome.images, 1))
        cost = apply_multiplier(cost, caller.price_multiplier_ppm)
        if outcome.svg is not None:
            cost += outcome.svg.cost_micros
        held = hold.amount_micros if hold is not None else 0
        overrun = max(0, cost - held) if hold is not None else 0
        record = LedgerRecord(
            request_id=job.request_id,
            key_id=caller.key_id,
            model=job.model,
            upstream=outcome.upstream,
            endpoint=job.endpoint,
            status=outcome.status,
            images=outcome.images,
            usage=usage,
            cost_micros=cost,
            latency_ms=ms_since(outcome.started),
            error_code=outcome.error_code,
            raw_usage=outcome.raw_usage or None,
            reserved_micros=held,
            overrun_micros=overrun,
            svg=outcome.svg,
        )
        in_tx = (lambda c: also(c, cost)) if also is not None else None
        await shielded(self._ledger.settle(hold, record, also=in_tx))
        observe_outcome(self._metrics, job, usage, cost, outcome.images)
        if overrun:
            self._metrics.observe_overrun(model=job.model, micros=overrun)
            log.warning(
                "charge exceeded its reservation",
                extra={
                    "fields": {
                        "key_id": caller.key_id,
                        "model": job.model,
                        "reserved_micros": held,
                        "cost_micros": cost,
                        "overrun_micros": overrun,
                    }
                },
            )
        log_settled(outcome, cost)
        traced.settled(upstream=outcome.upstream, usage=usage, cost_micros=cost, status=outcome.status)
        traced.end()
        return Settled(cost, overrun)

    async def release(self, hold: Hold) -> None:
        """Give back a hold for a request that ends before any upstream call."""
        await shielded(self._ledger.release(hold))


class ImageSink(Protocol):
    """Something that keeps a copy of completed images (the console's thumbnails)."""

    def wants(self, caller: Caller) -> bool: ...

    def keep(
        self, *, caller: Caller, request_id: str, images: list[str], first_position: int = 0
    ) -> None: ...


@dataclass(slots=True)
class ImageStream:
    """A committed stream: relays events, remembers what completed, and settles exactly once.

    It settles as soon as the last expected image has completed (before that event is relayed,
    which then carries the charge in ``gateway_cost``), or when the stream ends any other way.
    A stream that ends cleanly before all images completed is an upstream error: the client gets
    an ``error`` event and the row says ``failed`` with code ``stream_incomplete``.
    """

    job: ImageJob
    caller: Caller
    opened: OpenStream
    settlement: Settlement
    hold: Hold
    started: float
    completed: int = 0
    partials: int = 0  # partial images since the last completed one
    reported: TokenUsage | None = None
    raw_usage: dict[str, Any] = field(default_factory=dict)
    settled: bool = False
    cost_micros: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Called once when the stream ends, to free what the request held (its slot, its spooled files).
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Called with the charge once it is settled (the access log's cost).
    on_settled: list[Callable[[int], None]] = field(default_factory=list)
    # Keeps a copy of each completed image (the console's thumbnails), when the key wants one.
    sink: ImageSink | None = None

    @property
    def upstream(self) -> str:
        return self.opened.upstream

    async def events(self) -> AsyncIterator[ProviderEvent]:
        """Every event, first one included; an upstream failure mid-stream is raised, and so is a
        stream that ends before its images completed."""
        event = self._track(self.opened.first)
        yield await self._maybe_settle(event)
        async for event in self.opened.rest:
            event = self._track(event)
            yield await self._maybe_settle(event)
        if self.completed < self.job.n and not self.settled:
            raise UpstreamError(
                "The upstream service ended the stream before the image was completed.",
                code="stream_incomplete",
            )

    def _track(self, event: ProviderEvent) -> ProviderEvent:
        if event.is_completed:
            self.completed += 1
            self.partials = 0
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
        elif event.type.endswith(".partial_image"):
            self.partials += 1
        return event

    async def _maybe_settle(self, event: ProviderEvent) -> ProviderEvent:
        if not event.is_completed or self.completed < self.job.n or self.settled:
            return event
        cost = await self.settle("succeeded")
        return with_cost(event, cost)

    async def close(self) -> None:
        """Release the upstream connection (at once, when the client has gone) and the slot."""
        try:
            await self.opened.aclose()
        finally:
            closers, self.closers = self.closers, []
            for close in closers:
                await close()

    async def settle(self, status: StreamStatus, error_code: str | None = None) -> int:
        """Bill what the upstream reported as completed (and unfinished partials), once."""
        if self.settled:
            return self.cost_micros or 0
        self.settled = True
        settled = await self.settlement.settle(
            UpstreamOutcome(
                job=self.job,
                caller=self.caller,
                hold=self.hold,
                upstream=self.upstream,
                status=status,
                images=self.completed,
                usage=self.reported,
                started=self.started,
                raw_usage=self.raw_usage or None,
                error_code=error_code,
                partials=self.partials if self.completed < self.job.n else 0,
            )
        )
        self.cost_micros = settled.cost_micros
        for hook in self.on_settled:
            hook(settled.cost_micros)
        return settled.cost_micros


def with_cost(event: ProviderEvent, cost: int) -> ProviderEvent:
    """``event`` with the charge as an extra field; the upstream's own bytes are kept (spliced)."""
    value = format_micros(cost)
    data = {**event.data, COST_FIELD: value}
    raw = event.raw.rstrip() if event.raw is not None else None
    if raw is None or not raw.endswith(b"}"):
        return ProviderEvent(type=event.type, data=data)
    body = raw[:-1].rstrip()
    separator = b"" if body.endswith(b"{") else b","
    spliced = body + separator + b'"' + COST_FIELD.encode() + b'":"' + value.encode() + b'"}'
    return ProviderEvent(type=event.type, data=data, raw=spliced)


# Shielded operations still running after their caller was cancelled; referenced so that they
# finish (the event loop itself keeps only weak references to tasks).
_PENDING: set[asyncio.Future[Any]] = set()


def background(operation: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``operation`` as a task that the caller's cancellation does not reach."""
    task = asyncio.ensure_future(operation)
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    return task


async def shielded(operation: Coroutine[Any, Any, T]) -> T:
    """Finish a money movement (or a slot's release) even if the request's task is cancelled."""
    return await asyncio.shield(background(operation))


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


def log_settled(outcome: UpstreamOutcome, cost: int) -> None:
    job = outcome.job
    log.info(
        "image request completed" if outcome.status == "succeeded" else "image request settled",
        extra={
            "fields": {
                "key_id": outcome.caller.key_id,
                "model": job.model,
                "upstream": outcome.upstream,
                "status": outcome.status,
                "images": outcome.images,
                "cost_micros": cost,
                "latency_ms": ms_since(outcome.started),
                "stream": job.stream,
            }
        },
    )


def ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
