"""The benchmark's fake OpenAI Images upstream: ``python -m bench.upstream --port 0``.

It answers from bytes computed once at start, so it costs microseconds per request and is never
the bottleneck of a measurement. It is a raw asyncio protocol over httptools (the parser uvicorn
uses) rather than an ASGI app, because an ASGI framework would add tens of microseconds per request
to the *direct* baseline and so flatter every proxy measured against it.

Routes (anything else is a 404):

- ``POST /v1/images/generations``: a tiny PNG per image, or, when ``size`` is ``1536x1024`` and
  ``quality`` is ``high``, a ~2.5 MB PNG (~3.5 MB in base64) like a real high-quality answer;
  ``n`` copies. With ``"stream": true``: ``partial_images`` partial events then one completed event
  per image, ``--pace-ms`` apart, each carrying ``emitted_ns`` (``time.monotonic_ns()`` when it was
  written; CLOCK_MONOTONIC is system-wide on Linux, so a client on the same machine can subtract it
  from its own arrival time to get the relay delay of each event).
- ``POST /v1/images/edits``: reads the (multipart) body, keeping only its first MiB to read the
  ``stream``, ``partial_images`` and ``n`` fields from; answers a tiny image (or streams, as above).
- ``GET /v1/models``: a model list, for readiness probes.
- ``GET /v1/_faults``: how many faults fired so far (``--fault-rate``).

``--fault-rate R`` (the soak's faulty upstream; 0 for the benchmarks): each image request draws,
with probability R, one fault of ``FAULTS``: an error status, a delay, a hang, a dropped
connection, a body that is not JSON, or a response cut after one or two stream events (half the
body when not streaming). The draw is seeded (``--seed``).

The listening port is printed on stdout as ``PORT <n>`` once the socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import re
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httptools
import orjson
from PIL import Image

CREATED = 1_750_000_000
LARGE_SIZE = (1536, 1024)
# Edit uploads can be hundreds of MB: only this much is kept, for the form fields before the image.
EDIT_FIELDS_BYTES = 1 << 20
_FIELD = re.compile(rb'name="(stream|partial_images|n)"\r\n\r\n([^\r]*)\r\n')

# The soak's fault mix, the same kinds as the tests' fake upstream (tests/reliability/harness.py):
# error statuses (the 5xx and the 429 are retried by the gateway, the 400 relayed), a 0.2 s delay, a
# hang (the gateway's upstream timeout ends it), a dropped connection, a 200 that is not JSON, and
# a response cut after one or two SSE events.
FAULTS: tuple[tuple[str, int], ...] = (
    ("status", 500),
    ("status", 502),
    ("status", 503),
    ("status", 429),
    ("status", 400),
    ("delay", 0),
    ("hang", 0),
    ("close", 0),
    ("invalid_json", 0),
    ("cut", 1),
    ("cut", 2),
)
_ERRORS = {
    400: (b"invalid_request_error", b'"invalid_value"', b"The fake refused this one."),
    429: (b"rate_limit_exceeded", b'"rate_limit_exceeded"', b"Rate limit reached."),
}


def _tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 160)).save(out, format="PNG")
    return out.getvalue()


def _large_png() -> bytes:
    """A real 1536x1024 PNG of ~2.3 MB: noise restricted to 3 bits per channel, which compresses
    about as badly as a detailed photo-like render. Seeded, so every run serves the same bytes."""
    rng = random.Random(1536)
    raw = bytes(b & 0x07 for b in rng.randbytes(LARGE_SIZE[0] * LARGE_SIZE[1] * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", LARGE_SIZE, raw).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _usage(image_tokens: int, n: int) -> dict[str, Any]:
    return {
        "input_tokens": 12,
        "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
        "output_tokens": image_tokens * n,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": image_tokens * n},
        "total_tokens": 12 + image_tokens * n,
    }


class Answers:
    """Precomputed answer bodies, keyed by what the request asked for."""

    def __init__(self) -> None:
        import base64

        self.tiny_b64 = base64.b64encode(_tiny_png()).decode()
        self.large_b64 = base64.b64encode(_large_png()).decode()
        self._bodies: dict[tuple[bool, int], bytes] = {}
        self.models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": CREATED, "owned_by": "bench"}
                    for name in ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
                ],
            }
        )

    @staticmethod
    def is_large(request: dict[str, Any]) -> bool:
        return request.get("size") == "1536x1024" and request.get("quality") == "high"

    def generation(self, request: dict[str, Any]) -> bytes:
        large = self.is_large(request)
        n = _count(request.get("n"))
        key = (large, n)
        if key not in self._bodies:
            self._bodies[key] = orjson.dumps(
                {
                    "created": CREATED,
                    "data": [{"b64_json": self.large_b64 if large else self.tiny_b64}] * n,
                    "background": "opaque",
                    "output_format": "png",
                    "quality": "high" if large else "low",
                    "size": "1536x1024" if large else "1024x1024",
                    "usage": _usage(6208 if large else 272, n),
                }
            )
        return self._bodies[key]

    def events(self, request: dict[str, Any], prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """The SSE events of a streamed answer, without their ``emitted_ns`` (added when sent)."""
        large = self.is_large(request)
        settings = {
            "background": "opaque",
            "output_format": "png",
            "quality": "high" if large else "low",
            "size": "1536x1024" if large else "1024x1024",
            "created_at": CREATED,
        }
        events: list[tuple[str, dict[str, Any]]] = []
        for index in range(min(_count(request.get("partial_images"), low=0), 3)):
            kind = f"{prefix}.partial_image"
            events.append(
                (kind, {"type": kind, "b64_json": self.tiny_b64, "partial_image_index": index, **settings})
            )
        for _ in range(_count(request.get("n"))):
            kind = f"{prefix}.completed"
            image = self.large_b64 if large else self.tiny_b64
            events.append((kind, {"type": kind, "b64_json": image, **settings, "usage": _usage(272, 1)}))
        return events


def _count(value: object, *, low: int = 1) -> int:
    return max(low, min(int(value), 10)) if isinstance(value, int) else low


def _head(status: int, content_type: str, length: int | None, keep_alive: bool) -> bytes:
    reasons = {200: "OK", 404: "Not Found", 400: "Bad Request", 429: "Too Many Requests"}
    reason = reasons.get(status, "Error" if status >= 500 else "OK")
    lines = [f"HTTP/1.1 {status} {reason}", f"content-type: {content_type}"]
    lines.append(f"content-length: {length}" if length is not None else "transfer-encoding: chunked")
    if content_type == "text/event-stream":
        # nginx honours this per response: SSE goes through unbuffered, JSON keeps nginx's defaults.
        lines.append("x-accel-buffering: no")
    lines.append("connection: keep-alive" if keep_alive else "connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Held:
    """Generations being held (``--hold-s``) right now, and the most at once since the last reset:
    how much work a proxy really kept in flight, whatever its CPU allowed it to do per second."""

    now = 0
    most = 0


class FaultDraw:
    """The seeded draw of ``--fault-rate``, shared by every connection."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self.rng = random.Random(seed)
        self.fired = 0

    def draw(self) -> tuple[str, int] | None:
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        self.fired += 1
        return self.rng.choice(FAULTS)


