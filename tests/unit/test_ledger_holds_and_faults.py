"""Issue 23, money items 2 and 4, on real SQLite and PostgreSQL databases.

- A queued or running task's hold is tied to the task, not to a clock: the reconciler never takes
  it, however old, and takes it once the task is gone or finished (item 2).
- The settings refuse a ``billing.hold_ttl_s`` a live request could outlast (item 2).
- A settlement the database refuses (a full disk) is retried until it is written, exactly once;
  a request waits only so long, then gets 503 ``ledger_unavailable`` while the retries go on, and
  the hold is settled as soon as the database takes writes again (item 4).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Connection, insert, update

from app.billing.journal import SettlementJournal
from app.billing.ledger import Hold, LedgerRecord, LedgerService
from app.core.errors import LedgerUnavailableError
from app.db.engine import create_engine
from app.db.migrate import upgrade_head
from app.db.tables import Task, utcnow
from app.db.writer import Work, Writer, create_writer
from app.domain.jobs import TokenUsage
from app.runtime.settings import ConfigError, build_settings
from tests.conftest import ADMIN_KEY
from tests.services import fresh_postgres_database
from tests.unit.ledger_db import Db

T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Db]:
    engine = create_engine(db_url)
    await upgrade_head(engine)
    writer = create_writer(engine)
    try:
        yield Db(engine, writer)
    finally:
        await writer.aclose()
        await engine.dispose()


def record(request_id: str, cost: int, hold: Hold) -> LedgerRecord:
    return LedgerRecord(
        request_id=request_id,
        key_id=hold.key_id,
        model="gpt-image-1",
        upstream="fake",
        endpoint="generations",
        status="succeeded",
        images=1,
        usage=TokenUsage(image_output=cost // 40),
        cost_micros=cost,
        latency_ms=5,
        reserved_micros=hold.amount_micros,
    )


async def add_task(db: Db, hold: Hold, *, status: str) -> str:
    task_id = "task_" + hold.id[-8:]
    row = dict(
        id=task_id,
        key_id=hold.key_id,
        request_id="req_" + task_id,
        endpoint="generations",
        model="gpt-image-1",
        status=status,
        spec={"job": {}},
        response_format="b64_json",
        hold_id=hold.id,
        hold_period=hold.period,
        hold_micros=hold.amount_micros,
        created_at=utcnow(),
    )
    await db.writer.run(lambda c: c.execute(insert(Task).values(**row)))
    return task_id


# -- item 2: a task's hold lives as long as the task --------------------------------------------------


@pytest.mark.parametrize("status", ["queued", "in_progress"])
async def test_the_reconciler_never_releases_a_live_tasks_hold(db: Db, status: str) -> None:
    await db.add_key("k", quota_micros=12_000)
    ledger = LedgerService(db.writer, hold_ttl_s=60)
    held = await ledger.reserve(key_id="k", amount_micros=10_000, request_id="r-task")
    task_id = await add_task(db, held, status=status)
    stray = await ledger.reserve(key_id="k", amount_micros=1_000, request_id="r-dead")

    # A day later: the dead request's hold goes, the task's stays, and so does the quota it holds.
    assert await ledger.release_expired(utcnow() + timedelta(days=1)) == 1
    assert [h["id"] for h in await db.holds()] == [held.id]
    assert (await db.key("k"))["reserved"] == 10_000
    assert stray.id not in {h["id"] for h in await db.holds()}

    # Once the task is over (its outcome written without its hold, say), the hold is an orphan.
    def finish(c: Connection) -> None:
        c.execute(update(Task).where(Task.id == task_id).values(status="failed"))

    await db.writer.run(finish)
    assert await ledger.release_expired(utcnow() + timedelta(days=1)) == 1
    assert await db.holds() == []
    key = await db.key("k")
    assert (key["reserved"], key["period_reserved"], key["spent"]) == (0, 0, 0)


def test_settings_refuse_a_hold_ttl_a_live_request_could_outlast(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(tmp_path),
        "server": {"body_deadline_s": 100, "shutdown_grace_s": 5},
        "retry": {"deadline_s": 50},
        "upstreams": [{"name": "u", "kind": "local", "models": ["*"], "timeout_s": 20}],
    }
    # A live request may last body 100 s + retries 50 s + one last call 20 s + grace 5 s = 175 s.
    with pytest.raises(ConfigError) as refused:
        build_settings({**base, "billing": {"hold_ttl_s": 175}})
    message = str(refused.value)
    assert "billing.hold_ttl_s must be above 175 s" in message
    for field in ("server.body_deadline_s", "retry.deadline_s", "timeout_s", "server.shutdown_grace_s"):
        assert field in message
    with pytest.raises(ConfigError, match="twice billing.reconcile_every_s"):
        build_settings({**base, "billing": {"hold_ttl_s": 200, "reconcile_every_s": 100}})
    assert build_settings({**base, "billing": {"hold_ttl_s": 176}}).billing.hold_ttl_s == 176


# -- item 4: a refused settlement is retried, never lost ---------------------------------------------


class FullDisk:
    """A writer whose transactions fail as SQLite's do on a full disk while ``full`` is set."""

    def __init__(self, inner: Writer) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.full = False
        self.refused = 0
        self.refusal = asyncio.Event()

    def _check(self) -> None:
        if self.full:
            self.refused += 1
            self.refusal.set()
            raise sqlite3.OperationalError("database or disk is full")

    def run_now(self, work: Work[T]) -> T:
        self._check()
        return self.inner.run_now(work)

    async def run(self, work: Work[T]) -> T:
        self._check()
        return await self.inner.run(work)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_settlement_refused_by_a_full_disk_is_retried_until_written(db: Db) -> None:
    await db.add_key("k")
    disk = FullDisk(db.writer)
    ledger = LedgerService(disk, settle_patience_s=30, retry_first_s=0.01, retry_max_s=0.05)
    hold = await ledger.reserve(key_id="k", amount_micros=5_000, request_id="r1")

    disk.full = True
    settling = asyncio.ensure_future(ledger.settle(hold, record("r1", 4_000, hold)))
    for _ in range(3):  # refused three times, then the disk has room again
        disk.refusal.clear()
        await disk.refusal.wait()
    assert not settling.done()
    disk.full = False
    await settling

    (entry,) = await db.entries()
    assert (entry["request_id"], entry["cost_micros"]) == ("r1", 4_000)
    key = await db.key("k")
    assert (key["spent"], key["reserved"], key["period_spent"], key["period_reserved"]) == (
        4_000,
        0,
        4_000,
        0,
    )
    assert await db.holds() == []
    assert ledger.deferred == 0


