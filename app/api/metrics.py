"""``GET /metrics`` and the middleware that counts and times every HTTP request."""

from __future__ import annotations

import time
from collections.abc import Mapping

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import bearer_token
from app.core.errors import AuthenticationError
from app.core.security import secrets_equal
from app.telemetry.metrics import OTHER, Metrics


class MetricsMiddleware:
    """Pure ASGI (only ``send`` is wrapped), so streamed responses pass through chunk by chunk.

    The ``route`` label is the matched route's template, which the router leaves in
    ``scope["route"]``; requests that matched no route (404s, slash redirects) are ``other``, so a
    client inventing paths cannot grow the label set. The ``model`` label comes from
    ``request.state.model``, set by the handlers.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root_path = str(scope.get("root_path", ""))
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before starting a response

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.in_flight.dec()
            state = scope.get("state")
            model = state.get("model") if isinstance(state, Mapping) else None
            self.metrics.observe_request(
                route=self._route_label(scope, root_path),
                method=str(scope["method"]),
                status=status,
                model=model if isinstance(model, str) else None,
                seconds=time.perf_counter() - started,
            )

    @staticmethod
    def _route_label(scope: Scope, root_path: str) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            return OTHER
        # Inside a mount the route's path is relative to it; the mount prefix is what the mount
        # added to root_path. (A mount path with parameters would bring their values along: the
        # gateway mounts none, and Metrics refuses id-like values and caps the number of routes.)
        prefix = str(scope.get("root_path", ""))[len(root_path) :]
        return prefix if isinstance(route, Mount) else prefix + path


def build_metrics_router(token: str | None = None) -> APIRouter:
    """``GET /metrics``; with ``token`` set, only for ``Authorization: Bearer <token>``."""
    router = APIRouter(tags=["operations"])

    async def metrics_endpoint(request: Request) -> Response:
        if token is not None:
            given = bearer_token(request)
            if given is None or not secrets_equal(given, token):
                raise AuthenticationError(
                    "A valid metrics token is required.", headers={"www-authenticate": "Bearer"}
                )
        metrics: Metrics = request.app.state.metrics
        await metrics.refresh()
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    router.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    return router


router = build_metrics_router()
