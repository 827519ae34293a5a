"""The stream relay: a committed stream's events, passed on one by one, settled exactly once.

``ImageStream`` counts the images an upstream stream completes (and the partial images since the
last one), keeps a copy of each completed image when the key wants one, and settles through the one
settlement path (``Settlement.settle``) as soon as the last image completed, or however else the
stream ends. It alone owns that end (``ending``): how the stream ended, the upstream connection
closed, the settlement made once and shielded from cancellation. Its two consumers only read its
events: ``app/api/streaming.py`` writes them as SSE, ``app/tasks/progress.py`` keeps a task's
previews and result.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from app.auth.keys import Caller
from app.billing.ledger import Hold
from app.core.errors import GatewayError, UpstreamError
from app.domain.jobs import ImageJob, ProviderEvent, TokenUsage
from app.domain.money import format_micros
from app.images.settlement import CostHook, Settlement, StreamStatus, UpstreamOutcome, merge_usage
from app.telemetry.tracing import INERT, RequestTrace
from app.upstream.router import OpenStream

log = logging.getLogger("app.images.service")

# The extra field of the last ``completed`` event of a stream: the charge, in the price unit.
# The SDKs ignore unknown fields; a stream's headers are sent before its cost is known.
COST_FIELD = "gateway_cost"


class ImageSink(Protocol):
    """Something that keeps a copy of completed images (the console's thumbnails)."""

    def wants(self, caller: Caller) -> bool: ...

    def keep(
        self, *, caller: Caller, request_id: str, images: list[str], first_position: int = 0
    ) -> None: ...


@dataclass(slots=True)
class StreamEnd:
    """How a stream ended, for its consumer to report: the failure, if it failed."""

    error: GatewayError | None = None


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
    # Completed images whose event carried no usage (each is billed at the catalog's estimate).
    unreported: int = 0
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
    # Sees each event after it is counted and before the stream may settle on it, so a task can
    # keep a preview of each partial image and have its result stored by the time it is charged.
    on_event: Callable[[ProviderEvent], Awaitable[None]] | None = None
    # Work for the settlement's transaction (a task recording its outcome with its charge).
    also: CostHook | None = None
    # The request's span, ended by the settlement.
    trace: RequestTrace = INERT

    @property
    def upstream(self) -> str:
        return self.opened.upstream

    async def events(self) -> AsyncIterator[ProviderEvent]:
        """Every event, first one included; an upstream failure mid-stream is raised, and so is a
        stream that ends before its images completed."""
        event = self._track(self.opened.first)
        if self.on_event is not None:
            await self.on_event(event)
        yield await self._maybe_settle(event)
        async for event in self.opened.rest:
            event = self._track(event)
            if self.on_event is not None:
                await self.on_event(event)
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
            else:
                self.unreported += 1
        elif event.type.endswith(".partial_image"):
            self.partials += 1
        return event

    async def _maybe_settle(self, event: ProviderEvent) -> ProviderEvent:
        if not event.is_completed or self.completed < self.job.n or self.settled:
            return event
        cost = await self._settle("succeeded")
        return with_cost(event, cost)

    @asynccontextmanager
    async def ending(
        self,
        *,
        internal: GatewayError,
        interrupted: GatewayError | None = None,
        on_failure: Callable[[GatewayError], CostHook] | None = None,
        raise_after_settling: bool = False,
    ) -> AsyncIterator[StreamEnd]:
        """The one owner of a stream's end; the consumer reads ``events()`` inside it.

        However the body ends (done, an upstream or gateway error, the client gone, the task
        cancelled), the upstream connection is closed and what the upstream did is settled once,
        shielded, before the end goes on, so the ledger row exists by the time the consumer's
        last bytes go out. A failure is not raised but kept in the ``StreamEnd``: an SSE client
        gets it as an ``error`` event, a task as its outcome. ``internal`` stands for an error that
        is not the gateway's own; ``interrupted`` names an end with no error (a cancelled task's).
        ``on_failure`` gives the settlement's transaction its work for that failure (a task
        recording it with the charge). With ``raise_after_settling``, a failure after the
        settlement began is raised instead: the caller's own failure path decides then.
        """
        end = StreamEnd()
        status: StreamStatus = "cancelled"
        try:
            yield end
            status = "succeeded"
        except Exception as exc:
            if raise_after_settling and self.settled:
                raise
            status = "failed"
            if isinstance(exc, GatewayError):
                end.error = exc
                log.warning("stream failed after it started", extra={"fields": {"code": exc.code}})
            else:
                end.error = internal
                log.exception("stream relay error", extra={"fields": {"request_id": self.job.request_id}})
        finally:
            # Runs on every end, cancellation and a closed generator included.
            with anyio.CancelScope(shield=True):
                try:
                    await self._close()
                finally:
                    if not self.settled:
                        failure = end.error or interrupted
                        if failure is not None and on_failure is not None:
                            self.also = on_failure(failure)
                        await self._settle(status, failure.code if failure is not None else None)

    async def _close(self) -> None:
        """Release the upstream connection (at once, when the client has gone) and the slot."""
        try:
            await self.opened.aclose()
        finally:
            closers, self.closers = self.closers, []
            for close in closers:
                await close()

    async def _settle(self, status: StreamStatus, error_code: str | None = None) -> int:
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
                unreported=self.unreported,
                trace=self.trace,
            ),
            also=self.also,
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