async def test_a_request_stops_waiting_but_its_settlement_is_still_written(db: Db) -> None:
    await db.add_key("k")
    disk = FullDisk(db.writer)
    ledger = LedgerService(disk, settle_patience_s=0.2, retry_first_s=0.01, retry_max_s=0.05)
    hold = await ledger.reserve(key_id="k", amount_micros=5_000, request_id="r1")

    disk.full = True
    with pytest.raises(LedgerUnavailableError) as refused:
        await ledger.settle(hold, record("r1", 4_000, hold))
    assert refused.value.status_code == 503 and refused.value.code == "ledger_unavailable"
    assert refused.value.headers["x-should-retry"] == "false"
    assert ledger.deferred == 1 and await db.entries() == []

    disk.full = False
    for _ in range(2000):  # written at the next retry: within retry_max_s
        if ledger.deferred == 0:
            break
        await asyncio.sleep(0.01)
    assert ledger.deferred == 0
    (entry,) = await db.entries()
    assert entry["cost_micros"] == 4_000
    key = await db.key("k")
    assert (key["spent"], key["reserved"], key["period_reserved"]) == (4_000, 0, 0)
    assert await db.holds() == []


async def test_a_retried_settlement_that_was_committed_after_all_is_not_charged_twice(db: Db) -> None:
    await db.add_key("k")

    class LostCommit(FullDisk):
        """The first transaction commits, then its caller is told it failed (a dropped connection)."""

        async def run(self, work: Work[T]) -> T:
            result = await self.inner.run(work)
            if self.full:
                self.full = False
                raise sqlite3.OperationalError("disk I/O error")
            return result

        def run_now(self, work: Work[T]) -> T:
            from app.db.writer import WouldBlock

            raise WouldBlock

    disk = LostCommit(db.writer)
    ledger = LedgerService(disk, retry_first_s=0.01)
    hold = await ledger.reserve(key_id="k", amount_micros=5_000, request_id="r1")
    disk.full = True
    await ledger.settle(hold, record("r1", 4_000, hold))
    assert len(await db.entries()) == 1
    assert (await db.key("k"))["spent"] == 4_000


