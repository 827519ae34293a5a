"""The app factory: routers, middleware and error handlers. No I/O and no globals at import."""

from __future__ import annotations

from fastapi import FastAPI  # noqa: TID251 - the app factory
from starlette.middleware.cors import CORSMiddleware  # noqa: TID251 - the app factory

from app import __version__
from app.api import api_routers
from app.api.console import install_console
from app.api.errors import install_error_handlers
from app.api.metrics import MetricsMiddleware, build_metrics_router
from app.api.middleware import (
    AdminGuardMiddleware,
    BodyGuardMiddleware,
    ContainErrorsMiddleware,
    InputGuardMiddleware,
    RequestContextMiddleware,
)
from app.api.openapi import install_openapi
from app.runtime.lifespan import make_lifespan
from app.runtime.settings import Settings
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing

EXPOSED_HEADERS = [
    "x-request-id",
    "x-gateway-cost",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
    "location",
    # A model's lifecycle (RFC 8594, RFC 9745) and what served the request.
    "sunset",
    "deprecation",
    "x-gateway-model",
    "x-gateway-upstream",
    *(
        f"x-ratelimit-{what}-{kind}"
        for what in ("limit", "remaining", "reset")
        for kind in ("requests", "images")
    ),
]


def create_app(settings: Settings, *, tracing: Tracing | None = None) -> FastAPI:
    """``tracing`` is for tests (a tracer on an in-memory exporter); else built from settings."""
    app = FastAPI(
        title="Image gateway",
        version=__version__,
        lifespan=make_lifespan(settings),
        docs_url=None,
        redoc_url=None,
        # FastAPI's own OpenTelemetry spans, metrics and logs stay off: the gateway traces with its
        # own provider (app/telemetry/tracing.py), which keeps secrets and prompts out of spans;
        # FastAPI's would add a second, unscrubbed set whenever a global provider exists (for
        # instance under `opentelemetry-instrument`), and looks the global providers up on every
        # request (~1% of a small answer's CPU in the profile).
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    metrics = Metrics()
    app.state.metrics = metrics
    app.state.tracing = tracing or Tracing.from_settings(settings.tracing)
    for router in api_routers():
        app.include_router(router)
    if settings.metrics.enabled:
        token = settings.metrics.token
        app.include_router(build_metrics_router(token.get_secret_value() if token else None))
    if settings.console.enabled:
        install_console(app)
    install_error_handlers(app)
    install_openapi(app)
    # Pure ASGI middleware (never BaseHTTPMiddleware), so streamed responses pass through untouched.
    # Innermost: an unexpected error becomes a complete 500 and the connection stays usable.
    app.add_middleware(ContainErrorsMiddleware)
    app.add_middleware(
        BodyGuardMiddleware,
        max_bytes=settings.server.max_json_body_bytes,
        read_timeout_s=settings.server.body_read_timeout_s,
        deadline_s=settings.server.body_deadline_s,
    )
    if settings.server.cors_origins:
        # Closed by default: browsers may call the API only from origins the operator lists.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            # The headers a preflight asks for are reflected: the official SDKs send a growing
            # family (x-stainless-*, openai-project, openai-beta, …) and a listed set goes stale.
            allow_headers=["*"],
            # Everything a client acts on: its charge, its limits and when to retry.
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    app.add_middleware(AdminGuardMiddleware)
    # Before routing and the admin guard: what no store can keep is a 400 on every database.
    app.add_middleware(InputGuardMiddleware)
    app.add_middleware(RequestContextMiddleware, upstream_header=settings.server.upstream_header)
    # Outermost, so refusals made by the middleware above (413) are counted too.
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` worker processes: settings from GATEWAY_CONFIG and env."""
    from app.core.logging import configure_logging
    from app.runtime.settings import load_settings

    settings = load_settings()
    configure_logging(level=settings.logging.level, json_format=settings.logging.json_format)
    return create_app(settings)
