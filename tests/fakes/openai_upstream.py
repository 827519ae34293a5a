"""A fake OpenAI upstream: a real HTTP server on 127.0.0.1 speaking the OpenAI Images wire format,
with a record of every request and scripted faults.

    with FakeOpenAI() as fake:                       # or fake.start() / fake.stop()
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        fake.enqueue_fault(Fault.status(503, path="/v1/images/generations"))
        ...
        assert fake.last.json["prompt"] == "a cat"

Routes: POST /v1/images/generations (JSON), POST /v1/images/edits (multipart or JSON), POST /v1/moderations,
GET /v1/models[/{id}], GET /v1/fake-files/{name} (images for `response_format=url`, no auth). Azure paths
(/openai/deployments/{deployment}/images/..., /openai/v1/...) map onto the same handlers.

How faults drop connections: the fake closes the uvicorn connection's transport itself (found through the
ASGI `receive` callable's cycle object), so `close` sends no byte at all and the client sees
"Server disconnected without sending a response" (httpx `RemoteProtocolError`; the SDK's
`APIConnectionError`). Under a non-uvicorn server it falls back to a truncated response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Self

import orjson
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from tests.fakes.images import MIME_TYPES, image_size_of, parse_size, render_b64, render_image, size_str
from tests.fakes.openai_wire import (
    DEFAULT_MODELS,
    Fault,
    FaultKind,
    RecordedFile,
    RecordedRequest,
    api_path,
    default_usage,
    moderation_result,
    moderation_texts,
    openai_error,
)
from tests.fakes.server import ThreadedServer

__all__ = ["FakeOpenAI", "Fault", "FaultKind", "RecordedFile", "RecordedRequest"]

_TRANSPORT = "fake_openai.transport"
_MAX_PART = 100 * 1024 * 1024
_Handler = Callable[[Request, RecordedRequest, str | None, Fault | None], Awaitable[Response]]


class _ConnectionDropped(Exception):
    """Raised (fallback only) to make the server abort a response when no transport is reachable."""


class _Raw(Response):
    """A response that runs its own ASGI code (SSE, hangs, dropped connections)."""

    def __init__(self, run: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        super().__init__()
        self._run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._run(scope, receive, send)


class _ClientWatch:
    """Watches `receive` for the client's disconnect while a response is slow, hanging or streaming."""

    def __init__(self, scope: Scope, receive: Receive, stopping: threading.Event) -> None:
        self._scope, self._receive, self._stopping = scope, receive, stopping
        self.dropped = False

    async def __aenter__(self) -> Self:
        self._task = asyncio.ensure_future(self._watch())
        return self

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
        """Sleep up to `seconds`; True as soon as the client is gone or the fake is stopping."""
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
        transport = self._scope.get(_TRANSPORT)
        if transport is None:
            raise _ConnectionDropped("no transport: letting the server abort the response")
        self.dropped = True
        transport.close()
        await asyncio.wait({self._task}, timeout=2)  # uvicorn marks the cycle disconnected: no 500 follows

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _json(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    hdrs = {"x-request-id": f"req_{uuid.uuid4().hex}", **(headers or {})}
    return Response(orjson.dumps(payload), status_code, hdrs, media_type="application/json")


class FakeOpenAI:
    """The fake upstream. Tunables (plain attributes, reset by `clear()`): `usage`, `stream_delay_s`,
    `noise_images`, `moderation_flag_words`, `moderation_category`, `moderation_flag_images`, `models`,
    `always_fail`."""

    def __init__(self, api_key: str = "sk-upstream-test", **server_kwargs: Any) -> None:
        self.api_key = api_key
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._files: dict[str, tuple[bytes, str]] = {}
        self._in_flight = 0
        self.clear()
        app = Starlette(
            routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST", "PUT", "DELETE"])]
        )
        self.server = ThreadedServer(self._asgi(app), lifespan="on", name="fake-openai", **server_kwargs)

    def clear(self) -> None:
        """Forget requests, faults and counters, and restore every tunable to its default."""
        with self._cond:
            self._requests.clear()
            self._faults.clear()
            self._files.clear()
            self._stream_disconnects = 0
            self._max_in_flight = self._in_flight
        self.always_fail: Fault | None = None
        self.usage: dict[str, Any] = default_usage()
        self.stream_delay_s = 0.0
        self.noise_images = False  # incompressible images: the payload size follows the image size
        self.moderation_flag_words: set[str] = {"forbidden"}
        self.moderation_category = "violence"
        self.moderation_flag_images = False
        self.models: list[str] = list(DEFAULT_MODELS)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Self:
        self._stopping.clear()
        self.server.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging / slow / streaming handlers first
        self.server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    # -- records --------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every recorded request, oldest first."""
        with self._cond:
            return list(self._requests)

    @property
    def last(self) -> RecordedRequest:
        with self._cond:
            if not self._requests:
                raise AssertionError("the fake upstream has not received any request")
            return self._requests[-1]

    def count(self, path: str | None = None) -> int:
        with self._cond:
            return sum(1 for r in self._requests if path is None or r.path == path)

    def wait_for_count(self, n: int, path: str | None = None, timeout: float = 5.0) -> bool:
        """Block until at least `n` requests (to `path`) were recorded; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.count(path) >= n, timeout)

    @property
    def stream_disconnects(self) -> int:
        """How many streaming responses ended because the client went away before the last event."""
        with self._cond:
            return self._stream_disconnects

    def wait_for_stream_disconnects(self, n: int = 1, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._stream_disconnects >= n, timeout)

    @property
    def in_flight(self) -> int:
        """Requests being handled right now (streams count until their last byte)."""
        with self._cond:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The highest `in_flight` seen since the last `clear()`."""
        with self._cond:
            return self._max_in_flight

    # -- faults ---------------------------------------------------------------------------------------

    def enqueue_fault(self, *faults: Fault) -> None:
        """Queue faults; each matching request consumes the first queued fault whose path matches."""
        with self._cond:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> list[Fault]:
        with self._cond:
            return list(self._faults)

    def _take_fault(self, *paths: str) -> Fault | None:
        with self._cond:
            for fault in self._faults:
                if fault.matches(*paths):
                    fault.fired += 1
                    if fault.fired >= fault.times:
                        self._faults.remove(fault)
                    return fault
            persistent = self.always_fail
            if persistent is not None and persistent.matches(*paths):
                persistent.fired += 1
                return persistent
        return None

    # -- ASGI plumbing --------------------------------------------------------------------------------

    def _asgi(self, app: Starlette) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        async def outer(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            cycle = getattr(receive, "__self__", None)  # uvicorn's RequestResponseCycle
            scope[_TRANSPORT] = getattr(cycle, "transport", None)
            with self._cond:
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
            try:
                await app(scope, receive, send)
            finally:
                with self._cond:
                    self._in_flight -= 1

        return outer

    async def _record(self, request: Request) -> RecordedRequest:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        content_type = headers.get("content-type", "")
        form: dict[str, list[str]] = {}
        files: list[RecordedFile] = []
        body, parsed = b"", None
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            async with request.form(max_files=10_000, max_fields=10_000, max_part_size=_MAX_PART) as data:
                for key, value in data.multi_items():
                    if isinstance(value, UploadFile):
                        files.append(
                            RecordedFile(key, value.filename, value.content_type, await value.read())
                        )
                    else:
                        form.setdefault(key, []).append(value)
        else:
            body = await request.body()
            with contextlib.suppress(ValueError):
                parsed = json.loads(body) if body else None
        record = RecordedRequest(
            request.method,
            request.url.path,
            dict(request.query_params),
            headers,
            parsed,
            form,
            files,
            body,
            time.monotonic(),
        )
        with self._cond:
            self._requests.append(record)
            self._cond.notify_all()
        return record

    def _note_stream_disconnect(self) -> None:
        with self._cond:
            self._stream_disconnects += 1
            self._cond.notify_all()

    # -- request handling -----------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> Response:
        record = await self._record(request)
        path, deployment = api_path(record.path)
        fault = self._take_fault(record.path, path)
        if fault is not None and fault.kind != "stream_cut":
            response = await self._fault_response(fault, request)
            if response is not None:
                return response
        if record.method == "GET" and path.startswith("/v1/fake-files/"):
            return self._serve_file(path.rsplit("/", 1)[-1])
        if not self._authorized(record.headers):
            return _json(openai_error("Incorrect API key provided", code="invalid_api_key"), 401)
        handler = self._routes().get((record.method, path))
        if handler is None and record.method == "GET" and path.startswith("/v1/models/"):
            return self._model(path.rsplit("/", 1)[-1])
        if handler is None:
            return _json(openai_error(f"Invalid URL ({record.method} {record.path})"), 404)
        cut = fault if fault is not None and fault.kind == "stream_cut" else None
        response = await handler(request, record, deployment, cut)
        if cut is not None and not isinstance(response, _Raw):  # not a stream: half a body, then drop
            return self._truncated(response.body, response.status_code)
        return response

    def _routes(self) -> dict[tuple[str, str], _Handler]:
        return {
            ("POST", "/v1/images/generations"): self._generations,
            ("POST", "/v1/images/edits"): self._edits,
            ("POST", "/v1/moderations"): self._moderations,
            ("GET", "/v1/models"): self._list_models,
        }

    def _authorized(self, headers: dict[str, str]) -> bool:
        return (
            headers.get("authorization") == f"Bearer {self.api_key}" or headers.get("api-key") == self.api_key
        )

    async def _fault_response(self, fault: Fault, request: Request) -> Response | None:
        if fault.kind == "status":
            body = fault.body if fault.body is not None else orjson.dumps(fault.error or {})
            hdrs = {"x-request-id": f"req_{uuid.uuid4().hex}", **fault.headers}
            return Response(body, fault.status_code, hdrs, media_type="application/json")
        if fault.kind == "invalid_json":
            return Response(fault.body or b"not json", fault.status_code, fault.headers, "application/json")
        if fault.kind == "delay":
            async with _ClientWatch(request.scope, request.receive, self._stopping) as watch:
                await watch.sleep(fault.delay_s)
            return None  # then answer normally

        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            async with _ClientWatch(scope, receive, self._stopping) as watch:
                if fault.kind == "hang":
                    await watch.sleep(math.inf)
                    if watch.disconnected:
                        return
                await watch.drop()  # `close`, or a hang interrupted by stop()

        return _Raw(run)

    # -- images ---------------------------------------------------------------------------------------

    async def _generations(
        self, request: Request, record: RecordedRequest, deployment: str | None, fault: Fault | None
    ) -> Response:
        params = record.json if isinstance(record.json, dict) else {}
        return self._images(params, "image_generation", deployment, fault, None)

    async def _edits(
        self, request: Request, record: RecordedRequest, deployment: str | None, fault: Fault | None
    ) -> Response:
        if isinstance(record.json, dict):  # JSON edits (image references by URL / file id)
            return self._images(record.json, "image_edit", deployment, fault, None)
        params: dict[str, Any] = {k: v[0] for k, v in record.form.items()}
        images = record.files_for("image", "image[]")
        if not images:
            return _json(
                openai_error(
                    "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
                ),
                400,
            )
        return self._images(params, "image_edit", deployment, fault, image_size_of(images[0].data))

    def _images(
        self,
        params: dict[str, Any],
        prefix: str,
        deployment: str | None,
        fault: Fault | None,
        input_size: tuple[int, int] | None,
    ) -> Response:
        model = str(params.get("model") or deployment or "gpt-image-1")
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _json(
                openai_error(
                    "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
                ),
                400,
            )
        dalle = model.startswith("dall-e")
        stream = str(params.get("stream")).lower() in {"true", "1"}
        if dalle and stream:
            return _json(
                openai_error(
                    f"Streaming is not supported for {model}.", param="stream", code="invalid_value"
                ),
                400,
            )
        n = int(params.get("n") or 1)
        size = parse_size(params.get("size"), input_size or (1024, 1024))
        fmt = "png" if dalle else str(params.get("output_format") or "png").lower()
        transparent = params.get("background") == "transparent"
        quality = str(params.get("quality") or "auto")
        settings = {
            "background": "transparent" if transparent else "opaque",
            "output_format": fmt,
            "quality": "high" if quality == "auto" else quality,
            "size": size_str(size),
        }

        def b64(variant: int) -> str:
            return render_b64(size[0], size[1], fmt, transparent, variant, self.noise_images)

        if stream:
            partials = int(params.get("partial_images") or 0)
            cut = fault.events_before_cut if fault is not None else None
            return self._stream(self._events(prefix, n, partials, settings, b64), cut)
        if dalle:
            data: list[dict[str, Any]] = []
            for i in range(n):
                item = (
                    {"url": self._store(size, i)}
                    if params.get("response_format") == "url"
                    else {"b64_json": b64(i)}
                )
                if model.startswith("dall-e-3"):
                    item["revised_prompt"] = f"A detailed rendering of: {prompt}"
                data.append(item)
            payload: dict[str, Any] = {"created": int(time.time()), "data": data}
        else:
            data = [{"b64_json": b64(i)} for i in range(n)]
            payload = {"created": int(time.time()), "data": data, **settings, "usage": self.usage}
        return _json(payload)

    def _events(
        self, prefix: str, n: int, partials: int, settings: dict[str, str], b64: Callable[[int], str]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        created_at = int(time.time())
        for index in range(partials):
            event = f"{prefix}.partial_image"
            yield (
                event,
                {
                    "type": event,
                    "b64_json": b64(100 + index),
                    "partial_image_index": index,
                    **settings,
                    "created_at": created_at,
                },
            )
        for index in range(n):
            event = f"{prefix}.completed"
            yield (
                event,
                {
                    "type": event,
                    "b64_json": b64(index),
                    **settings,
                    "created_at": created_at,
                    "usage": self.usage,
                },
            )

    def _stream(self, events: Iterator[tuple[str, dict[str, Any]]], cut_after: int | None) -> Response:
        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-request-id", f"req_{uuid.uuid4().hex}".encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            finished = False
            async with _ClientWatch(scope, receive, self._stopping) as watch:
                for index, (event, data) in enumerate(events):
                    if index and self.stream_delay_s > 0 and await watch.sleep(self.stream_delay_s):
                        break
                    if watch.gone:
                        break
                    await send({"type": "http.response.body", "body": _sse(event, data), "more_body": True})
                    if cut_after is not None and index + 1 >= cut_after:
                        await watch.drop()
                        return
                else:
                    finished = True
                if watch.disconnected and not finished:
                    self._note_stream_disconnect()
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        return _Raw(run)

    def _truncated(self, body: bytes, status_code: int = 200) -> Response:
        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            async with _ClientWatch(scope, receive, self._stopping) as watch:
                await watch.drop()

        return _Raw(run)

    def _store(self, size: tuple[int, int], variant: int) -> str:
        name = f"img-{uuid.uuid4().hex}.png"
        with self._cond:
            self._files[name] = (
                render_image(size[0], size[1], "png", False, variant, self.noise_images),
                "png",
            )
        return f"{self.base_url}/fake-files/{name}"

    def _serve_file(self, name: str) -> Response:
        with self._cond:
            found = self._files.get(name)
        if found is None:
            return _json(openai_error("File not found.", code="not_found"), 404)
        return Response(found[0], media_type=MIME_TYPES[found[1]])

    # -- moderations and models -----------------------------------------------------------------------

    async def _moderations(
        self, request: Request, record: RecordedRequest, deployment: str | None, fault: Fault | None
    ) -> Response:
        body = record.json if isinstance(record.json, dict) else {}
        texts, has_image = moderation_texts(body.get("input"))
        words = set(self.moderation_flag_words)
        results = [moderation_result(t, words, self.moderation_category, has_image) for t in texts]
        if has_image and self.moderation_flag_images:
            results = [
                moderation_result(
                    self.moderation_category, {self.moderation_category}, self.moderation_category, True
                )
            ]
        model = str(body.get("model") or "omni-moderation-latest")
        return _json({"id": f"modr-{uuid.uuid4().hex[:24]}", "model": model, "results": results})

    def _model_object(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "openai"}

    async def _list_models(
        self, request: Request, record: RecordedRequest, deployment: str | None, fault: Fault | None
    ) -> Response:
        return _json({"object": "list", "data": [self._model_object(m) for m in self.models]})

    def _model(self, model_id: str) -> Response:
        if model_id not in self.models:
            message = f"The model '{model_id}' does not exist"
            return _json(openai_error(message, code="model_not_found", param="model"), 404)
        return _json(self._model_object(model_id))
