"""Pure ASGI middleware: request ids and access logs, and the JSON body size cap.

Pure ASGI rather than BaseHTTPMiddleware, so streamed responses are relayed chunk by chunk.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLargeError
from app.logging import set_request_id

log = logging.getLogger("app.access")


class RequestContextMiddleware:
    """Gives every request an id (``x-request-id``) and writes one access-log line for it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(12)
        set_request_id(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            state: dict[str, Any] = scope.get("state", {})
            log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        # The path only: query strings are the client's and may hold anything.
                        "path": scope["path"],
                        "status": status,
                        "latency_ms": int((time.monotonic() - started) * 1000),
                        "key_id": state.get("key_id"),
                        "model": state.get("model"),
                        "upstream": state.get("upstream"),
                        "cost_micros": state.get("cost_micros"),
                    }
                },
            )
            set_request_id(None)


class BodySizeLimitMiddleware:
    """Refuses non-multipart bodies over ``max_bytes`` with 413, by header or while they arrive.

    Multipart uploads have their own per-part limits, enforced by the upload parser.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_multipart(scope):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLargeError(_too_large_message(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _is_multipart(scope: Scope) -> bool:
    content_type = _header(scope, b"content-type") or ""
    return content_type.lower().startswith("multipart/form-data")


def _too_large_message(limit: int) -> str:
    return f"The request body is larger than the limit of {limit} bytes."


async def _too_large(send: Send, limit: int) -> None:
    error = PayloadTooLargeError(_too_large_message(limit))
    body = orjson.dumps(error.to_body())
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
