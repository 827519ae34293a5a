"""Relay an ``ImageStream`` to the client as Server-Sent Events.

Each event is written as ``event: <type>`` + ``data: <json>`` the moment it arrives. A failure after
the stream has started cannot change the status code any more, so it becomes an ``error`` event
(``{"type": "error", "error": {...}}``, which the official SDKs raise as ``APIError``). sse-starlette
cancels this generator when the client disconnects; the upstream connection is then closed at once
and billing is settled under a shielded scope, so cancellation cannot lose the ledger row. The
stream settles when its last image completes, and that event carries the charge (``gateway_cost``,
the same decimal text as a JSON answer's ``x-gateway-cost`` header).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent  # noqa: TID251 - the one SSE writer

from app.core.errors import GatewayError, InternalServerError
from app.images.relay import ImageStream

log = logging.getLogger(__name__)


def _error_event(error: GatewayError) -> ServerSentEvent:
    # The same body a JSON answer carries (app.core.errors.error_body), under the event's own type.
    body = error.to_body()
    return ServerSentEvent(data=orjson.dumps({"type": "error", **body}).decode(), event="error")


async def _relay(stream: ImageStream) -> AsyncIterator[ServerSentEvent]:
    # The stream owns its end (closed and settled before the error event goes out, and when the
    # client has gone); this only writes its events, and its failure as the last one.
    internal = InternalServerError("The gateway had an error while relaying the stream.")
    async with stream.ending(internal=internal) as end:
        async for event in stream.events():
            raw = event.raw if event.raw is not None else orjson.dumps(event.data)
            yield ServerSentEvent(data=raw.decode(), event=event.type)
    if end.error is not None:
        yield _error_event(end.error)


def sse_response(
    stream: ImageStream, *, ping_s: float, headers: dict[str, str], shutdown_grace_s: float
) -> EventSourceResponse:
    return EventSourceResponse(
        _relay(stream),
        ping=ping_s,
        # On shutdown, a stream in flight may finish within the grace period before it is cut.
        shutdown_grace_period=shutdown_grace_s,
        headers={
            **headers,
            "cache-control": "no-cache",
            # Tells nginx-style proxies not to buffer the stream.
            "x-accel-buffering": "no",
            # No x-gateway-cost: headers go out before the cost is known, and a guess would
            # misinform. The charge is the `gateway_cost` field of the last completed event.
        },
    )


async def _named(events: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[ServerSentEvent]:
    try:
        async for name, payload in events:
            yield ServerSentEvent(data=orjson.dumps(payload).decode(), event=name)
    except GatewayError as error:
        yield _error_event(error)


def json_events_response(
    events: AsyncIterator[tuple[str, Any]], *, ping_s: float, headers: dict[str, str]
) -> EventSourceResponse:
    """A stream of named JSON events (a task followed live); a gateway error raised by ``events``
    ends it with the same ``error`` event an image stream ends with."""
    return EventSourceResponse(
        _named(events),
        ping=ping_s,
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
    )
