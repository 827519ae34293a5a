"""Choose upstreams for a job and fail over between them.

Candidates are ordered by priority tier (lower number first), weighted-random inside a tier.
An attempt that fails in a way another upstream might not (connect error, timeout, 429, 5xx,
an unusable answer, or an upstream refusing the gateway's own credentials) moves on to the next
candidate; any other upstream 4xx is the client's mistake and is returned at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import TypeVar

from app.errors import GatewayError, UpstreamError, UpstreamRejected, UpstreamUnavailable
from app.images.jobs import ImageJob, ImageResult, ProviderEvent, completed_events
from app.upstream.registry import ProviderRegistry, Route

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


def is_retryable(error: GatewayError) -> bool:
    if isinstance(error, UpstreamRejected):
        return error.retryable
    return isinstance(error, UpstreamError)


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
    def __init__(self, registry: ProviderRegistry, rng: random.Random | None = None) -> None:
        self._registry = registry
        self._rng = rng or random.Random()

    async def generate(self, job: ImageJob, tried: list[str] | None = None) -> tuple[ImageResult, str]:
        """The first successful result and the upstream that produced it."""

        async def attempt(route: Route) -> ImageResult:
            return await _whole(route, job)

        return await self._failover(job, attempt, tried)

    async def open_stream(self, job: ImageJob, tried: list[str] | None = None) -> OpenStream:
        """Fail over until some upstream delivers a first event; then the stream is committed.

        Upstreams marked as non-streaming answer with ``generate`` and the result is replayed as
        completed events, so the client always gets the stream contract.
        """

        async def attempt(route: Route) -> tuple[ProviderEvent, AsyncIterator[ProviderEvent]]:
            if not route.streams:
                result = await _whole(route, job)
                events = completed_events(job, result)
                if not events:
                    raise UpstreamError("The upstream service returned no image.")
                return events[0], _replay(events[1:])
            events_iter = route.provider.stream(job, upstream_model=route.upstream_model)
            try:
                first = await anext(events_iter)
            except StopAsyncIteration:
                raise UpstreamError("The upstream service ended the stream without an event.") from None
            except BaseException:
                await _close(events_iter)
                raise
            return first, events_iter

        (first, rest), upstream = await self._failover(job, attempt, tried)
        return OpenStream(upstream=upstream, first=first, rest=rest)

    async def _failover(
        self, job: ImageJob, attempt: Callable[[Route], Awaitable[T]], tried: list[str] | None
    ) -> tuple[T, str]:
        """``tried`` collects each upstream as it is called, so a caller that is cancelled midway
        still knows which upstream its request reached."""
        routes = order_routes(self._registry.routes(job.model), self._rng)
        if not routes:
            raise UpstreamUnavailable(f"No upstream serves the model '{job.model}'.", status=503)
        last: GatewayError | None = None
        for number, route in enumerate(routes, start=1):
            if tried is not None:
                tried.append(route.name)
            try:
                return await attempt(route), route.name
            except GatewayError as exc:
                exc.upstream = route.name
                error = exc
                if isinstance(exc, UpstreamRejected) and exc.status_code in (401, 403):
                    error = _credential_failure(exc)
                log.warning(
                    "upstream attempt failed",
                    extra={
                        "fields": {
                            "upstream": route.name,
                            "attempt": number,
                            "status": error.status_code,
                            "code": error.code,
                        }
                    },
                )
                last = error
                if not is_retryable(error):
                    raise error from None
        assert last is not None
        raise last


async def _whole(route: Route, job: ImageJob) -> ImageResult:
    if job.endpoint == "edits":
        return await route.provider.edit(job, upstream_model=route.upstream_model)
    return await route.provider.generate(job, upstream_model=route.upstream_model)


async def _close(iterator: AsyncIterator[ProviderEvent]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
