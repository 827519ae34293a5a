"""The common part of the fake image providers (Google, FLUX, Stability): a real HTTP server on
127.0.0.1 that records every request and answers from a script of outcomes.

    fake.enqueue(Outcome("status", status=429, body=..., headers={"retry-after": "1"}))
    fake.enqueue(Outcome("malformed"))
    fake.enqueue(Outcome("finish", detail="IMAGE_SAFETY"))      # provider-specific kinds

A request takes the first queued outcome whose ``path`` (a substring) matches it; with none, it is
answered normally. ``status`` and ``malformed`` are handled here; every other kind is the
subclass's (``answer``). The key is checked after the outcome (as the OpenAI fake does), so a
scripted 429 is answered whatever the key.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import orjson
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.server import ThreadedServer


@dataclass
class Outcome:
    kind: str
    status: int = 200
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    detail: Any = None
    times: int = 1
    fired: int = 0


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any = None
    form: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, list[tuple[bytes, str | None]]] = field(default_factory=dict)


class ProviderFake:
    """Subclasses set ``name`` and implement ``authorized`` and ``answer``."""

    name = "fake-provider"

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self._lock = threading.Condition()
        self._requests: list[Recorded] = []
        self._outcomes: deque[Outcome] = deque()
        route = Route("/{path:path}", self._endpoint, methods=["GET", "POST"])
        self.server = ThreadedServer(Starlette(routes=[route]), name=self.name)

    # -- lifecycle and records ----------------------------------------------------------------------

    def start(self) -> Self:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._outcomes.clear()
        self.reset()

    def reset(self) -> None:
        """Subclasses restore their tunables here."""

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def count(self, path_part: str) -> int:
        return sum(1 for r in self.requests if path_part in r.path)

    def wait_for_count(self, n: int, path_part: str, timeout: float = 30.0) -> bool:
        with self._lock:
            return self._lock.wait_for(
                lambda: sum(1 for r in self._requests if path_part in r.path) >= n, timeout
            )

    def enqueue(self, *outcomes: Outcome) -> None:
        with self._lock:
            self._outcomes.extend(outcomes)

    # -- handling -----------------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> Response:
        recorded = await self._record(request)
        outcome = self._take(recorded.path)
        if outcome is not None and outcome.kind == "status":
            return Response(
                outcome.body or b"{}", outcome.status, outcome.headers, media_type="application/json"
            )
        if outcome is not None and outcome.kind == "malformed":
            return Response(b'{"this is": not json', 200, media_type="application/json")
        if not self.authorized(recorded):
            return self.unauthorized()
        return await self.answer(recorded, outcome)

    def _take(self, path: str) -> Outcome | None:
        with self._lock:
            for outcome in self._outcomes:
                if outcome.path is None or outcome.path in path:
                    outcome.fired += 1
                    if outcome.fired >= outcome.times:
                        self._outcomes.remove(outcome)
                    return outcome
        return None

    async def _record(self, request: Request) -> Recorded:
        body = await request.body()
        recorded = Recorded(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json") and body:
            recorded.json = orjson.loads(body)
        elif content_type.startswith("multipart/form-data"):
            async with request.form(max_part_size=64 * 1024 * 1024) as form:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        recorded.files.setdefault(key, []).append((await value.read(), value.content_type))
                    else:
                        recorded.form.setdefault(key, []).append(str(value))
        with self._lock:
            self._requests.append(recorded)
            self._lock.notify_all()
        return recorded

    def authorized(self, recorded: Recorded) -> bool:
        raise NotImplementedError

    def unauthorized(self) -> Response:
        return Response(b'{"error": {"message": "bad key"}}', 401, media_type="application/json")

    async def answer(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        raise NotImplementedError


def json_answer(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")
