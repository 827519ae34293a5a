"""Prometheus metrics for one gateway app instance (SPEC §9, ``GET /metrics``).

Each ``Metrics`` owns its own ``CollectorRegistry``, never prometheus_client's global one, so the
many apps a test run builds in one process never share or collide on series.

Every label value is bounded and never secret. Routes are templates (the middleware in
``app/api/metrics.py`` reads them from the matched route), models are catalog names or
``other``/``none``, outcomes and breaker states come from fixed sets, and free-form values (upstream
names, moderation categories) must look like identifiers and are capped in number; anything else
is counted as ``other``. Keys, key ids, prompts and URLs are never passed in.

With several uvicorn worker processes each process has its own numbers and a scrape reaches one of
them; run one worker per scrape target (or a sidecar per process) when exact totals matter.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder

from app.core.errors import UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from app.domain.states import BreakerState

log = logging.getLogger(__name__)

OTHER = "other"
NONE = "none"

# Image requests take seconds to minutes, so the default buckets (which stop at 10 s) would put
# most generations in +Inf.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UPSTREAM_OUTCOMES = frozenset(
    {"success", "error", "timeout", "unavailable", "rejected", "circuit_open", "cancelled"}
)
BREAKER_STATES: tuple[str, ...] = tuple(state.value for state in BreakerState)
TOKEN_KINDS = ("text_input", "image_input", "text_output", "image_output")

ScrapeHook = Callable[[], Awaitable[None] | None]

# Free-form label values must look like short identifiers ("openai-eu", "violence/graphic"), which
# refuses URLs (no ":"), prompts (no spaces) and query strings. Values that look like a secret or an
# id (an "sk-" key, a hex run such as a UUID, a long random run) are refused as well, as a second
# line of defence: call sites pass names from the configuration and the code, never such values.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")
_ROUTE = re.compile(r"/[A-Za-z0-9._~/{}:-]{0,127}")
_SECRET_LIKE = re.compile(r"(?:^|[^A-Za-z0-9])sk-|(?=[0-9a-f]*[0-9])[0-9a-f]{8,}|[A-Za-z0-9_]{24,}", re.I)


class BoundedLabel:
    """Keeps the first ``limit`` distinct well-formed values of one label; the rest read ``other``.

    Hand-rolled because prometheus_client has no cardinality guard, and an unbounded label (a model
    name typed by a client, a category reported by an upstream) would grow memory and every scrape.
    """

    def __init__(self, pattern: re.Pattern[str], limit: int) -> None:
        self._pattern = pattern
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return NONE
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit or not self._pattern.fullmatch(value) or _SECRET_LIKE.search(value):
            return OTHER
        self._seen.add(value)
        return value


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label for one upstream try that ended with ``error`` (None: it succeeded)."""
    if error is None:
        return "success"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamUnavailable):
        return "unavailable"
    if isinstance(error, UpstreamRejected):
        return "rejected"
    if not isinstance(error, Exception):  # CancelledError, KeyboardInterrupt: the try was abandoned
        return "cancelled"
    return "error"


