"""CircuitBreaker transitions and snapshot, driven by a fake monotonic clock (no sleeping)."""

from __future__ import annotations

import logging

import pytest

from app.domain.states import BreakerState
from app.upstream.health import BreakerConfig, BreakerSnapshot, CircuitBreaker


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock, **config: float) -> CircuitBreaker:
    return CircuitBreaker("up-a", BreakerConfig(**config), clock)  # type: ignore[arg-type]


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.record_failure()


def succeed(breaker: CircuitBreaker, times: int, latency_s: float = 0.1) -> None:
    for _ in range(times):
        breaker.record_success(latency_s)


def test_starts_closed_and_allows() -> None:
    breaker = make(FakeClock())
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(100))


def test_opens_after_consecutive_failures() -> None:
    breaker = make(FakeClock(), failure_threshold=3)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()


def test_a_success_resets_the_consecutive_count() -> None:
    # min_requests out of reach, so only the consecutive rule is in play (the rate here is 2/3).
    breaker = make(FakeClock(), failure_threshold=3, min_requests=1000)
    for _ in range(10):
        fail(breaker, 2)
        succeed(breaker, 1)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().consecutive_failures == 0


def test_opens_on_error_rate_once_the_window_has_enough_requests() -> None:
    # Alternating outcomes never make 5 consecutive failures, but the rate is 50 %.
    breaker = make(FakeClock(), min_requests=10, error_rate_threshold=0.5)
    for _ in range(4):
        succeed(breaker, 1)
        fail(breaker, 1)
    assert breaker.state is BreakerState.CLOSED  # 8 requests < min_requests
    succeed(breaker, 1)
    fail(breaker, 1)  # 10 requests, 5 failures: 0.5 >= 0.5
    assert breaker.state is BreakerState.OPEN


def test_error_rate_below_threshold_stays_closed() -> None:
    breaker = make(FakeClock(), min_requests=10, error_rate_threshold=0.5)
    for _ in range(20):
        succeed(breaker, 2)
        fail(breaker, 1)
    assert breaker.state is BreakerState.CLOSED


def test_old_outcomes_leave_the_window() -> None:
    clock = FakeClock()
    breaker = make(clock, min_requests=10, window_s=60)
    for _ in range(4):
        fail(breaker, 1)
        succeed(breaker, 1)
    clock.advance(61)
    # The 8 earlier outcomes have aged out, so 2 more do not reach min_requests.
    fail(breaker, 1)
    succeed(breaker, 1)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().requests_in_window == 2


def test_open_rejects_until_the_cool_down_then_lets_exactly_one_probe() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=2, open_s=30)
    fail(breaker, 2)
    clock.advance(29.9)
    assert breaker.state is BreakerState.OPEN
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert [breaker.allow() for _ in range(5)] == [True, False, False, False, False]


def test_half_open_max_probes_is_honoured() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, open_s=5, half_open_max_probes=3)
    fail(breaker, 1)
    clock.advance(5)
    assert [breaker.allow() for _ in range(5)] == [True, True, True, False, False]


def test_probe_failure_reopens_and_restarts_the_cool_down() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=2, open_s=30)
    fail(breaker, 2)
    clock.advance(30)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot().opened_at == clock.now
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()


def test_probe_success_closes_and_resets_counters() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=2, open_s=30)
    fail(breaker, 2)
    clock.advance(30)
    assert breaker.allow()
    breaker.record_success(0.2)
    assert breaker.state is BreakerState.CLOSED
    snap = breaker.snapshot()
    assert snap.consecutive_failures == 0
    assert snap.requests_in_window == 1 and snap.error_rate == 0.0
    assert snap.opened_at is None
    assert all(breaker.allow() for _ in range(10))
    # A single failure after closing does not re-open: the old failures were forgotten.
    fail(breaker, 1)
    assert breaker.state is BreakerState.CLOSED


def test_late_results_while_open_change_nothing() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=2, open_s=30)
    fail(breaker, 2)
    opened_at = breaker.snapshot().opened_at
    clock.advance(10)
    breaker.record_success(0.1)  # a call sent before the breaker opened
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot().opened_at == opened_at  # the cool-down was not restarted


def test_a_probe_that_ends_without_an_outcome_frees_its_slot() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, open_s=5)
    fail(breaker, 1)
    clock.advance(5)
    assert breaker.allow()
    with pytest.raises(RuntimeError), breaker.in_flight():
        raise RuntimeError("cancelled")  # no record_* call
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_in_flight_accounting() -> None:
    breaker = make(FakeClock())
    breaker.started()
    breaker.started()
    with breaker.in_flight():
        assert breaker.snapshot().in_flight == 3
    breaker.finished()
    assert breaker.snapshot().in_flight == 1
    breaker.finished()
    breaker.finished()  # an extra finished() never goes negative
    assert breaker.snapshot().in_flight == 0


def test_snapshot_fields() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=10, open_s=30)
    assert breaker.snapshot() == BreakerSnapshot(
        name="up-a",
        state=BreakerState.CLOSED,
        consecutive_failures=0,
        error_rate=None,
        requests_in_window=0,
        in_flight=0,
        latency_p50_ms=None,
        latency_avg_ms=None,
        opened_at=None,
        retry_in_s=None,
    )
    for latency in (0.1, 0.2, 0.6):
        breaker.record_success(latency)
    fail(breaker, 1)
    breaker.started()
    snap = breaker.snapshot()
    assert snap.state == "closed"
    assert snap.consecutive_failures == 1
    assert snap.requests_in_window == 4
    assert snap.error_rate == pytest.approx(0.25)
    assert snap.in_flight == 1
    assert snap.latency_p50_ms == pytest.approx(200.0)
    assert snap.latency_avg_ms == pytest.approx(300.0)
    assert snap.opened_at is None and snap.retry_in_s is None

    fail(breaker, 9)
    opened = clock.now
    clock.advance(12)
    snap = breaker.snapshot()
    assert snap.state is BreakerState.OPEN
    assert snap.opened_at == opened
    assert snap.retry_in_s == pytest.approx(18.0)
    clock.advance(18)
    snap = breaker.snapshot()
    assert snap.state is BreakerState.HALF_OPEN and snap.retry_in_s is None


def test_transitions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, open_s=1)
    with caplog.at_level(logging.INFO, logger="app.upstream.health"):
        fail(breaker, 1)
        clock.advance(1)
        assert breaker.allow()
        breaker.record_success(0.1)
    assert [r.getMessage() for r in caplog.records] == [
        "upstream circuit opened",
        "upstream circuit half-open",
        "upstream circuit closed",
    ]
