"""RetryPolicy: what is retried, how long to wait, when to fail over; all on fake clocks."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from app.core.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    PayloadTooLargeError,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.upstream.errors import rejected_from_response
from app.upstream.retry import Deadline, RetryAction, RetryDecision, RetryPolicy, parse_retry_after

POLICY = RetryPolicy()
NOW = 1_700_000_000.0  # a fixed Unix time for HTTP-date arithmetic


class FakeClock:
    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def rejected(status: int, retry_after: str | None = None) -> UpstreamRejected:
    return UpstreamRejected(
        status, "upstream said no", error_type=None, param=None, code=None, retry_after=retry_after
    )


# --- classification ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (UpstreamUnavailable(), True),
        (UpstreamUnavailable("none left", status=503), True),
        (UpstreamTimeout(), True),
        (UpstreamError("The upstream service returned an invalid response."), True),
        (rejected(408), True),
        (rejected(409), True),
        (rejected(429), True),
        (rejected(500), True),
        (rejected(502), True),
        (rejected(503), True),
        (rejected(504), True),
        (rejected(599), True),
        (rejected(400), False),
        (rejected(401), False),
        (rejected(403), False),
        (rejected(404), False),
        (rejected(413), False),
        (rejected(422), False),
        (InvalidRequestError("bad size", param="size"), False),
        (AuthenticationError("bad key"), False),
        (PayloadTooLargeError("too big"), False),
        (GatewayError("something else"), False),
    ],
    ids=lambda v: type(v).__name__ + (f"-{v.status_code}" if isinstance(v, GatewayError) else ""),
)
def test_should_retry_table(error: GatewayError, expected: bool) -> None:
    assert POLICY.should_retry(error) is expected


# --- parse_retry_after ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 12 ", 12.0),
        ("1.5", 1.5),  # non-standard, but openai-python accepts floats too
        ("0", 0.0),
        (None, None),
        ("", None),
        ("   ", None),
        ("-5", None),
        ("nan", None),
        ("soon", None),
        ("Mon, 99 Foo 2024 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_http_date_in_the_future() -> None:
    header = email.utils.formatdate(NOW + 42, usegmt=True)
    assert parse_retry_after(header, now=NOW) == pytest.approx(42.0)


def test_parse_retry_after_http_date_in_the_past_means_now() -> None:
    header = email.utils.formatdate(NOW - 600, usegmt=True)
    assert parse_retry_after(header, now=NOW) == 0.0


def test_parse_retry_after_overflow_is_infinite_not_ignored() -> None:
    assert parse_retry_after("1e999", now=NOW) == float("inf")


# --- delay ------------------------------------------------------------------------------------


def test_delay_grows_exponentially_and_is_capped_with_jitter_bounds() -> None:
    rng = random.Random(7)
    for attempt, nominal in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (50, 8.0)]:
        samples = [POLICY.delay(attempt, None, rng) for _ in range(500)]
        assert all(0.75 * nominal <= s <= nominal for s in samples), attempt
        # Jitter really spreads the waits instead of returning one constant.
        assert max(samples) - min(samples) > 0.15 * nominal


def test_delay_survives_huge_attempt_numbers() -> None:
    assert POLICY.delay(10**9, None, random.Random(0)) <= POLICY.max_delay_s


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    first = [POLICY.delay(a, None, random.Random(3)) for a in range(1, 6)]
    again = [POLICY.delay(a, None, random.Random(3)) for a in range(1, 6)]
    assert first == again


def test_delay_honours_retry_after_seconds_without_jitter() -> None:
    rng = random.Random(1)
    assert POLICY.delay(1, rejected(429, "20"), rng) == 20.0
    # Longer than the back-off cap, still within max_retry_after_s: the server knows best.
    assert POLICY.delay(3, rejected(503, "45.5"), rng) == 45.5


def test_delay_honours_retry_after_http_date() -> None:
    # delay() measures dates against the real clock; the date is whole seconds, hence the range.
    header = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = POLICY.delay(1, rejected(429, header), random.Random(1))
    assert 20.0 < wait <= 30.0


@pytest.mark.parametrize("value", ["0", "-3", "garbage", "61", "1e999"])
def test_delay_falls_back_to_backoff_when_retry_after_is_unusable(value: str) -> None:
    wait = POLICY.delay(2, rejected(429, value), random.Random(1))
    assert 0.75 <= wait <= 1.0


def test_delay_honours_retry_after_ms_via_the_error_mapping() -> None:
    # app.upstream.errors folds retry-after-ms into retry_after, rounded up to whole seconds.
    error = rejected_from_response(429, b"", {"retry-after-ms": "2500"}, secrets=())
    assert POLICY.delay(1, error, random.Random(1)) == 3.0
    preferred = rejected_from_response(429, b"", {"retry-after": "4", "retry-after-ms": "2500"}, secrets=())
    assert POLICY.delay(1, preferred, random.Random(1)) == 4.0


def test_delay_cap_is_configurable() -> None:
    policy = RetryPolicy(max_retry_after_s=5.0, initial_delay_s=0.1, max_delay_s=0.4)
    assert policy.delay(1, rejected(429, "5"), random.Random(1)) == 5.0
    assert policy.delay(9, rejected(429, "6"), random.Random(1)) <= 0.4


# --- Deadline ---------------------------------------------------------------------------------


def test_deadline_counts_down_on_the_injected_clock() -> None:
    clock = FakeClock()
    deadline = Deadline(10.0, clock)
    assert deadline.remaining() == 10.0 and not deadline.expired
    clock.now += 7.5
    assert deadline.remaining() == 2.5 and not deadline.expired
    clock.now += 2.5
    assert deadline.remaining() == 0.0 and deadline.expired
    clock.now += 100
    assert deadline.remaining() == 0.0 and deadline.expired


def test_policy_deadline_uses_deadline_s() -> None:
    clock = FakeClock()
    assert RetryPolicy(deadline_s=42.0).deadline(clock).remaining() == 42.0


# --- decide -----------------------------------------------------------------------------------


def decide(
    error: GatewayError,
    *,
    tries_here: int = 1,
    attempts_total: int = 1,
    budget: float = 600.0,
    policy: RetryPolicy = POLICY,
) -> RetryDecision:
    return policy.decide(
        error,
        tries_here=tries_here,
        attempts_total=attempts_total,
        deadline=Deadline(budget, FakeClock()),
        rng=random.Random(5),
    )


def test_decide_retries_the_same_upstream_twice_then_fails_over() -> None:
    first = decide(UpstreamTimeout(), tries_here=1, attempts_total=1)
    second = decide(UpstreamTimeout(), tries_here=2, attempts_total=2)
    third = decide(UpstreamTimeout(), tries_here=3, attempts_total=3)
    assert first.action is RetryAction.RETRY and 0.375 <= first.delay_s <= 0.5
    assert second.action is RetryAction.RETRY and 0.75 <= second.delay_s <= 1.0
    assert third == RetryDecision(RetryAction.FAIL_OVER)


def test_decide_gives_up_on_client_errors() -> None:
    assert decide(rejected(400)).action is RetryAction.GIVE_UP
    assert decide(InvalidRequestError("bad")).action is RetryAction.GIVE_UP


def test_decide_gives_up_when_attempts_are_spent() -> None:
    assert decide(rejected(503), attempts_total=5).action is RetryAction.RETRY
    assert decide(rejected(503), attempts_total=6).action is RetryAction.GIVE_UP


def test_decide_fails_over_instead_of_waiting_out_a_long_retry_after() -> None:
    assert decide(rejected(429, "120")) == RetryDecision(RetryAction.FAIL_OVER)
    assert decide(rejected(429, "1e999")) == RetryDecision(RetryAction.FAIL_OVER)
    assert decide(rejected(429, "30")) == RetryDecision(RetryAction.RETRY, 30.0)


def test_decide_respects_the_deadline() -> None:
    # The wait would outlast what is left: try elsewhere right away.
    assert decide(rejected(429, "30"), budget=10.0) == RetryDecision(RetryAction.FAIL_OVER)
    assert decide(UpstreamTimeout(), budget=0.0).action is RetryAction.GIVE_UP


def test_decide_with_no_same_upstream_retries() -> None:
    policy = RetryPolicy(max_retries_per_upstream=0)
    assert decide(UpstreamUnavailable(), policy=policy).action is RetryAction.FAIL_OVER
