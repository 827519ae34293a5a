"""A fake OpenAI upstream: a real HTTP server on 127.0.0.1 speaking the OpenAI Images wire format,
with a record of every request and scripted faults.

    with FakeOpenAI() as fake:                       # or fake.start() / fake.stop()
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        fake.enqueue_fault(Fault.status(503, path="/v1/images/generations"))
        ...
        assert fake.last.json["prompt"] == "a cat"

Routes: POST /v1/images/generations (JSON), POST /v1/images/edits (multipart, or JSON), POST /v1/moderations,
GET /v1/models, GET /v1/models/{id}, GET /v1/fake-files/{name} (the images of `response_format=url`; no
auth). Azure paths (/openai/deployments/{deployment}/..., /openai/v1/...) map onto the same handlers.
Unknown routes: 404 OpenAI-shaped.

Order of handling: record the request -> apply a fault (queued first, then `random_faults`, then
`always_fail`) -> check the key (`Authorization: Bearer <api_key>` or Azure `api-key: <api_key>`) -> answer.
Connections are dropped by closing uvicorn's transport (see `tests/fakes/asgi.py`): the client sees a
transport error (httpx `RemoteProtocolError`; the SDK's `APIConnectionError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Self

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.fakes.asgi import (
    ClientWatch,
    RawResponse,
    drop_before_response,
    hanging_response,
    json_response,
    remember_transport,
    request_id,
    slow_response,
    sse_event,
    truncated_response,
)
from tests.fakes.images import MIME_TYPES, image_size_of, render_image
from tests.fakes.openai_images import ImageJob, InvalidParams
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

_MAX_PART = 100 * 1024 * 1024
_Handler = Callable[[RecordedRequest, str | None, Fault | None], Awaitable[Response]]


class FakeOpenAI:
    """The fake upstream. Tunables are plain attributes, restored to their defaults by `clear()`:
    `usage` (per response, and per streamed completed event), `stream_delay_s` (between SSE events),
    `noise_images` (incompressible images: payload size follows the image size), `moderation_flag_words`,
    `moderation_category`, `moderation_flag_images`, `models`, `pretty_json` (indent non-streamed image
    answers, as a gateway re-encoding them would not), `always_fail`, and `random_faults`
    (`fault_rate`, `fault_rng`): each request without a queued fault gets, with probability `fault_rate`, one
    of `random_faults` drawn by `fault_rng` (seed it for a reproducible run)."""

    def __init__(self, api_key: str = "sk-upstream-test", **server_kwargs: Any) -> None:
        """`server_kwargs` go to `ThreadedServer` (and from there to `uvicorn.Config`)."""
        self.api_key = api_key
        self._cond = threading.Condition()  # guards every recorded/queued thing below
        self._stopping = threading.Event()
        self._slow_bodies_go = threading.Event()  # see `send_slow_bodies`
        self._requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._files: dict[str, bytes] = {}
        self._in_flight = 0
        self.clear()
        route = Route("/{path:path}", self._endpoint, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        app = Starlette(routes=[route])
        self.server = ThreadedServer(self._asgi(app), lifespan="on", name="fake-openai", **server_kwargs)

    def clear(self) -> None:
        """Forget requests, faults and counters, and restore every tunable to its default."""
        with self._cond:
            self._requests.clear()
            self._faults.clear()
            self._files.clear()
            self._stream_disconnects = 0
            self._max_in_flight = self._in_flight
        self._slow_bodies_go.clear()
        self.always_fail: Fault | None = None
        self.random_faults: list[Fault] = []
        self.fault_rate = 0.0
        self.fault_rng = random.Random(0)
        self.usage: dict[str, Any] = default_usage()
        # When set, the usage of each answer from its request's parameters (None: no `usage` at
        # all), instead of `usage`; adversarial tests make it depend on the prompt.
        self.usage_for: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        # When set, only the streamed completed events of these image indexes carry `usage`.
        self.usage_on_images: set[int] | None = None
        # When set, a fault chosen from each request's parameters (after queued and random ones),
        # and the delay between the SSE events of each stream, instead of `stream_delay_s`.
        self.fault_for: Callable[[dict[str, Any]], Fault | None] | None = None
        self.stream_delay_for: Callable[[dict[str, Any]], float] | None = None
        self.stream_delay_s = 0.0
        # Parameters of the requests whose `slow_body` answer has sent its headers.
        self.slow_answers: list[dict[str, Any]] = []
        # ... and of those whose body then went out in full (the client did not leave first).
        self.slow_delivered: list[dict[str, Any]] = []
        self.abandoned: list[tuple[str, str | None]] = []
        self.noise_images = False
        self.moderation_flag_words: set[str] = {"forbidden"}
        self.moderation_category = "violence"
        self.moderation_flag_images = False
        self.models: list[str] = list(DEFAULT_MODELS)
        self.pretty_json = False
        self.last_answer: bytes | None = None  # the body of the last non-streamed image answer
        # The gate (see `hold`): image requests wait until this many requests are in flight at once.
        if getattr(self, "_gate", None) is not None:
            self.release()
        self._hold_until: int | None = None
        self._hold_timeout_s = 0.0
        self._gate: asyncio.Event | None = None
        self._gate_loop: asyncio.AbstractEventLoop | None = None
        # The step gate (see `step_streams`): SSE events go out only as the test allows them.
        if getattr(self, "_step_wake", None) is not None:
            self.stop_stepping()
        self._steps_allowed: int | None = None
        self._steps_sent = 0
        self._step_timeout_s = 0.0
        self._step_wake: asyncio.Event | None = None
        self._step_loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> Self:
        self._stopping.clear()
        self.server.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # first release hanging, slow and streaming handlers
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

    def wait_for_count(self, n: int, path: str | None = None, timeout: float = 30.0) -> bool:
        """Block until at least `n` requests (to `path`) were recorded; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.count(path) >= n, timeout)

    @property
    def stream_disconnects(self) -> int:
        """Streaming responses that ended because the client went away before their last event."""
        with self._cond:
            return self._stream_disconnects

    def wait_for_stream_disconnects(self, n: int = 1, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._stream_disconnects >= n, timeout)

    @property
    def in_flight(self) -> int:
        """Requests being handled right now (a stream counts until its last byte)."""
        with self._cond:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The highest `in_flight` seen since the last `clear()`."""
        with self._cond:
            return self._max_in_flight

    # -- the gate: counting concurrency without timers -------------------------------------------------

    def hold(self, until_in_flight: int, timeout_s: float = 30.0) -> None:
        """Hold every image request until `until_in_flight` requests are in flight at once (then
        all go), or `release()`; after `timeout_s` without either the gate opens by itself, so a
        client that cannot reach the count fails its assertion instead of hanging."""
        self._hold_until, self._hold_timeout_s = until_in_flight, timeout_s
        self._gate = None

    def release(self) -> None:
        """Open the gate for every held and later request."""
        gate, loop = self._gate, self._gate_loop
        self._hold_until = None
        if gate is not None and loop is not None:
            loop.call_soon_threadsafe(gate.set)

    async def _pass_gate(self) -> None:
        if self._hold_until is None:
            return
        if self._gate is None:
            self._gate, self._gate_loop = asyncio.Event(), asyncio.get_running_loop()
        gate = self._gate
        with self._cond:
            if self._in_flight >= self._hold_until:
                gate.set()
        try:
            async with asyncio.timeout(self._hold_timeout_s):
                await gate.wait()
        except TimeoutError:
            gate.set()  # once, for everyone: the count was not reached

    # -- the step gate: a stream's events, one at a time, when the test says ---------------------------

    def step_streams(self, timeout_s: float = 60.0) -> None:
        """From now on every SSE event (of any stream) waits until the test allows it with
        `allow_events`; a stream whose next event is not allowed within `timeout_s` stops
        stepping and sends the rest, so a test that forgets a step fails instead of hanging."""
        with self._cond:
            self._steps_allowed, self._steps_sent = 0, 0
        self._step_timeout_s = timeout_s

    def allow_events(self, count: int = 1) -> None:
        """Let `count` more stream events go out."""
        with self._cond:
            if self._steps_allowed is not None:
                self._steps_allowed += count
        self._wake_steps()

    def stop_stepping(self) -> None:
        with self._cond:
            self._steps_allowed = None
        self._wake_steps()

    @property
    def events_sent(self) -> int:
        """Stream events sent since `step_streams`."""
        with self._cond:
            return self._steps_sent

    def wait_events_sent(self, count: int, timeout: float = 30.0) -> bool:
        """Block until `count` stream events went out (to the gateway) since `step_streams`."""
        with self._cond:
            return self._cond.wait_for(lambda: self._steps_sent >= count, timeout)

    def _wake_steps(self) -> None:
        wake, loop = self._step_wake, self._step_loop
        if wake is not None and loop is not None:
            loop.call_soon_threadsafe(wake.set)

    async def _take_step(self, watch: ClientWatch) -> bool:
        """Wait for this event's turn; False when the client left (or the fake stops) meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._step_timeout_s
        while True:
            with self._cond:
                if self._steps_allowed is None or self._steps_sent < self._steps_allowed:
                    if self._steps_allowed is not None:
                        self._steps_sent += 1
                        self._cond.notify_all()
                    return True
                if self._step_wake is None:
                    self._step_wake, self._step_loop = asyncio.Event(), loop
                wake = self._step_wake
                wake.clear()  # under the lock: a later `allow_events` sets it again
            waiter = asyncio.ensure_future(wake.wait())
            try:
                while not waiter.done():
                    if watch.gone:
                        return False
                    if loop.time() > deadline:
                        with self._cond:  # the test never allowed it: stop stepping
                            self._steps_allowed = None
                        break
                    await asyncio.wait({waiter}, timeout=0.05)
            finally:
                waiter.cancel()

    def send_slow_bodies(self) -> None:
        """Let every `slow_body` answer (waiting now or later) send its body at once, before its delay
        is up: a test gives a long delay and ends it at the moment it chooses."""
        self._slow_bodies_go.set()

    # -- faults ---------------------------------------------------------------------------------------

    def enqueue_fault(self, *faults: Fault) -> None:
        """Queue faults. A request consumes the first queued fault whose path matches it (a fault with
        `times=N` serves N requests before leaving the queue)."""
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
            if self.random_faults and self.fault_rng.random() < self.fault_rate:
                drawn = self.fault_rng.choice(self.random_faults)
                if drawn.matches(*paths):
                    drawn.fired += 1
                    return drawn
            persistent = self.always_fail
            if persistent is not None and persistent.matches(*paths):
                persistent.fired += 1
                return persistent
        return None

    # -- plumbing -------------------------------------------------------------------------------------

    def _asgi(self, app: Starlette) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        async def outer(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            remember_transport(scope, receive)
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
        form: dict[str, list[str]] = {}
        files: list[RecordedFile] = []
        body, parsed = b"", None
        if headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form")):
            async with request.form(max_files=10_000, max_fields=10_000, max_part_size=_MAX_PART) as data:
                for key, item in data.multi_items():
                    if isinstance(item, UploadFile):
                        content = await item.read()
                        files.append(RecordedFile(key, item.filename, item.content_type, content))
                    else:
                        form.setdefault(key, []).append(item)
        else:
            body = await request.body()
            with contextlib.suppress(ValueError):
                parsed = json.loads(body) if body else None
        query = dict(request.query_params)
        record = RecordedRequest(
            request.method, request.url.path, query, headers, parsed, form, files, body, time.monotonic()
        )
        with self._cond:
            self._requests.append(record)
            self._cond.notify_all()
        return record

    # -- dispatch -------------------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> Response:
        record = await self._record(request)
        path, deployment = api_path(record.path)
        fault = self._take_fault(record.path, path)
        if fault is None and self.fault_for is not None and record.method == "POST":
            fault = self.fault_for(_params_of(record))
        if fault is not None and fault.kind not in ("stream_cut", "stream_end", "slow_body"):
            response = await self._fault_response(fault, request)
            if response is not None:
                return response
        if record.method == "GET" and path.startswith("/v1/fake-files/"):
            return self._serve_file(path.rsplit("/", 1)[-1])
        auth = record.headers.get("authorization")
        if auth != f"Bearer {self.api_key}" and record.headers.get("api-key") != self.api_key:
            return json_response(openai_error("Incorrect API key provided", code="invalid_api_key"), 401)
        handler = self._routes().get((record.method, path))
        if handler is None and record.method == "GET" and path.startswith("/v1/models/"):
            return self._model(path.rsplit("/", 1)[-1])
        if handler is None:
            return json_response(openai_error(f"Invalid URL ({record.method} {record.path})"), 404)
        cut = fault if fault is not None and fault.kind in ("stream_cut", "stream_end", "slow_body") else None
        if path.startswith("/v1/images/"):
            await self._pass_gate()
        response = await handler(record, deployment, cut)
        if cut is not None and not isinstance(response, RawResponse):  # not a stream: cut the body
            if cut.kind == "slow_body":
                params = _params_of(record)

                def answering() -> None:
                    with self._cond:
                        self.slow_answers.append(params)

                def delivered() -> None:
                    with self._cond:
                        self.slow_delivered.append(params)

                return slow_response(
                    bytes(response.body),
                    response.status_code,
                    cut.delay_s,
                    self._stopping,
                    answering,
                    delivered,
                    self._slow_bodies_go,
                )
            if cut.kind == "stream_cut":
                return truncated_response(bytes(response.body), response.status_code, self._stopping)
        return response

    def _routes(self) -> dict[tuple[str, str], _Handler]:
        return {
            ("POST", "/v1/images/generations"): self._generations,
            ("POST", "/v1/images/edits"): self._edits,
            ("POST", "/v1/images/variations"): self._variations,
            ("POST", "/v1/moderations"): self._moderations,
            ("GET", "/v1/models"): self._list_models,
        }

    async def _fault_response(self, fault: Fault, request: Request) -> Response | None:
        """The response a fault gives, or None to go on answering normally (after a `delay`)."""
        if fault.kind == "status":
            body = fault.body if fault.body is not None else json.dumps(fault.error or {}).encode()
            headers = {"x-request-id": request_id(), **fault.headers}
            return Response(body, fault.status_code, headers, media_type="application/json")
        if fault.kind == "invalid_json":
            return Response(fault.body or b"not json", fault.status_code, fault.headers, "application/json")
        if fault.kind == "delay":
            async with ClientWatch(request.scope, request.receive, self._stopping) as watch:
                if await watch.sleep(fault.delay_s):
                    # The client left while we "worked": nothing was delivered, so nothing ran to
                    # completion (tests count these to prove a task did not run twice).
                    with self._cond:
                        self.abandoned.append((request.url.path, request.headers.get("x-request-id")))
                    return Response(b"", 499)
            return None
        if fault.kind == "hang":
            return hanging_response(self._stopping)
        if fault.kind == "close":
            return drop_before_response(self._stopping)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    # -- images ---------------------------------------------------------------------------------------

    async def _generations(
        self, record: RecordedRequest, deployment: str | None, cut: Fault | None
    ) -> Response:
        params = record.json if isinstance(record.json, dict) else {}
        return self._images(params, "image_generation", deployment, cut, None)

    async def _edits(self, record: RecordedRequest, deployment: str | None, cut: Fault | None) -> Response:
        if isinstance(record.json, dict):  # JSON edits (images referenced by URL or file id)
            return self._images(record.json, "image_edit", deployment, cut, None)
        images = record.files_for("image", "image[]")
        if not images:
            message = "Missing required parameter: 'image'."
            return json_response(openai_error(message, code="missing_required_parameter", param="image"), 400)
        params = {key: values[0] for key, values in record.form.items()}
        return self._images(params, "image_edit", deployment, cut, image_size_of(images[0].data))

    async def _variations(
        self, record: RecordedRequest, deployment: str | None, cut: Fault | None
    ) -> Response:
        """dall-e-2's legacy endpoint: one square PNG, `n`, `size`, `response_format`; no prompt."""
        images = record.files_for("image")
        if not images:
            message = "Missing required parameter: 'image'."
            return json_response(openai_error(message, code="missing_required_parameter", param="image"), 400)
        params: dict[str, Any] = {key: values[0] for key, values in record.form.items()}
        params.setdefault("model", "dall-e-2")
        params["prompt"] = "a variation"
        return self._images(params, "image_variation", deployment, cut, image_size_of(images[0].data))

    def _images(
        self,
        params: dict[str, Any],
        kind: str,
        deployment: str | None,
        cut: Fault | None,
        input_size: tuple[int, int] | None,
    ) -> Response:
        try:
            job = ImageJob.from_params(
                params, kind, deployment=deployment, input_size=input_size, noise=self.noise_images
            )
        except InvalidParams as exc:
            return json_response(exc.body, 400)
        usage = self.usage_for(params) if self.usage_for is not None else self.usage
        if job.stream:
            limit = cut.events_before_cut if cut is not None and cut.kind != "slow_body" else None
            ends = cut is not None and cut.kind == "stream_end"
            delay = (
                self.stream_delay_for(params) if self.stream_delay_for is not None else self.stream_delay_s
            )
            return self._stream(
                job.events(usage, self.usage_on_images), limit, end_cleanly=ends, delay_s=delay
            )
        payload = job.payload(usage, lambda variant: self._store(job, variant))
        if not self.pretty_json:
            response = json_response(payload)
        else:
            response = Response(
                json.dumps(payload, indent=2).encode(),
                200,
                {"x-request-id": request_id()},
                "application/json",
            )
        self.last_answer = bytes(response.body)
        return response

    def _stream(
        self,
        events: Iterator[tuple[str, dict[str, Any]]],
        cut_after: int | None,
        *,
        end_cleanly: bool = False,
        delay_s: float | None = None,
    ) -> Response:
        """SSE: events separated by `stream_delay_s`; records a client that leaves before the end.
        After `cut_after` events the connection is dropped, or (`end_cleanly`) the body just ends."""

        pause = self.stream_delay_s if delay_s is None else delay_s

        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-request-id", request_id().encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            finished = False
            async with ClientWatch(scope, receive, self._stopping) as watch:
                for index, (event, data) in enumerate(events):
                    if index and pause > 0 and await watch.sleep(pause):
                        break
                    if watch.gone or not await self._take_step(watch):
                        break
                    await send(
                        {"type": "http.response.body", "body": sse_event(event, data), "more_body": True}
                    )
                    if cut_after is not None and index + 1 >= cut_after:
                        if end_cleanly:
                            finished = True
                            break
                        await watch.drop()
                        return
                else:
                    finished = True
                if watch.disconnected and not finished:
                    with self._cond:
                        self._stream_disconnects += 1
                        self._cond.notify_all()
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        return RawResponse(run)

    def _store(self, job: ImageJob, variant: int) -> str:
        name = f"img-{uuid.uuid4().hex}.png"
        data = render_image(job.size[0], job.size[1], "png", False, variant, job.noise)
        with self._cond:
            self._files[name] = data
        return f"{self.base_url}/fake-files/{name}"

    def _serve_file(self, name: str) -> Response:
        with self._cond:
            data = self._files.get(name)
        if data is None:
            return json_response(openai_error("File not found.", code="not_found"), 404)
        return Response(data, media_type=MIME_TYPES["png"])

    # -- moderations and models -----------------------------------------------------------------------

    async def _moderations(
        self, record: RecordedRequest, deployment: str | None, cut: Fault | None
    ) -> Response:
        body = record.json if isinstance(record.json, dict) else {}
        texts, has_image = moderation_texts(body.get("input"))
        words, category = set(self.moderation_flag_words), self.moderation_category
        results = [moderation_result(text, words, category, has_image) for text in texts]
        if has_image and self.moderation_flag_images:
            results = [moderation_result(category, {category}, category, True)]
        model = str(body.get("model") or "omni-moderation-latest")
        return json_response({"id": f"modr-{uuid.uuid4().hex[:24]}", "model": model, "results": results})

    @staticmethod
    def _model_object(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "openai"}

    async def _list_models(
        self, record: RecordedRequest, deployment: str | None, cut: Fault | None
    ) -> Response:
        return json_response({"object": "list", "data": [self._model_object(m) for m in self.models]})

    def _model(self, model_id: str) -> Response:
        if model_id not in self.models:
            error = openai_error(
                f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            )
            return json_response(error, 404)
        return json_response(self._model_object(model_id))


def _params_of(record: RecordedRequest) -> dict[str, Any]:
    """A request's parameters: its JSON object, or its form fields (first values)."""
    if isinstance(record.json, dict):
        return record.json
    return {key: values[0] for key, values in record.form.items()}
