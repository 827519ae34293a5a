"""A webhook receiver: a real HTTP server on 127.0.0.1 that verifies Standard Webhooks signatures
(with the `standardwebhooks` package, as a receiver would), records every delivery, and fails on
purpose (`fail_next`). It can be stopped and started again on the same port (a receiver that is
down for a while)."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.server import ThreadedServer


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int

    @property
    def event(self) -> dict[str, Any]:
        parsed = json.loads(self.body)
        assert isinstance(parsed, dict)
        return parsed


class WebhookReceiver:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.secret: str | None = None
        self._cond = threading.Condition()
        self._received: list[Received] = []
        self._failures: list[int] = []
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["POST"])])
        self.server = ThreadedServer(app, port=self.port, name="webhook-receiver")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/images"

    def start(self) -> WebhookReceiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def fail_next(self, *statuses: int) -> None:
        with self._cond:
            self._failures.extend(statuses)

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def wait_for(self, n: int, *, verified_only: bool = True, timeout: float = 30.0) -> list[Received]:
        def ready() -> bool:
            return len([r for r in self._received if r.verified or not verified_only]) >= n

        with self._cond:
            assert self._cond.wait_for(ready, timeout), f"only {len(self._received)} deliveries arrived"
            return list(self._received)

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        verified = False
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        with self._cond:
            status = self._failures.pop(0) if self._failures else (204 if verified else 400)
            self._received.append(Received(headers, body, verified, status))
            self._cond.notify_all()
        return Response(status_code=status)
