"""Pure ASGI middleware: request ids and access logs, body size and time limits, the admin guard,
input that no store can keep (NUL bytes, over-long idempotency keys), and contained 500s.

Pure ASGI rather than BaseHTTPMiddleware, so streamed responses are relayed chunk by chunk.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import ADMIN_MARK, is_admin_key, parse_bearer
from app.api.errors import error_response, unexpected_error
from app.auth.keys import INVALID_KEY_MESSAGE
from app.console.requestlog import MAX_ERROR_BODY, Seen
from app.core.errors import (
    AuthenticationError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from app.core.logging import set_request_id

log = logging.getLogger("app.access")

# An API answers JSON and images, never pages: nothing to sniff, frame, cache or refer from.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)


class RequestContextMiddleware:
    """Gives every request an id (``x-request-id``) and writes one access-log line for it.

    An answer an upstream served (or failed) names it in ``x-gateway-upstream``: the value the
    access log records, so a placeholder from ``local`` is never mistaken for a real image (SPEC
    §2). ``upstream_header=False`` (``server.upstream_header``) keeps the names from tenants."""

    def __init__(self, app: ASGIApp, upstream_header: bool = True) -> None:
        self.app = app
        self.upstream_header = upstream_header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(12)
        set_request_id(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.monotonic()
        status = 500
        # The request log's (app/console/requestlog.py): /v1 only, with an error's body kept.
        request_log = _request_log(scope)
        at = time.time() if request_log is not None else 0.0
        error_body: bytes | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, error_body
            if request_log is not None and message["type"] == "http.response.body":
                if status >= 400 and error_body is None:
                    error_body = bytes(message.get("body", b""))[:MAX_ERROR_BODY]
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                present = {name.lower() for name, _ in headers}
                headers.extend(item for item in SECURITY_HEADERS if item[0] not in present)
                upstream = scope.get("state", {}).get("upstream")
                if self.upstream_header and upstream and b"x-gateway-upstream" not in present:
                    headers.append((b"x-gateway-upstream", str(upstream).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            state: dict[str, Any] = scope.get("state", {})
            latency_ms = int((time.monotonic() - started) * 1000)
            if request_log is not None:
                request_log.record(
                    Seen(
                        at=at,
                        request_id=request_id,
                        method=scope["method"],
                        route=scope["path"],
                        status=status,
                        latency_ms=latency_ms,
                        key_id=state.get("key_id"),
                        key_name=state.get("key_name"),
                        model=state.get("model"),
                        upstream=state.get("upstream"),
                        cost_micros=state.get("cost_micros"),
                        prompt=state.get("prompt"),
                        error_body=error_body,
                    )
                )
            log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        # The path only: query strings are the client's and may hold anything.
                        "path": scope["path"],
                        "status": status,
                        "latency_ms": latency_ms,
                        "key_id": state.get("key_id"),
                        "model": state.get("model"),
                        "upstream": state.get("upstream"),
                        "cost_micros": state.get("cost_micros"),
                    }
                },
            )
            set_request_id(None)


# Logged paths: the API, and the console's playground, which runs the API's own image path.
_LOGGED = ("/v1/", "/console/playground/")


def _request_log(scope: Scope) -> Any:
    """The gateway's request log for an image API request, or None (other paths, log off)."""
    if not str(scope.get("path", "")).startswith(_LOGGED):
        return None
    app = scope.get("app")
    gateway = getattr(getattr(app, "state", None), "gateway", None)
    return getattr(gateway, "request_log", None)


