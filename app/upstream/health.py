"""A circuit breaker per upstream: stop sending work to one that keeps failing, then probe it back.

    CLOSED ──(failure_threshold consecutive failures, or error rate ≥ threshold over window_s
              with at least min_requests outcomes)──▶ OPEN
    OPEN ──(open_s elapsed; noticed lazily on the next look)──▶ HALF_OPEN
    HALF_OPEN ──(a probe succeeds)──▶ CLOSED, counters reset
    HALF_OPEN ──(a probe fails)──▶ OPEN, cool-down restarted

The two opening rules are resilience4j's (``failureRateThreshold`` counts "equal or greater",
``minimumNumberOfCalls`` keeps one early failure from reading as 100 %), plus a consecutive-failure
rule so that a dead upstream opens quickly even under little traffic.

Hand-written rather than pybreaker, circuitbreaker or purgatory: those wrap a call and count only
consecutive failures, read the wall clock (so tests would have to sleep), and report neither error
rate, latency nor in-flight calls, which ``GET /admin/upstreams`` shows. The router decides what
counts as a failure (an upstream's fault, not a client's 400), so recording stays outside any wrapper.

Across nodes (``redis.url`` set): the opening and closing of a breaker are shared through Redis
by ``shared_breakers.py``, which listens to ``on_change`` and calls ``open_elsewhere`` /
``close_elsewhere``; the counts that decide to open (consecutive failures, the error-rate window)
stay each node's own.

No lock: the gateway drives a breaker from one asyncio event loop, and no method awaits, so each
call runs to completion without interleaving. Sharing one across threads would need a lock.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.domain.states import BreakerState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how long it stays open."""

    failure_threshold: int = 5  # consecutive failures that open the breaker
    error_rate_threshold: float = 0.5  # failures / outcomes in the window that open it...
    window_s: float = 60.0
    min_requests: int = 20  # ...once the window holds at least this many outcomes
    open_s: float = 30.0  # cool-down before a half-open probe
    half_open_max_probes: int = 1


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """One breaker's state and recent numbers, for ``GET /admin/upstreams``."""

    name: str
    state: BreakerState
    consecutive_failures: int
    error_rate: float | None  # None when the window holds no outcome
    requests_in_window: int
    in_flight: int
    latency_p50_ms: float | None  # successful calls in the window only
    latency_avg_ms: float | None
    opened_at: float | None  # breaker clock (monotonic) reading when it last opened; None if closed
    retry_in_s: float | None  # seconds until the half-open probe, while open


@dataclass(frozen=True, slots=True)
class BreakerChange:
    """A transition this node made (not one it was told of): what other nodes must hear."""

    name: str
    state: BreakerState  # OPEN or CLOSED
    open_s: float
    consecutive_failures: int
    reason: str


@dataclass(frozen=True, slots=True)
class _Outcome:
    at: float
    ok: bool
    latency_s: float | None


