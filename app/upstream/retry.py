"""When an upstream attempt is tried again, how long to wait first, and when to move on.

An attempt is worth repeating only if the failure says nothing about the request itself:

    UpstreamUnavailable (connect, read, protocol)   retried    the network or the host hiccuped
    UpstreamTimeout                                 retried    a slow answer is not a wrong answer
    UpstreamError (undecodable or unusable answer)  retried    another try may be served properly
    UpstreamRejected 408, 409, 429, >= 500          retried    timeout, lock, rate limit, server fault
    UpstreamRejected other 4xx                      not        the client's mistake; relayed as it is
    any other GatewayError                          not        raised before any upstream was asked

The classes and the status list are openai-python's ``_base_client._should_retry``; the wait is its
``_calculate_retry_timeout`` (0.5 s doubling up to 8 s, minus up to 25 % jitter, from
``_constants.py``), and a server's ``Retry-After`` (seconds or HTTP-date) is read the way
``_parse_retry_after_header`` reads it. Unlike the SDK, the gateway has other upstreams to go to, so
a ``Retry-After`` longer than ``max_retry_after_s`` is not waited for: the router fails over at once,
and ``decide`` says so. ``retry-after-ms`` arrives here already folded into ``UpstreamRejected.retry_after``
by ``app.upstream.errors`` (rounded up to whole seconds, so it is honoured, never undercut).

Hand-written rather than tenacity or stamina: those retry one callable, whereas this loop also fails
over between upstreams and takes its wait from the error it caught; the policy is ~60 lines of pure
functions, which is what ARCHITECTURE convention 9 asks for.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from app.core.errors import GatewayError, UpstreamError, UpstreamRejected

# 408 request timeout, 409 lock contention, 429 rate limit: openai-python's list.
_RETRYABLE_4XX = frozenset({408, 409, 429})
# openai-python caps the exponent the same way so that pow() never overflows.
_MAX_EXPONENT = 1000


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds, a float, or an HTTP-date).

    ``now`` is the Unix time an HTTP-date is measured from (``time.time()`` if not given). A date in
    the past gives 0.0; a negative, NaN or unparsable value gives None. An absurdly large number
    gives ``inf``, which every cap refuses, rather than None, which would mean "no advice".
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return _parse_http_date(text, now)
    if math.isnan(seconds) or seconds < 0:
        return None
    return seconds


def _parse_http_date(text: str, now: float | None) -> float | None:
    try:
        parsed = email.utils.parsedate_tz(text)
        if parsed is None:
            return None
        at = email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return max(0.0, at - (time.time() if now is None else now))


def _retry_after(error: GatewayError | None, now: float | None) -> float | None:
    if isinstance(error, UpstreamRejected):
        return parse_retry_after(error.retry_after, now)
    return None


class Deadline:
    """The time left for a whole request, across every attempt and wait, on a monotonic clock."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ends_at = clock() + budget_s

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._ends_at - self._clock())

    @property
    def expired(self) -> bool:
        """Whether the budget is spent."""
        return self.remaining() <= 0.0


class RetryAction(StrEnum):
    RETRY = "retry"  # the same upstream again, after ``delay_s``
    FAIL_OVER = "fail_over"  # the next candidate, at once (a different host owes us no back-off)
    GIVE_UP = "give_up"  # raise this error to the client


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What the router does after a failed attempt."""

    action: RetryAction
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds and timings for retrying one upstream and failing over to the next."""

    max_retries_per_upstream: int = 2  # extra tries on the same upstream before failing over
    max_attempts_total: int = 6
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0
    max_retry_after_s: float = 60.0  # a retry-after above this is not waited for: fail over instead
    deadline_s: float = 600.0  # total budget across all attempts

    def should_retry(self, error: GatewayError) -> bool:
        """Whether another attempt, here or on another upstream, might succeed (table in the module doc)."""
        if isinstance(error, UpstreamRejected):
            return error.status_code in _RETRYABLE_4XX or error.status_code >= 500
        # Timeouts, connect failures and invalid answers are all UpstreamError subclasses or itself.
        return isinstance(error, UpstreamError)

    def delay(self, attempt: int, error: GatewayError | None, rng: random.Random) -> float:
        """Seconds to wait before trying the same upstream again after its ``attempt``-th failure (1-based).

        A server's ``Retry-After`` in (0, ``max_retry_after_s``] is used as given; otherwise the wait
        is ``initial_delay_s * 2 ** (attempt - 1)``, capped at ``max_delay_s`` and then shortened by
        up to 25 % so that clients failing together do not come back together.
        """
        advised = _retry_after(error, None)
        if advised is not None and 0.0 < advised <= self.max_retry_after_s:
            return advised
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        backoff = min(self.initial_delay_s * 2.0**exponent, self.max_delay_s)
        return max(0.0, backoff * (1.0 - 0.25 * rng.random()))

    def decide(
        self,
        error: GatewayError,
        *,
        tries_here: int,
        attempts_total: int,
        deadline: Deadline,
        rng: random.Random,
    ) -> RetryDecision:
        """Retry here, fail over, or give up, after ``tries_here`` failed tries on this upstream and
        ``attempts_total`` on all of them (both counting the one that just failed).

        The router gives up by itself when it runs out of candidates after a FAIL_OVER.
        """
        if not self.should_retry(error) or attempts_total >= self.max_attempts_total or deadline.expired:
            return RetryDecision(RetryAction.GIVE_UP)
        advised = _retry_after(error, None)
        too_long = advised is not None and advised > self.max_retry_after_s
        if tries_here <= self.max_retries_per_upstream and not too_long:
            wait = self.delay(tries_here, error, rng)
            # A wait that would outlast the budget is better spent on another upstream.
            if wait < deadline.remaining():
                return RetryDecision(RetryAction.RETRY, wait)
        return RetryDecision(RetryAction.FAIL_OVER)

    def deadline(self, clock: Callable[[], float] = time.monotonic) -> Deadline:
        """A fresh ``Deadline`` of ``deadline_s`` for one request."""
        return Deadline(self.deadline_s, clock)
