"""A settlement the database refused is kept in Redis too, and any node writes it (issue 24).

The file journal lives on the node's own disk; a node lost for good would take its refused
settlements along. These tests lose the node (its process and its data directory) and check that
another node, sharing only the database and Redis, writes the charge exactly once.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.billing.journal import SettlementJournal
from app.billing.ledger import LedgerService
from app.billing.shared_journal import SharedJournal
from app.core.errors import LedgerUnavailableError
from tests.services import require_redis
from tests.unit.ledger_db import Db
from tests.unit.test_ledger_holds_and_faults import FullDisk, db, db_url, record

__all__ = ["db", "db_url"]  # fixtures, imported for pytest


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(require_redis())
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def list_key(redis: Redis) -> str:
    return f"test-journal:{uuid.uuid4().hex}"


async def lose_node(ledger: LedgerService, data_dir: Path) -> None:
    """The node dies with its retries, and its disk is gone with it."""
    for pending in list(ledger._pending):
        pending.cancel()
    await asyncio.gather(*ledger._pending, return_exceptions=True)
    shutil.rmtree(data_dir)


async def test_a_lost_nodes_refused_settlement_is_written_by_another_node(
    db: Db, redis: Redis, list_key: str, tmp_path: Path
) -> None:
    await db.add_key("k")
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    node_a.mkdir(), node_b.mkdir()
    disk = FullDisk(db.writer)
    dying = LedgerService(
        disk,
        settle_patience_s=0.05,
        retry_first_s=0.01,
        retry_max_s=0.05,
        journal=SettlementJournal(node_a / "ledger-journal.jsonl"),
    )
    dying.share_journal(SharedJournal(redis, list_key))
    hold = await dying.reserve(key_id="k", amount_micros=5_000, request_id="r1")
    disk.full = True
    with pytest.raises(LedgerUnavailableError):
        await dying.settle(hold, record("r1", 4_000, hold))
    assert (node_a / "ledger-journal.jsonl").exists()
    assert await redis.llen(list_key) == 1
    await lose_node(dying, node_a)
    assert await db.entries() == []

    # Node B never saw the request; its own journal is empty, the shared copy is not.
    other = LedgerService(db.writer, journal=SettlementJournal(node_b / "ledger-journal.jsonl"))
    other.share_journal(SharedJournal(redis, list_key))
    assert await other.replay_journal() == 1
    (entry,) = await db.entries()
    assert (entry["request_id"], entry["cost_micros"]) == ("r1", 4_000)
    key = await db.key("k")
    assert (key["spent"], key["reserved"], key["period_spent"]) == (4_000, 0, 4_000)
    assert await db.holds() == []
    assert await redis.llen(list_key) == 0
    assert await other.replay_journal() == 0
    assert len(await db.entries()) == 1


async def test_both_copies_replayed_charge_once(db: Db, redis: Redis, list_key: str, tmp_path: Path) -> None:
    await db.add_key("k")
    disk = FullDisk(db.writer)
    journal = SettlementJournal(tmp_path / "ledger-journal.jsonl")
    ledger = LedgerService(
        disk, settle_patience_s=0.05, retry_first_s=0.01, retry_max_s=0.05, journal=journal
    )
    ledger.share_journal(SharedJournal(redis, list_key))
    hold = await ledger.reserve(key_id="k", amount_micros=5_000, request_id="r1")
    disk.full = True
    with pytest.raises(LedgerUnavailableError):
        await ledger.settle(hold, record("r1", 4_000, hold))
    for pending in list(ledger._pending):
        pending.cancel()
    await asyncio.gather(*ledger._pending, return_exceptions=True)

    # The same node restarted (its file is there) and another node (Redis only) replay at once.
    restarted = LedgerService(db.writer, journal=journal)
    restarted.share_journal(SharedJournal(redis, list_key))
    other = LedgerService(db.writer)
    other.share_journal(SharedJournal(redis, list_key))
    await asyncio.gather(restarted.replay_journal(), other.replay_journal())
    await other.replay_journal()
    assert len(await db.entries()) == 1
    assert (await db.key("k"))["spent"] == 4_000
    assert not journal.path.exists() and await redis.llen(list_key) == 0


async def test_a_redis_that_refuses_keeps_the_file_copy(db: Db, list_key: str, tmp_path: Path) -> None:
    await db.add_key("k")
    unreachable = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    disk = FullDisk(db.writer)
    journal = SettlementJournal(tmp_path / "ledger-journal.jsonl")
    ledger = LedgerService(
        disk, settle_patience_s=0.05, retry_first_s=0.01, retry_max_s=0.05, journal=journal
    )
    ledger.share_journal(SharedJournal(unreachable, list_key))
    hold = await ledger.reserve(key_id="k", amount_micros=5_000, request_id="r1")
    disk.full = True
    with pytest.raises(LedgerUnavailableError):
        await ledger.settle(hold, record("r1", 4_000, hold))
    assert journal.path.exists()
    disk.full = False
    for pending in list(ledger._pending):
        pending.cancel()
    await asyncio.gather(*ledger._pending, return_exceptions=True)
    assert await ledger.replay_journal() == 1  # the file's copy; Redis's replay is skipped
    assert (await db.key("k"))["spent"] == 4_000
    await unreachable.aclose()
