"""Low-level ASGI pieces for the fake upstreams: raw responses, client-disconnect watching, and dropping
a connection on purpose.

Dropping a connection: `remember_transport()` stores the uvicorn connection's asyncio transport in the
scope (reached through the `receive` callable, a bound method of uvicorn's RequestResponseCycle).
`ClientWatch.drop()` closes that transport, so the client gets a FIN with no (or no more) bytes: httpx
raises `RemoteProtocolError`. When no transport is reachable (not uvicorn), `drop()` raises
`ConnectionDropped` instead, and the server aborts the response itself (uvicorn: after the response
started, it closes the connection; before, it sends a 500 — so `drop_before_response` first starts a
response with a `content-length` it never fulfils).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Self

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

TRANSPORT_KEY = "fake.transport"
RawASGI = Callable[[Scope, Receive, Send], Awaitable[None]]


class ConnectionDropped(Exception):
    """Raised to make the server abort a response when the transport cannot be closed directly."""


def remember_transport(scope: Scope, receive: Receive) -> None:
    cycle = getattr(receive, "__self__", None)  # uvicorn's RequestResponseCycle
    scope[TRANSPORT_KEY] = getattr(cycle, "transport", None)


class RawResponse(Response):
    """A Starlette response that runs its own ASGI code (SSE, hangs, dropped connections)."""

    def __init__(self, run: RawASGI) -> None:
        super().__init__()
        self._run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._run(scope, receive, send)


class ClientWatch:
    """While a response is slow, hanging or streaming: notices the client's disconnect (by reading
    `receive`, whose body was already consumed) and the owner's `stopping` event."""

    def __init__(self, scope: Scope, receive: Receive, stopping: threading.Event) -> None:
        self._scope, self._receive, self._stopping = scope, receive, stopping

    async def __aenter__(self) -> Self:
        self._task = asyncio.ensure_future(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    async def _watch(self) -> None:
        message: Message = {"type": ""}
        while message["type"] != "http.disconnect":
            message = await self._receive()

    @property
    def disconnected(self) -> bool:
        return self._task.done()

    @property
    def gone(self) -> bool:
        return self.disconnected or self._stopping.is_set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; returns True early as soon as the client is gone or stopping is set."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.gone:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait({self._task}, timeout=min(remaining, 0.05))
        return True

    async def drop(self) -> None:
        """Close the connection now, whatever has been sent so far."""
        transport = self._scope.get(TRANSPORT_KEY)
        if transport is None:
            raise ConnectionDropped("no transport to close: the server aborts the response")
        transport.close()
        # Wait until uvicorn has seen the close (it then marks the request disconnected and sends
        # nothing more, e.g. no 500 for a response that never started).
        await asyncio.wait({self._task}, timeout=2)


def request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def json_response(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    hdrs = {"x-request-id": request_id(), **(headers or {})}
    return Response(orjson.dumps(payload), status_code, hdrs, media_type="application/json")


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def drop_before_response(stopping: threading.Event) -> Response:
    """Close the connection without sending a single byte."""

    async def run(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get(TRANSPORT_KEY) is None:
            start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]}
            await send(start)
        async with ClientWatch(scope, receive, stopping) as watch:
            await watch.drop()

    return RawResponse(run)


def truncated_response(body: bytes, status_code: int, stopping: threading.Event) -> Response:
    """Send the headers (with the full `content-length`) and half of `body`, then drop the connection."""

    async def run(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        async with ClientWatch(scope, receive, stopping) as watch:
            await watch.drop()

    return RawResponse(run)


def slow_response(
    body: bytes,
    status_code: int,
    delay_s: float,
    stopping: threading.Event,
    on_headers: Callable[[], None] | None = None,
    on_body: Callable[[], None] | None = None,
    go: threading.Event | None = None,
) -> Response:
    """Send the headers at once and the whole `body` `delay_s` later, or as soon as `go` is set (a
    client may leave meanwhile); `on_headers` is called once the headers are out, `on_body` once the
    body is (the client stayed)."""

    async def run(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status_code, "headers": headers})
        # uvicorn sends the headers with the first body bytes: one byte now, the rest later.
        await send({"type": "http.response.body", "body": body[:1], "more_body": True})
        if on_headers is not None:
            on_headers()
        async with ClientWatch(scope, receive, stopping) as watch:
            deadline = asyncio.get_running_loop().time() + delay_s
            while go is None or not go.is_set():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                if await watch.sleep(min(remaining, 0.05)):
                    return
        await send({"type": "http.response.body", "body": body[1:], "more_body": False})
        if on_body is not None:
            on_body()

    return RawResponse(run)


def hanging_response(stopping: threading.Event) -> Response:
    """Never answer: wait for the client to go away; if `stopping` is set first, drop the connection."""

    async def run(scope: Scope, receive: Receive, send: Send) -> None:
        async with ClientWatch(scope, receive, stopping) as watch:
            await watch.sleep(float("inf"))
            if not watch.disconnected:
                if scope.get(TRANSPORT_KEY) is None:
                    await send({"type": "http.response.start", "status": 503, "headers": []})
                await watch.drop()

    return RawResponse(run)