class CircuitBreaker:
    """Closed/open/half-open breaker for one upstream, driven by ``allow`` and ``record_*``."""

    def __init__(self, name: str, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        # Every outcome of the last window_s: exact, and small at image-generation request rates
        # (even 100 req/s is 6,000 entries); time buckets would trade accuracy for memory not needed.
        self._outcomes: deque[_Outcome] = deque()
        self._opened_at: float | None = None
        self._probes = 0
        self._in_flight = 0
        # Told of each transition this breaker makes itself (shared_breakers.py publishes them).
        self.on_change: Callable[[BreakerChange], None] | None = None

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose cool-down is over reads as half-open."""
        if (
            self._state is BreakerState.OPEN
            and self._opened_at is not None
            and self._clock() - self._opened_at >= self.config.open_s
        ):
            self._state = BreakerState.HALF_OPEN  # _open() already zeroed the probe count
            log.info("upstream circuit half-open", extra={"fields": {"upstream": self.name}})
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to this upstream now; in half-open, each True is one probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probes >= self.config.half_open_max_probes:
            return False
        self._probes += 1
        return True

    def record_success(self, latency_s: float) -> None:
        """A call that the upstream answered properly (including with a client-caused 4xx)."""
        now = self._clock()
        if self.state is BreakerState.HALF_OPEN:
            self._close()
        self._consecutive_failures = 0
        self._add(_Outcome(now, True, max(0.0, latency_s)))

    def record_failure(self) -> None:
        """A call that failed through the upstream's fault (connect, timeout, 429, 5xx, bad answer)."""
        now = self._clock()
        state = self.state
        self._consecutive_failures += 1
        self._add(_Outcome(now, False, None))
        if state is BreakerState.HALF_OPEN:
            self._open(now, reason="probe failed")
        elif state is BreakerState.CLOSED:
            if self._consecutive_failures >= self.config.failure_threshold:
                self._open(now, reason="consecutive failures")
            elif self._rate_exceeded():
                self._open(now, reason="error rate")
        # Already open: a late answer from a call sent before opening changes nothing.

    def started(self) -> None:
        """A call to this upstream is under way (pair with ``finished`` in a ``finally``)."""
        self._in_flight += 1

    def finished(self) -> None:
        """A call started with ``started`` is over, whatever its outcome."""
        self._in_flight = max(0, self._in_flight - 1)
        # A probe that ends without an outcome (the client left, the task was cancelled) would
        # otherwise hold its slot forever and keep the breaker half-open and shut. With nothing in
        # flight, no probe is outstanding, so the slots are free again.
        if self._in_flight == 0 and self._state is BreakerState.HALF_OPEN:
            self._probes = 0

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """``started`` / ``finished`` around a block."""
        self.started()
        try:
            yield
        finally:
            self.finished()

    def snapshot(self) -> BreakerSnapshot:
        """The breaker's state and the numbers of its current window."""
        now = self._clock()
        state = self.state
        self._prune(now)
        total = len(self._outcomes)
        failures = sum(1 for o in self._outcomes if not o.ok)
        latencies = [o.latency_s * 1000 for o in self._outcomes if o.latency_s is not None]
        retry_in = None
        if state is BreakerState.OPEN and self._opened_at is not None:
            retry_in = max(0.0, self._opened_at + self.config.open_s - now)
        return BreakerSnapshot(
            name=self.name,
            state=state,
            consecutive_failures=self._consecutive_failures,
            error_rate=failures / total if total else None,
            requests_in_window=total,
            in_flight=self._in_flight,
            latency_p50_ms=statistics.median(latencies) if latencies else None,
            latency_avg_ms=statistics.fmean(latencies) if latencies else None,
            opened_at=self._opened_at if state is not BreakerState.CLOSED else None,
            retry_in_s=retry_in,
        )

    def _add(self, outcome: _Outcome) -> None:
        self._outcomes.append(outcome)
        self._prune(outcome.at)

    def _prune(self, now: float) -> None:
        horizon = now - self.config.window_s
        while self._outcomes and self._outcomes[0].at <= horizon:
            self._outcomes.popleft()

    def _rate_exceeded(self) -> bool:
        total = len(self._outcomes)
        if total < self.config.min_requests or total == 0:
            return False
        failures = sum(1 for o in self._outcomes if not o.ok)
        return failures / total >= self.config.error_rate_threshold

    def open_elsewhere(self, remaining_s: float, *, failures: int = 0) -> None:
        """Another node opened this upstream's breaker; its cool-down ends in ``remaining_s``.
        Never shortens a cool-down already running here."""
        now = self._clock()
        opened_at = now - max(0.0, self.config.open_s - remaining_s)
        if self._state is BreakerState.OPEN and self._opened_at is not None and self._opened_at >= opened_at:
            return
        if self._state is not BreakerState.OPEN:
            log.warning(
                "upstream circuit opened by another node",
                extra={"fields": {"upstream": self.name, "retry_in_s": round(remaining_s, 3)}},
            )
        self._state = BreakerState.OPEN
        self._opened_at = opened_at
        self._probes = 0
        self._consecutive_failures = max(self._consecutive_failures, failures)

    def close_elsewhere(self) -> None:
        """Another node's probe succeeded: the upstream is back."""
        if self._state is not BreakerState.CLOSED:
            self._close(notify=False)

    def _notify(self, state: BreakerState, reason: str) -> None:
        if self.on_change is not None:
            self.on_change(
                BreakerChange(self.name, state, self.config.open_s, self._consecutive_failures, reason)
            )

    def _open(self, now: float, *, reason: str) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._probes = 0
        self._notify(BreakerState.OPEN, reason)
        log.warning(
            "upstream circuit opened",
            extra={
                "fields": {
                    "upstream": self.name,
                    "reason": reason,
                    "consecutive_failures": self._consecutive_failures,
                    "open_s": self.config.open_s,
                }
            },
        )

    def _close(self, *, notify: bool = True) -> None:
        self._state = BreakerState.CLOSED
        self._opened_at = None
        self._probes = 0
        self._consecutive_failures = 0
        # The failures that opened the breaker must not re-open it on the first hiccup after.
        self._outcomes.clear()
        if notify:
            self._notify(BreakerState.CLOSED, "probe succeeded")
        log.info("upstream circuit closed", extra={"fields": {"upstream": self.name}})