class Metrics:
    """The gateway's counters, histograms and gauges, and their exposition."""

    def __init__(self, models: Iterable[str] = (), *, process: bool = True) -> None:
        """``models``: the catalog names allowed as ``model`` label values (see ``set_models``)."""
        self.registry = CollectorRegistry()
        self._models: frozenset[str] = frozenset(models)
        self._routes = BoundedLabel(_ROUTE, limit=200)
        self._upstreams = BoundedLabel(_IDENTIFIER, limit=100)
        self._categories = BoundedLabel(_IDENTIFIER, limit=100)
        self._hooks: list[ScrapeHook] = []
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "HTTP requests answered.", ["route", "method", "status", "model"], registry=r
        )
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time from request start to the last response byte (whole stream for SSE).",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "HTTP requests being answered.", registry=r)
        self.upstream_tries = Counter(
            "gateway_upstream_tries",
            'Calls to upstreams, by outcome; failures are outcome!="success".',
            ["upstream", "model", "outcome"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "gateway_upstream_try_duration_seconds",
            "Duration of one upstream call (to the first event, for streams).",
            ["upstream", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "gateway_upstream_breaker_state",
            "1 for the upstream circuit breaker's current state, 0 for the others.",
            ["upstream", "state"],
            registry=r,
        )
        self.tokens = Counter("gateway_tokens", "Tokens billed, by kind.", ["model", "kind"], registry=r)
        self.cost = Counter("gateway_cost_micros", "Cost billed, in micro-units.", ["model"], registry=r)
        self.images = Counter("gateway_images", "Images returned to clients.", ["model"], registry=r)
        self.overruns = Counter(
            "gateway_overruns",
            "Settlements that charged more than their reservation held.",
            ["model"],
            registry=r,
        )
        self.overrun_cost = Counter(
            "gateway_overrun_micros",
            "Micro-units charged beyond what settlements' reservations held.",
            ["model"],
            registry=r,
        )
        self.interrupted_cost = Counter(
            "gateway_interrupted_operator_cost_micros",
            "Possible upstream cost of tasks cut off by their worker's death (never charged; the "
            "reservations of those calls, an upper bound).",
            ["model"],
            registry=r,
        )
        self.moderation_blocks = Counter(
            "gateway_moderation_blocks",
            "Requests blocked by moderation, once per category.",
            ["category", "stage"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "gateway_queue_depth", "Background tasks not finished yet (queued or running).", registry=r
        )
        self.upstream_waiting = Gauge(
            "gateway_upstream_waiting",
            "Calls waiting for a slot of an upstream at its max_concurrency, by source (request|task).",
            ["upstream", "source"],
            registry=r,
        )
        self.tasks_running = Gauge(
            "gateway_tasks_running", "Background tasks this process is running now.", registry=r
        )
        self.request_log_dropped = Counter(
            "gateway_request_log_dropped",
            "Request log entries dropped because the log's queue was full (the requests were not).",
            registry=r,
        )
        if process:
            ProcessCollector(registry=r)

    # -- label sanitizing ----------------------------------------------------------------------

    def set_models(self, models: Iterable[str]) -> None:
        """Replace the allowed model names (the catalog is read in the lifespan, after the app is built)."""
        self._models = frozenset(models)

    def model_label(self, model: str | None) -> str:
        """A catalog name as is, ``none`` when there is no model, ``other`` for anything else."""
        if not model:
            return NONE
        return model if model in self._models else OTHER

    # -- recording -------------------------------------------------------------------------------

    def observe_request(
        self, *, route: str, method: str, status: int, model: str | None, seconds: float
    ) -> None:
        """One answered HTTP request; ``route`` is the route template, never the raw path."""
        route_label = self._routes(route or OTHER)
        model_label = self.model_label(model)
        method_label = method if method in METHODS else OTHER
        self.requests.labels(route_label, method_label, str(status), model_label).inc()
        self.request_seconds.labels(route_label, model_label).observe(max(seconds, 0.0))

    def observe_upstream_try(self, *, upstream: str, model: str | None, outcome: str, seconds: float) -> None:
        """One call to one upstream; ``outcome`` is one of ``UPSTREAM_OUTCOMES`` (see ``outcome_of``)."""
        upstream_label = self._upstreams(upstream)
        model_label = self.model_label(model)
        outcome_label = outcome if outcome in UPSTREAM_OUTCOMES else OTHER
        self.upstream_tries.labels(upstream_label, model_label, outcome_label).inc()
        self.upstream_seconds.labels(upstream_label, model_label).observe(max(seconds, 0.0))

    @contextmanager
    def upstream_try(self, *, upstream: str, model: str | None) -> Iterator[None]:
        """Times the enclosed upstream call and records its outcome from the exception, if any."""
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.observe_upstream_try(
                upstream=upstream,
                model=model,
                outcome=outcome_of(error),
                seconds=time.perf_counter() - started,
            )

    def set_breaker_state(self, *, upstream: str, state: str) -> None:
        """Sets ``state`` to 1 and every other breaker state to 0 for ``upstream``."""
        if state not in BREAKER_STATES:
            log.warning("unknown breaker state not exported", extra={"fields": {"state": state}})
            return
        upstream_label = self._upstreams(upstream)
        for candidate in BREAKER_STATES:
            self.breaker_state.labels(upstream_label, candidate).set(1 if candidate == state else 0)

    def observe_usage(
        self,
        *,
        model: str | None,
        text_input: int = 0,
        image_input: int = 0,
        text_output: int = 0,
        image_output: int = 0,
        cost_micros: int = 0,
        images: int = 0,
    ) -> None:
        """What one settled request billed. Negative amounts (refunds) are not counted here."""
        model_label = self.model_label(model)
        amounts = (text_input, image_input, text_output, image_output)
        for kind, amount in zip(TOKEN_KINDS, amounts, strict=True):
            self.tokens.labels(model_label, kind).inc(max(amount, 0))
        self.cost.labels(model_label).inc(max(cost_micros, 0))
        self.images.labels(model_label).inc(max(images, 0))

    def observe_overrun(self, *, model: str | None, micros: int) -> None:
        """A settlement that charged ``micros`` more than its hold (the upstream billed more)."""
        model_label = self.model_label(model)
        self.overruns.labels(model_label).inc()
        self.overrun_cost.labels(model_label).inc(max(micros, 0))

    def observe_interrupted(self, *, model: str | None, micros: int) -> None:
        """A task interrupted after dispatch: what its upstream call may have cost the operator."""
        self.interrupted_cost.labels(self.model_label(model)).inc(max(micros, 0))

    def observe_moderation_block(self, *, categories: Iterable[str] | str, stage: str) -> None:
        """One blocked request, counted once under each category it was blocked for."""
        names = [categories] if isinstance(categories, str) else list(categories)
        stage_label = stage if stage in ("input", "output") else OTHER
        for category in names or ["unspecified"]:
            self.moderation_blocks.labels(self._categories(category), stage_label).inc()

    def set_queue_depth(self, depth: int) -> None:
        """Tasks waiting in the queue; set by whoever polls it (a scrape hook or a background task)."""
        self.queue_depth.set(max(depth, 0))

    def set_upstream_waiting(self, *, upstream: str, source: str, count: int) -> None:
        self.upstream_waiting.labels(self._upstreams(upstream), source).set(max(count, 0))

    def set_tasks_running(self, count: int) -> None:
        self.tasks_running.set(max(count, 0))

    # -- exposition ------------------------------------------------------------------------------

    def on_scrape(self, hook: ScrapeHook) -> None:
        """Run ``hook`` (sync or async) before each scrape, to refresh gauges read from elsewhere.

        Breakers move from open to half-open by time alone, and the queue lives in the database, so
        reading them when scraped is simpler and fresher than pushing every change.
        """
        self._hooks.append(hook)

    async def refresh(self) -> None:
        """Run the scrape hooks; a failing hook is logged and skipped so /metrics still answers."""
        for hook in self._hooks:
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("metrics scrape hook failed")

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when ``accept`` asks for it) and its type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