class BodyGuardMiddleware:
    """Bounds what a client can make the gateway wait for and hold while it reads a body.

    - Non-multipart bodies over ``max_bytes`` get 413, by header or while they arrive (multipart
      uploads have per-part limits, enforced by the upload parser as parts stream in).
    - A body that stalls (no bytes for ``read_timeout_s``) gets 408, so a slow or stuck upload
      cannot hold a connection, a spool file and a worker slot forever. uvicorn has no body-read
      timeout of its own.
    - A body not complete ``deadline_s`` after the request came in gets 408 too: without it, one
      byte every ``read_timeout_s`` - 1 seconds would hold all of the above for ever.

    Both 408s are raised from ``receive()``, so they reach the handlers as any error does and the
    upload parser removes its spool on the way out.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float, deadline_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = None if _is_multipart(scope) else self.max_bytes
        declared = _header(scope, b"content-length")
        if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(scope, receive, send, limit)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        seen = 0
        body_done = False

        async def guarded_receive() -> Message:
            nonlocal seen, body_done
            if body_done:
                # After the body, receive() only reports a disconnect: waiting on it is fine.
                return await receive()
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                # asyncio.timeout, not wait_for: no extra task for every chunk of every body.
                async with asyncio.timeout(min(self.read_timeout_s, left)):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(self._timeout_message(late=left <= self.read_timeout_s)) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if limit is not None and seen > limit:
                    raise PayloadTooLargeError(_too_large_message(limit))
            else:
                body_done = True
            return message

        await self.app(scope, guarded_receive, send)

    def _timeout_message(self, *, late: bool) -> str:
        if late:
            return f"The request body took too long: it must arrive within {self.deadline_s:g} seconds."
        return f"The request body stalled: no data for {self.read_timeout_s:g} seconds."


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


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    await error_response(PayloadTooLargeError(_too_large_message(limit)))(scope, receive, send)


class AdminGuardMiddleware:
    """Checks the admin key on ``/admin/…`` before anything reads the request.

    This is the only check of the admin key on the API (``deps.is_admin_key``); it marks the scope
    state, and the routes' ``require_admin`` reads only that mark. Checking here, before routing,
    means a caller without the admin key learns nothing from the body's parsing (a 400 would
    answer before the 401).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/admin"):
            await self.app(scope, receive, send)
            return
        state = getattr(scope["app"].state, "gateway", None)
        token = parse_bearer(_header(scope, b"authorization"))
        if state is not None and is_admin_key(token, state.admin_key):
            request_state = scope.setdefault("state", {})
            request_state[ADMIN_MARK] = True
            # For the access log: which key, never the key.
            request_state["key_id"] = "admin"
            await self.app(scope, receive, send)
            return
        await error_response(AuthenticationError(INVALID_KEY_MESSAGE))(scope, receive, send)


# The longest Idempotency-Key kept (the tasks table's column holds 255).
MAX_IDEMPOTENCY_KEY = 255
# A NUL in a JSON string is written as an escape: ``\u0000`` after an even run of backslashes
# (an odd run escapes the backslash itself, and the text is a literal "\u0000").
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_FORM_NUL = re.compile(rb"%00")
# Bodies that carry files, where a zero byte is data (multipart text fields: the form parser's).
_BINARY = ("multipart/", "image/", "application/octet-stream")
# How much of the previous chunk is kept to find an escape cut by a chunk boundary.
_CARRY = 64
_NUL_MESSAGE = "The request contains a NUL character (\\u0000), which no field accepts."


class InputGuardMiddleware:
    """Refuses at the edge what no store can keep, as a 400 on every database alike.

    PostgreSQL rejects a NUL character in text, so a NUL in a query filter, a key name or a console
    form would fail deep in a query (a 500 on PostgreSQL, a 200 on SQLite). A NUL is refused in the
    path, the query string, the headers, and JSON or form bodies (multipart uploads carry binary
    files; their text fields are checked by the form parser's limits). An ``Idempotency-Key``
    longer than the 255 characters a task row keeps is a 400 as well.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = _refused(scope)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").lower()
        if content_type.startswith(_BINARY):
            await self.app(scope, receive, send)
            return
        # A form's NUL is "%00"; anything else is read as JSON (some clients send it as text/plain).
        form = content_type.startswith("application/x-www-form-urlencoded")
        pattern = _FORM_NUL if form else _JSON_NUL
        tail = b""

        async def checked_receive() -> Message:
            nonlocal tail
            message = await receive()
            if message["type"] == "http.request":
                window = tail + message.get("body", b"")
                if pattern.search(window) or b"\x00" in window:
                    raise InvalidRequestError(_NUL_MESSAGE, code="invalid_value")
                tail = window[-_CARRY:]
            return message

        await self.app(scope, checked_receive, send)


def _refused(scope: Scope) -> InvalidRequestError | None:
    path = scope.get("raw_path") or str(scope.get("path", "")).encode()
    query = scope.get("query_string", b"")
    if b"\x00" in unquote_to_bytes(path) or b"\x00" in unquote_to_bytes(query):
        return InvalidRequestError(_NUL_MESSAGE, code="invalid_value")
    for name, value in scope.get("headers", []):
        if b"\x00" in value:
            return InvalidRequestError(_NUL_MESSAGE, code="invalid_value")
        if name == b"idempotency-key" and len(value) > MAX_IDEMPOTENCY_KEY:
            return InvalidRequestError(
                f"The Idempotency-Key header is longer than {MAX_IDEMPOTENCY_KEY} characters.",
                param="Idempotency-Key",
                code="invalid_value",
            )
    return None


class ContainErrorsMiddleware:
    """Answers an unexpected exception with the OpenAI-shaped 500 here, and keeps it from uvicorn.

    Starlette's ``ServerErrorMiddleware`` sends its 500 and then re-raises, and uvicorn closes the
    connection of any request whose app raised after the response started: the client's next
    request on that keep-alive connection is reset. Caught here (innermost), the 500 is a complete
    answer and the connection stays usable. An error after the response started still propagates:
    the answer is cut, and only closing the connection tells the client so.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            await error_response(unexpected_error(exc))(scope, receive, send)
