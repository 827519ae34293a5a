"""Optional OpenTelemetry tracing: one span per image request, one child span per upstream try.

Off by default. When ``tracing.enabled`` is set, each request gets a span named
``{operation} {model}`` (the GenAI semantic conventions' shape) carrying ``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.usage.*`` and the gateway's own ``gateway.*`` attributes (key id —
never the key —, upstream, cost in micro-units). Each call to an upstream is a child span
``upstream {name}``. Spans go to an OTLP/HTTP collector (``tracing.otlp_endpoint``, else the
standard ``OTEL_EXPORTER_OTLP_*`` variables), batched off the request path.

The provider is owned by the app instance (like its metrics registry), never installed as the
process-global one, so two gateways in one process (tests) never share spans. The request span
travels explicitly: the request path hands it to the router in the call's context
(``app/upstream/call.py``), which parents each try's span on it, and to the settlement, which
records the outcome on it and ends it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field

from app.domain.jobs import TokenUsage

# gen_ai.operation.name for the two image routes. The GenAI conventions list no image operation
# yet; these follow their `snake_case` custom-value rule.
OPERATIONS = {"generations": "image_generation", "edits": "image_edit", "variations": "image_variation"}


class TracingSettings(BaseModel):
    """The ``tracing:`` section of the gateway config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    service_name: str = "image-gateway"
    # OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces; unset: OTEL_EXPORTER_OTLP_*.
    otlp_endpoint: str | None = None
    # Share of root spans kept; child spans follow their parent's decision.
    sample_ratio: float = Field(default=1.0, ge=0, le=1)


class RequestTrace:
    """The span of one image request, from admission to settlement; a no-op when tracing is off."""

    def __init__(self, span: Span | None) -> None:
        self._span = span

    @property
    def span(self) -> Span | None:
        return self._span

    def annotate(self, **attributes: str | int | None) -> None:
        """Set ``gateway.<name>`` attributes (upstream, status, cost_micros, …); ``None`` is skipped."""
        if self._span is None:
            return
        for name, value in attributes.items():
            if value is not None:
                self._span.set_attribute(f"gateway.{name}", value)

    def settled(
        self, *, upstream: str | None, usage: TokenUsage | None, cost_micros: int, status: str
    ) -> None:
        """Record the outcome the ledger recorded: what was used, where, and what it cost."""
        if self._span is None:
            return
        if usage is not None:
            self._span.set_attribute("gen_ai.usage.input_tokens", usage.text_input + usage.image_input)
            self._span.set_attribute("gen_ai.usage.output_tokens", usage.text_output + usage.image_output)
            self._span.set_attribute("gen_ai.usage.text_input_tokens", usage.text_input)
            self._span.set_attribute("gen_ai.usage.image_input_tokens", usage.image_input)
            self._span.set_attribute("gen_ai.usage.text_output_tokens", usage.text_output)
            self._span.set_attribute("gen_ai.usage.image_output_tokens", usage.image_output)
        self.annotate(upstream=upstream, cost_micros=cost_micros, status=status)
        if status not in ("succeeded", "ok"):
            self._span.set_status(Status(StatusCode.ERROR, status))

    def failed(self, *, error_type: str, status_code: int | None = None) -> None:
        if self._span is None:
            return
        self._span.set_attribute("error.type", error_type)
        if status_code is not None:
            self._span.set_attribute("http.response.status_code", status_code)
        self._span.set_status(Status(StatusCode.ERROR, error_type))

    def end(self) -> None:
        """End the span (once; later calls do nothing)."""
        span, self._span = self._span, None
        if span is not None:
            span.end()


class Tracing:
    """The app's tracer; every method is cheap and inert when tracing is disabled."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("app") if provider is not None else None

    @classmethod
    def from_settings(cls, settings: TracingSettings, *, processor: SpanProcessor | None = None) -> Tracing:
        """``processor`` is for tests (a SimpleSpanProcessor over an in-memory exporter)."""
        if not settings.enabled:
            return cls(None)
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        provider.add_span_processor(processor or BatchSpanProcessor(_otlp_exporter(settings)))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start_request(
        self, *, operation: str, model: str, key_id: str, request_id: str | None, mode: str
    ) -> RequestTrace:
        """Open the request's span (the parent of its try spans, ended by its settlement)."""
        if self._tracer is None:
            return INERT
        name = OPERATIONS.get(operation, operation)
        span = self._tracer.start_span(
            f"{name} {model}",
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": name,
                "gen_ai.request.model": model,
                "gateway.key_id": key_id,
                "gateway.mode": mode,
                **({"gateway.request_id": request_id} if request_id else {}),
            },
        )
        return RequestTrace(span)

    @contextmanager
    def upstream_try(
        self, *, parent: RequestTrace, upstream: str, model: str, attempt: int
    ) -> Iterator[TryTrace]:
        """A child span of ``parent`` (a request's span) for one call to one upstream."""
        if self._tracer is None:
            yield TryTrace(None)
            return
        span_ = parent.span
        context = trace.set_span_in_context(span_) if span_ is not None else None
        span = self._tracer.start_span(
            f"upstream {upstream}",
            context=context,
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.request.model": model,
                "gateway.upstream": upstream,
                "gateway.attempt": attempt,
            },
        )
        try:
            yield TryTrace(span)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def shutdown(self) -> None:
        """Flush what is batched and stop the exporter (at app shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()


class TryTrace:
    """One upstream try's span; a no-op when tracing is off."""

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def outcome(self, *, status_code: int | None = None, error_type: str | None = None) -> None:
        if self._span is None:
            return
        if status_code is not None:
            self._span.set_attribute("http.response.status_code", status_code)
        if error_type is not None:
            self._span.set_attribute("error.type", error_type)
            self._span.set_status(Status(StatusCode.ERROR, error_type))


# Tracing off, or no request around the call: every method does nothing.
INERT = RequestTrace(None)


def _otlp_exporter(settings: TracingSettings) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    kwargs: dict[str, Any] = {}
    if settings.otlp_endpoint:
        kwargs["endpoint"] = settings.otlp_endpoint
    return OTLPSpanExporter(**kwargs)
