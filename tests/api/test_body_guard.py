"""BodyGuardMiddleware's two clocks, driven as plain ASGI: the stall timeout and the body deadline."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Receive, Scope, Send

from app.api.middleware import BodyGuardMiddleware
from app.core.errors import RequestTimeoutError

SCOPE: Scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "headers": []}


def trickling(chunks: int, every_s: float) -> Receive:
    """A client sending one byte every ``every_s``, the body complete after ``chunks`` bytes."""
    sent = 0

    async def receive() -> Message:
        nonlocal sent
        await asyncio.sleep(every_s)
        sent += 1
        return {"type": "http.request", "body": b"x", "more_body": sent < chunks}

    return receive


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def run(receive: Receive, *, read_timeout_s: float, deadline_s: float) -> bytes:
    got: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(await read_body(receive))

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing is answered here: {message}")

    guard = BodyGuardMiddleware(app, max_bytes=1024, read_timeout_s=read_timeout_s, deadline_s=deadline_s)
    await guard(SCOPE, receive, send)
    return got[0]


async def test_a_steady_body_within_the_deadline_passes() -> None:
    assert await run(trickling(5, 0.01), read_timeout_s=1, deadline_s=5) == b"xxxxx"


async def test_a_trickle_that_never_stalls_meets_the_deadline() -> None:
    with pytest.raises(RequestTimeoutError, match="must arrive within 0.3 seconds") as caught:
        await run(trickling(10_000, 0.02), read_timeout_s=1, deadline_s=0.3)
    assert caught.value.to_body()["error"]["code"] == "request_timeout"


async def test_a_stall_is_still_reported_as_a_stall() -> None:
    with pytest.raises(RequestTimeoutError, match="stalled: no data for 0.1 seconds"):
        await run(trickling(3, 5), read_timeout_s=0.1, deadline_s=60)