async def test_a_refused_settlement_is_journaled_and_replayed_after_the_process_died(
    db: Db, tmp_path: Path
) -> None:
    await db.add_key("k")
    journal = SettlementJournal(tmp_path / "ledger-journal.jsonl")
    disk = FullDisk(db.writer)
    dying = LedgerService(disk, settle_patience_s=0.05, retry_first_s=0.01, retry_max_s=0.05, journal=journal)
    hold = await dying.reserve(key_id="k", amount_micros=5_000, request_id="r1")
    disk.full = True
    with pytest.raises(LedgerUnavailableError):
        await dying.settle(hold, record("r1", 4_000, hold))
    assert journal.path.exists()
    # The process dies: its retries stop with it, and nothing was written.
    for pending in list(dying._pending):
        pending.cancel()
    await asyncio.gather(*dying._pending, return_exceptions=True)
    assert await db.entries() == [] and len(await db.holds()) == 1

    # A process on the same data_dir (or this one, restarted) replays the journal at its next tick.
    disk.full = False
    restarted = LedgerService(db.writer, journal=journal)
    assert await restarted.replay_journal() == 1
    (entry,) = await db.entries()
    assert (entry["request_id"], entry["cost_micros"], entry["key_id"]) == ("r1", 4_000, "k")
    key = await db.key("k")
    assert (key["spent"], key["reserved"], key["period_spent"], key["period_reserved"]) == (
        4_000,
        0,
        4_000,
        0,
    )
    assert await db.holds() == []
    assert not journal.path.exists()
    assert await restarted.replay_journal() == 0


async def test_a_journaled_settlement_written_by_its_retries_is_not_replayed_twice(
    db: Db, tmp_path: Path
) -> None:
    await db.add_key("k")
    journal = SettlementJournal(tmp_path / "ledger-journal.jsonl")
    disk = FullDisk(db.writer)
    ledger = LedgerService(disk, settle_patience_s=30, retry_first_s=0.01, retry_max_s=0.05, journal=journal)
    hold = await ledger.reserve(key_id="k", amount_micros=5_000, request_id="r1")
    disk.full = True
    settling = asyncio.ensure_future(ledger.settle(hold, record("r1", 4_000, hold)))
    await disk.refusal.wait()
    disk.refusal.clear()
    await disk.refusal.wait()  # refused twice: journaled, and retrying
    assert journal.path.exists()
    disk.full = False
    await settling
    # The journal still names it; replaying finds its row and only drops the line.
    assert await LedgerService(db.writer, journal=journal).replay_journal() == 1
    assert len(await db.entries()) == 1 and (await db.key("k"))["spent"] == 4_000
    assert not journal.path.exists()


async def test_a_live_requests_hold_is_renewed_and_outlives_its_ttl(db: Db) -> None:
    await db.add_key("k")
    ledger = LedgerService(db.writer, hold_ttl_s=60)
    live = await ledger.reserve(key_id="k", amount_micros=3_000, request_id="r-stream")
    # A hold taken by another process that died (this one does not know it).
    dead = await LedgerService(db.writer, hold_ttl_s=60).reserve(
        key_id="k", amount_micros=1_000, request_id="r-dead"
    )
    later = utcnow() + timedelta(hours=2)  # a stream still running two hours on
    assert await ledger.renew_live(later) == 1
    assert await ledger.release_expired(later + timedelta(seconds=30)) == 1
    assert [h["id"] for h in await db.holds()] == [live.id]
    assert dead.id not in {h["id"] for h in await db.holds()}

    await ledger.settle(live, record("r-stream", 2_000, live))
    assert await ledger.renew_live(later) == 0  # settled: nothing left to renew
    key = await db.key("k")
    assert (key["spent"], key["reserved"], key["period_reserved"]) == (2_000, 0, 0)


async def test_renewal_forgets_holds_settled_by_another_process(db: Db) -> None:
    await db.add_key("k")
    submitting = LedgerService(db.writer, hold_ttl_s=60)
    hold = await submitting.reserve(key_id="k", amount_micros=3_000, request_id="r-task")
    # A task's hold, settled by the worker of another process.
    await LedgerService(db.writer, hold_ttl_s=60).settle(hold, record("r-task", 1_000, hold))
    assert await submitting.renew_live() == 0
    assert submitting._live == set()
