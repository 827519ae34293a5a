"""Real HTTP upstreams on 127.0.0.1 whose answers the test scripts, for the upstream adapters' tests.

    async with ScriptedUpstream(lambda request: json_response(200, {...})) as upstream:
        provider = OpenAICompatProvider(base_url=f"http://api.example:{upstream.port}/v1", session=...)

`ScriptedUpstream` is an aiohttp.web server: every request is read whole and recorded (method, Host,
raw path and query, headers, body), then answered by the script, which may be sync or async and
may stream. `RawUpstream` answers with raw bytes (or not at all), for what no well-behaved server
sends: malformed status lines, truncated bodies, dropped connections, a body nobody reads.
`LoopbackResolver` sends every host name to 127.0.0.1, so adapters can be given real-looking
upstream URLs (hosts to scrub, Azure resource names); `HangingResolver` never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy

Answer = Callable[[web.Request], web.StreamResponse | Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Recorded:
    method: str
    host: str
    path_qs: str  # raw, as sent: percent-escapes untouched
    headers: CIMultiDictProxy[str]
    body: bytes
    peer_port: int  # the client's port: the same for requests on one pooled connection

    @property
    def url(self) -> str:
        return f"http://{self.host}{self.path_qs}"

    @property
    def path(self) -> str:
        return self.path_qs.split("?", 1)[0]

    def json(self) -> Any:
        return orjson.loads(self.body)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=body if isinstance(body, bytes) else orjson.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
    )


def gzip_response(body: Any) -> web.Response:
    return web.Response(
        body=gzip.compress(orjson.dumps(body)),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )


def sse(*events: tuple[str, dict[str, Any]]) -> list[bytes]:
    return [f"event: {name}\ndata: {orjson.dumps(data).decode()}\n\n".encode() for name, data in events]


def sse_response(chunks: list[bytes], *, pause_s: float = 0.0, then_hang: bool = False) -> Answer:
    """An SSE answer: ``chunks`` written ``pause_s`` apart; with ``then_hang``, the stream then stays
    open without a byte more (until the client leaves)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for index, chunk in enumerate(chunks):
            if index and pause_s:
                await asyncio.sleep(pause_s)
            await response.write(chunk)
        if then_hang:
            await asyncio.Event().wait()
        await response.write_eof()
        return response

    return answer


@dataclass
class ScriptedUpstream:
    answer: Answer
    requests: list[Recorded] = field(default_factory=list)
    # Handlers that ended because the client went away (a closed stream, an abandoned wait).
    client_gone: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def last(self) -> Recorded:
        assert self.requests, "the upstream received no request"
        return self.requests[-1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            Recorded(
                request.method,
                request.headers.get("host", ""),
                request.raw_path,
                request.headers,
                await request.read(),
                peer[1] if peer else 0,
            )
        )
        try:
            answer = self.answer(request)
            return await answer if isinstance(answer, Awaitable) else answer
        except (asyncio.CancelledError, ConnectionResetError):
            self.client_gone.append(request.raw_path)
            raise


class RawUpstream:
    """A TCP server that reads the request head, then writes ``reply`` (None: nothing) and closes,
    unless ``hang``; with ``read_body=False`` it never reads past the first bytes of the request."""

    def __init__(self, reply: bytes | None = None, *, hang: bool = False, read_body: bool = True) -> None:
        self.reply, self.hang, self.read_body = reply, hang, read_body
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.read_body:
            # All of it: closing on unread bytes would send a reset, which may discard the reply.
            with contextlib.suppress(Exception):
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
        else:
            writer.transport.pause_reading()  # nothing more leaves the kernel's buffers
        if self.reply is not None:
            writer.write(self.reply)
            await writer.drain()
        if self.hang:
            await asyncio.Event().wait()
        writer.close()


class LoopbackResolver(AbstractResolver):
    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


class HangingResolver(LoopbackResolver):
    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")
