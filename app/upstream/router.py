"""Choose upstreams for a job and fail over between them.

Candidates are ordered by priority tier (lower number first), weighted-random inside a tier.
An attempt that fails in a way another upstream might not (connect error, timeout, 429, 5xx,
an unusable answer, or an upstream refusing the gateway's own credentials) moves on to the next
candidate; any other upstream 4xx is the client's mistake and is returned at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from itertools import groupby

from app.errors import GatewayError, UpstreamError, UpstreamRejected, UpstreamUnavailable
from app.images.jobs import ImageJob, ImageResult
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


class Router:
    def __init__(self, registry: ProviderRegistry, rng: random.Random | None = None) -> None:
        self._registry = registry
        self._rng = rng or random.Random()

    async def generate(self, job: ImageJob) -> tuple[ImageResult, str]:
        """The first successful result and the upstream that produced it."""
        routes = order_routes(self._registry.routes(job.model), self._rng)
        if not routes:
            raise UpstreamUnavailable(f"No upstream serves the model '{job.model}'.", status=503)
        last: GatewayError | None = None
        for attempt, route in enumerate(routes, start=1):
            try:
                return await route.provider.generate(job, upstream_model=route.upstream_model), route.name
            except GatewayError as exc:
                exc.upstream = route.name
                if isinstance(exc, UpstreamRejected) and exc.status_code in (401, 403):
                    exc = _credential_failure(exc)
                log.warning(
                    "upstream attempt failed",
                    extra={
                        "fields": {
                            "upstream": route.name,
                            "attempt": attempt,
                            "status": exc.status_code,
                            "code": exc.code,
                        }
                    },
                )
                last = exc
                if not is_retryable(exc):
                    raise exc from None
        assert last is not None
        raise last
