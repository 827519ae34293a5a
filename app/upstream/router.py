"""Choose upstreams for a job and fail over between them.

Candidates are ordered by priority tier (lower number first), weighted-random inside a tier;
upstreams whose circuit breaker is open are skipped. An attempt that fails in a way another
upstream might not (connect error, timeout, 408/409/429, 5xx, an unusable answer, or an upstream
refusing the gateway's own credentials) moves on to the next candidate at once; on the last
candidate the retry policy may try again after a backoff. Any other upstream 4xx is the
client's mistake and is returned at once. Each upstream's ``max_concurrency`` bounds its calls
in flight: from this process by default, from every node together with the shared slots
(``shared_slots.py``) that the lifespan passes in when ``redis.url`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import TypeVar

from app.core.errors import GatewayError, UpstreamBusy, UpstreamError, UpstreamRejected, UpstreamUnavailable
from app.domain.jobs import ImageJob, ImageResult, ProviderEvent, completed_events
from app.telemetry.metrics import Metrics, outcome_of
from app.telemetry.tracing import Tracing
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.health import BreakerConfig, BreakerSnapshot, CircuitBreaker
from app.upstream.registry import ProviderRegistry, Route
from app.upstream.retry import RetryAction, RetryPolicy
from app.upstream.slots import SlotPolicy, Slots, UpstreamSlots

log = logging.getLogger(__name__)


def order_routes(routes: Sequence[Route], rng: random.Random) -> list[Route]:
    """Priority tiers in order; inside a tier, a weighted random permutation."""
    ordered: list[Route] = []
    for _, tier in groupby(sorted(routes, key=lambda r: r.priority), key=lambda r: r.priority):
        pool = list(tier)
        while pool:
            pick = rng.choices(range(len(pool)), weights=[r.weight for r in pool])[0]
            ordered.append(pool.pop(pick))
    return ordered


def _credential_failure(error: UpstreamRejected) -> UpstreamError:
    # The upstream refused *our* key: relaying its 401 would tell the client its own key is bad.
    failure = UpstreamError("The upstream service refused the gateway's credentials.")
    failure.upstream = error.upstream
    return failure


T = TypeVar("T")


@dataclass(slots=True)
class OpenStream:
    """A stream whose first event has arrived: from here on, nothing is retried."""

    upstream: str
    first: ProviderEvent
    rest: AsyncIterator[ProviderEvent]

    async def aclose(self) -> None:
        close = getattr(self.rest, "aclose", None)
        if close is not None:
            await close()


async def _replay(events: list[ProviderEvent]) -> AsyncIterator[ProviderEvent]:
    for event in events:
        yield event


class Router:
    def __init__(
        self,
        registry: ProviderRegistry,
        rng: random.Random | None = None,
        *,
        policy: RetryPolicy | None = None,
        breaker: BreakerConfig | None = None,
        metrics: Metrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        tracing: Tracing | None = None,
        slots: Callable[[str, SlotPolicy], Slots] | None = None,
    ) -> None:
        self._tracing = tracing or Tracing(None)
        self._registry = registry
        self._rng = rng or random.Random()
        self._policy = policy or RetryPolicy()
        self._metrics = metrics
        self._sleep = sleep
        config = breaker or BreakerConfig()
        self.breakers = {name: CircuitBreaker(name, config) for name in registry.provider_names()}
        make_slots = slots or UpstreamSlots
        self.slots = {
            name: make_slots(name, registry.slot_policy(name)) for name in registry.provider_names()
        }

    async def generate(
        self, job: ImageJob, tried: list[str] | None = None, *, call: UpstreamCall = DIRECT
    ) -> tuple[ImageResult, str]:
        """The first successful result and the upstream that produced it."""

        async def attempt(route: Route) -> ImageResult:
            return await _whole(route, job, call)

        return await self._failover(job, call, attempt, tried)

    async def open_stream(
        self, job: ImageJob, tried: list[str] | None = None, *, call: UpstreamCall = DIRECT
    ) -> OpenStream:
        """Fail over until some upstream delivers a first event; then the stream is committed.

        Upstreams marked as non-streaming answer with ``generate`` and the result is replayed as
        completed events, so the client always gets the stream contract.
        """

        async def attempt(route: Route) -> tuple[ProviderEvent, AsyncIterator[ProviderEvent]]:
            if not route.streams:
                result = await _whole(route, job, call)
                events = completed_events(job, result)
                if not events:
                    raise UpstreamError("The upstream service returned no image.")
                return events[0], _replay(events[1:])
            events_iter = route.provider.stream(job, upstream_model=route.upstream_model, call=call)
            try:
                first = await anext(events_iter)
            except StopAsyncIteration:
                raise UpstreamError("The upstream service ended the stream without an event.") from None
            except BaseException:
                await _close(events_iter)
                raise
            return first, events_iter

        (first, rest), upstream = await self._failover(job, call, attempt, tried)
        return OpenStream(upstream=upstream, first=first, rest=rest)

    async def _failover(
        self,
        job: ImageJob,
        call: UpstreamCall,
        attempt: Callable[[Route], Awaitable[T]],
        tried: list[str] | None,
    ) -> tuple[T, str]:
        """Try candidates in order. A retryable failure moves to the next candidate at once; the
        candidates the policy would retry get another pass after a backoff (honouring
        ``retry-after``), within the policy's bounds. Open circuit breakers are skipped. ``tried``
        collects each upstream as it is called, so a caller that is cancelled midway still knows
        which upstream its request reached."""
        # A retired model never goes to an upstream that follows OpenAI's retirements.
        routes = order_routes(self._registry.routes(job.model, retired=job.retired), self._rng)
        if call.resume is not None:
            # A task resuming a provider job (FLUX) polls it where it runs: any other upstream
            # would submit it a second time.
            routes = [r for r in routes if r.name == call.resume.get("upstream")]
        if not routes:
            raise UpstreamUnavailable(f"No upstream serves the model '{job.model}'.", status=503)
        deadline = self._policy.deadline()
        last: GatewayError | None = None
        attempts = 0
        tries: dict[str, int] = {}
        # Passes over the candidates: each pass tries every one still worth a retry, in order; the
        # next pass waits out the longest back-off they asked for (their `retry-after` included).
        # So a failure on whichever candidate comes last does not leave the others untried: an
        # upstream that failed once early in the pass gets its retry too (SPEC §2).
        pending, wait_s = routes, 0.0
        while pending:
            if wait_s:
                await self._sleep(wait_s)
            again: list[Route] = []
            wait_s = 0.0
            for route in pending:
                # Asked lazily, right before a call: in half-open, `allow` hands out the probe slot.
                if not self.breakers[route.name].allow():
                    self._skip(route, job)
                    continue
                attempts += 1
                tries[route.name] = tries.get(route.name, 0) + 1
                if tried is not None:
                    tried.append(route.name)
                try:
                    return await self._call(route, job, call, attempt, number=attempts), route.name
                except UpstreamBusy as exc:
                    # Our own cap, not a failure of the upstream: the next candidate, if any.
                    exc.upstream = None
                    last = exc
                    continue
                except GatewayError as exc:
                    error = self._classify(exc, route)
                    last = error
                    decision = self._policy.decide(
                        error,
                        tries_here=tries[route.name],
                        attempts_total=attempts,
                        deadline=deadline,
                        rng=self._rng,
                    )
                    _log_attempt(route, attempts, error, decision.action)
                    if decision.action is RetryAction.GIVE_UP:
                        raise error from None
                    if decision.action is RetryAction.RETRY and not _credentials(exc):
                        again.append(route)
                        wait_s = max(wait_s, decision.delay_s)
            pending = again
        if last is None:
            raise UpstreamUnavailable(
                "Every upstream for this model is cooling down after failures.", status=503
            )
        raise last

    def _skip(self, route: Route, job: ImageJob) -> None:
        """Count a candidate skipped because its breaker is open."""
        if self._metrics is not None:
            self._metrics.observe_upstream_try(
                upstream=route.name, model=job.model, outcome="circuit_open", seconds=0.0
            )

    async def _call(
        self,
        route: Route,
        job: ImageJob,
        call: UpstreamCall,
        attempt: Callable[[Route], Awaitable[T]],
        *,
        number: int = 1,
    ) -> T:
        with self._tracing.upstream_try(
            parent=call.trace, upstream=route.name, model=job.model, attempt=number
        ) as traced:
            try:
                async with self.slots[route.name].hold(call.source):
                    return await self._call_now(route, job, attempt)
            except GatewayError as exc:
                traced.outcome(status_code=exc.status_code, error_type=type(exc).__name__)
                raise

    async def _call_now(self, route: Route, job: ImageJob, attempt: Callable[[Route], Awaitable[T]]) -> T:
        breaker = self.breakers[route.name]
        started = time.monotonic()
        error: BaseException | None = None
        breaker.started()
        try:
            return await attempt(route)
        except BaseException as exc:
            error = exc
            raise
        finally:
            breaker.finished()
            elapsed = time.monotonic() - started
            if error is None:
                breaker.record_success(elapsed)
            elif isinstance(error, GatewayError):
                # A client mistake (a 4xx other than 429) says the upstream works fine.
                if self._policy.should_retry(error) or _credentials(error):
                    breaker.record_failure()
                else:
                    breaker.record_success(elapsed)
            if self._metrics is not None:
                self._metrics.observe_upstream_try(
                    upstream=route.name, model=job.model, outcome=outcome_of(error), seconds=elapsed
                )

    @staticmethod
    def _classify(exc: GatewayError, route: Route) -> GatewayError:
        exc.upstream = route.name
        if _credentials(exc):
            assert isinstance(exc, UpstreamRejected)
            return _credential_failure(exc)
        return exc

    def snapshots(self) -> list[BreakerSnapshot]:
        return [breaker.snapshot() for breaker in self.breakers.values()]

    def waiting(self) -> dict[str, dict[str, int]]:
        """Calls waiting for a slot, per upstream and per source (``request`` or ``task``)."""
        return {name: dict(slots.waiting) for name, slots in self.slots.items()}


def _credentials(error: BaseException) -> bool:
    return isinstance(error, UpstreamRejected) and error.status_code in (401, 403)


def _log_attempt(route: Route, attempt: int, error: GatewayError, action: RetryAction) -> None:
    log.warning(
        "upstream attempt failed",
        extra={
            "fields": {
                "upstream": route.name,
                "attempt": attempt,
                "status": error.status_code,
                "code": error.code,
                "next": action.value,
            }
        },
    )


async def _whole(route: Route, job: ImageJob, call: UpstreamCall) -> ImageResult:
    if job.endpoint != "generations":  # edits and variations: multipart with the spooled files
        return await route.provider.edit(job, upstream_model=route.upstream_model, call=call)
    return await route.provider.generate(job, upstream_model=route.upstream_model, call=call)


async def _close(iterator: AsyncIterator[ProviderEvent]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
