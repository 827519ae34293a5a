"""Which database errors are waited out (app/db/transient.py), and for how long."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import exc as sa_exc

from app.core.errors import ServiceUnavailableError, UpstreamUnavailable
from app.db.transient import is_transient, patient, retrying, rolled_back


class _Driver(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _dbapi(sqlstate: str, *, invalidated: bool = False) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError("SELECT 1", {}, _Driver(sqlstate), connection_invalidated=invalidated)


@pytest.mark.parametrize(
    "error",
    [
        _dbapi("53300"),  # too many connections
        _dbapi("08006"),  # connection failure
        _dbapi("57P01"),  # admin shutdown (a restart)
        _dbapi("40001"),  # serialization failure
        _dbapi("40P01"),  # deadlock
        _dbapi("XX000", invalidated=True),  # the connection went away mid-statement
        sa_exc.TimeoutError("QueuePool limit reached"),
        ConnectionRefusedError(111, "refused"),
        sa_exc.OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked")),
    ],
)
def test_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        _dbapi("23505"),  # unique violation: a real conflict
        _dbapi("42P01"),  # undefined table: a bug or a missing migration
        ValueError("no"),
        UpstreamUnavailable("upstream refused", status=502),
    ],
)
def test_not_transient(error: BaseException) -> None:
    assert not is_transient(error)


def test_an_upstream_error_caused_by_a_refused_connect_is_not_the_database() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except ConnectionRefusedError as cause:
            raise UpstreamUnavailable("upstream refused", status=502) from cause
    except UpstreamUnavailable as error:
        assert not is_transient(error)


def test_only_certain_rollbacks_may_retry_a_failed_commit() -> None:
    assert rolled_back(_dbapi("40001")) and rolled_back(_dbapi("40P01"))
    assert not rolled_back(_dbapi("08006")) and not rolled_back(_dbapi("53300"))


class _Time:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_retrying_gives_up_after_the_usual_patience() -> None:
    time, tries = _Time(), []

    async def attempt() -> None:
        tries.append(time.now)
        raise _dbapi("53300")

    with pytest.raises(sa_exc.DBAPIError):
        await retrying(attempt, what="x", usual_s=5.0, clock=time.clock, sleep=time.sleep)
    assert time.now <= 5.0 and len(tries) > 3
    assert max(time.slept) <= 2.0  # backoff is capped


async def test_patient_none_waits_until_it_passes_and_other_errors_pass_at_once() -> None:
    time, tries = _Time(), []

    async def attempt() -> str:
        tries.append(time.now)
        if len(tries) < 50:
            raise _dbapi("57P03")  # cannot connect now: still starting
        return "done"

    with patient(None):
        assert await retrying(attempt, what="x", usual_s=0.1, clock=time.clock, sleep=time.sleep) == "done"
    assert time.now > 10  # far past the usual patience

    async def broken() -> None:
        raise _dbapi("23505")

    time.slept.clear()
    with patient(None), pytest.raises(sa_exc.DBAPIError):
        await retrying(broken, what="x", clock=time.clock, sleep=time.sleep)
    assert time.slept == []


def test_service_unavailable_is_a_retryable_503() -> None:
    error = ServiceUnavailableError("The service is temporarily unavailable.")
    assert error.status_code == 503 and int(error.headers["retry-after"]) >= 1
    assert error.to_body()["error"]["code"] == "service_unavailable"