def edit_fields(body: bytes) -> dict[str, Any]:
    """``stream``, ``partial_images`` and ``n`` of a multipart edit body, typed as in JSON."""
    fields: dict[str, Any] = {}
    for name, value in _FIELD.findall(body):
        text = value.decode(errors="replace")
        fields[name.decode()] = text == "true" if name == b"stream" else int(text) if text.isdigit() else text
    return fields


class UpstreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection. Requests are handled one at a time, as none of the clients pipeline."""

    def __init__(
        self, answers: Answers, pace_s: float, hold_s: float = 0.0, faults: FaultDraw | None = None
    ) -> None:
        self.answers = answers
        self.faults = faults or FaultDraw(0.0, 0)
        self.pace_s = pace_s
        # The "slow upstream" scenario: each generation is answered this long after it arrived,
        # as a real image model takes 5-60 s (a timer, not a sleeping task: thousands at once are cheap).
        self.hold_s = hold_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body = bytearray()
        self.edit = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP: always a full Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, b'{"error": {"message": "bad request"}}', keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.edit = self.url.startswith(b"/v1/images/edits")

    def on_body(self, body: bytes) -> None:
        if not self.edit:
            self.body += body
        elif len(self.body) < EDIT_FIELDS_BYTES:
            self.body += body[: EDIT_FIELDS_BYTES - len(self.body)]

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        keep_alive = self.parser.should_keep_alive()
        if method == b"GET" and path == b"/v1/models":
            self._send(200, self.answers.models, keep_alive=keep_alive)
        elif method == b"POST" and path == b"/v1/_held/reset":
            answer = orjson.dumps({"now": Held.now, "most": Held.most})
            Held.most = Held.now
            self._send(200, answer, keep_alive=keep_alive)
        elif method == b"GET" and path == b"/v1/_faults":
            self._send(200, orjson.dumps({"fired": self.faults.fired}), keep_alive=keep_alive)
        elif method == b"POST" and path in (b"/v1/images/edits", b"/v1/images/generations"):
            fault = self.faults.draw()
            if fault is None:
                self._image(path, keep_alive)
            elif fault[0] == "delay":
                asyncio.get_running_loop().call_later(0.2, self._image, path, keep_alive)
            else:
                self._fault(fault, path, keep_alive)
        else:
            self._send(
                404,
                b'{"error": {"message": "no such route", "type": "invalid_request_error"}}',
                keep_alive=True,
            )

    def _request(self, path: bytes) -> dict[str, Any]:
        if path == b"/v1/images/edits":
            return edit_fields(bytes(self.body))
        return orjson.loads(self.body) if self.body else {}

    def _image(self, path: bytes, keep_alive: bool) -> None:
        request = self._request(path)
        if request.get("stream") is True:
            prefix = "image_edit" if path == b"/v1/images/edits" else "image_generation"
            asyncio.ensure_future(self._stream(request, keep_alive, prefix))
        elif path == b"/v1/images/edits":
            self._send(200, self.answers.generation({"n": request.get("n")}), keep_alive=keep_alive)
        elif self.hold_s > 0:
            body = self.answers.generation(request)
            Held.now += 1
            Held.most = max(Held.most, Held.now)

            def answer() -> None:
                Held.now -= 1
                self._send(200, body, keep_alive=keep_alive)

            asyncio.get_running_loop().call_later(self.hold_s, answer)
        else:
            self._send(200, self.answers.generation(request), keep_alive=keep_alive)

    def _fault(self, fault: tuple[str, int], path: bytes, keep_alive: bool) -> None:
        kind, arg = fault
        if self.transport is None or kind == "hang":
            return  # a hang lasts until the client gives up and closes the connection
        if kind == "status":
            type_, code, message = _ERRORS.get(arg, (b"server_error", b"null", b"The fake failed."))
            body = b'{"error": {"message": "%s", "type": "%s", "param": null, "code": %s}}' % (
                message,
                type_,
                code,
            )
            self._send(arg, body, keep_alive=keep_alive)
        elif kind == "close":
            self.transport.close()
        elif kind == "invalid_json":
            self._send(200, b'{"created": 17000, "data": [', keep_alive=keep_alive)
        else:  # cut: a stream after `arg` events, a JSON answer after half its body
            request = self._request(path)
            if request.get("stream") is True:
                prefix = "image_edit" if path == b"/v1/images/edits" else "image_generation"
                asyncio.ensure_future(self._stream(request, keep_alive, prefix, cut_after=arg))
                return
            body = self.answers.generation(
                {"n": request.get("n")} if path == b"/v1/images/edits" else request
            )
            self.transport.write(_head(200, "application/json", len(body), True) + body[: len(body) // 2])
            self.transport.close()

    def _send(self, status: int, body: bytes, *, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(_head(status, "application/json", len(body), keep_alive) + body)
        if not keep_alive:
            self.transport.close()

    async def _stream(
        self, request: dict[str, Any], keep_alive: bool, prefix: str, *, cut_after: int | None = None
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(_head(200, "text/event-stream", None, keep_alive))
        for index, (kind, data) in enumerate(self.answers.events(request, prefix)):
            if index == cut_after:
                transport.close()
                return
            if index and self.pace_s:
                await asyncio.sleep(self.pace_s)
            if transport.is_closing():
                return
            payload = orjson.dumps({**data, "emitted_ns": time.monotonic_ns()})
            event = b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"
            transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        transport.write(b"0\r\n\r\n")
        if not keep_alive:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002  # asyncio's signature
        self.transport = None


async def serve(
    host: str, port: int, pace_s: float, hold_s: float = 0.0, faults: FaultDraw | None = None
) -> None:
    answers = Answers()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(answers, pace_s, hold_s, faults), host, port, backlog=4096
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="fast fake OpenAI Images upstream for benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pace-ms", type=float, default=10.0, help="pause between streamed events")
    parser.add_argument("--hold-s", type=float, default=0.0, help="answer each generation after this long")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of image requests that fail")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draw")
    args = parser.parse_args()
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # plain asyncio is fast enough; uvloop only lowers the floor further
        pass
    try:
        run(
            serve(
                args.host, args.port, args.pace_ms / 1000, args.hold_s, FaultDraw(args.fault_rate, args.seed)
            )
        )
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
