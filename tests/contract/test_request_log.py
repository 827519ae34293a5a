"""The request log (issue 26): every /v1 request, admitted or refused, written off the hot path."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.console.requestlog import RequestLog, Seen
from app.db.engine import create_engine
from app.db.migrate import upgrade_head
from app.db.writer import create_writer
from tests.conftest import LOCAL_UPSTREAM, Gateway

ALWAYS = "a dismembered corpse"  # blocked by moderation at every level
REFUSED_BODY = b'{"error":{"message":"Invalid value: 100% wrong","type":"invalid_request_error","code":"x"}}'


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def log_rows(gw: Gateway) -> list[dict[str, Any]]:
    return gw.query("SELECT * FROM request_log ORDER BY id")


def test_admitted_and_refused_requests_are_logged_with_names_never_secrets(gateway_with: Any) -> None:
    gw: Gateway = gateway_with(LOCAL_UPSTREAM)
    key, key_id = gw.create_key(name="acme-prod", quota="0.000001")
    client = gw.client(key)
    poor = gw.client(key)

    ok_key, ok_id = gw.create_key(name="acme-ok")
    gw.client(ok_key).images.generate(model="gpt-image-1", prompt="a lighthouse at dusk", size="1024x1024")
    with pytest.raises(openai.BadRequestError) as blocked:
        client.images.generate(model="gpt-image-1", prompt=ALWAYS)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="gpt-image-1", prompt="a cat", size="7x7")
    with pytest.raises(openai.AuthenticationError):
        gw.client("sk-not-a-key").images.generate(model="gpt-image-1", prompt="a cat")
    with pytest.raises(openai.RateLimitError):
        poor.images.generate(model="gpt-image-1", prompt="a dog", size="1024x1024")

    rows = wait_for(lambda: (found := log_rows(gw)) and len(found) >= 5 and found)
    assert len(rows) == 5, rows
    ok, moderated, invalid, unauthenticated, quota = rows
    assert (ok["status"], ok["status_class"], ok["key_id"], ok["key_name"]) == (200, "ok", ok_id, "acme-ok")
    assert ok["route"] == "/v1/images/generations" and ok["model"] == "gpt-image-1"
    assert ok["upstream"] == "local" and ok["error_code"] is None
    ledger = [r for r in gw.ledger() if r["request_id"] == ok["request_id"]]
    assert ok["cost_micros"] == ledger[0]["cost_micros"] > 0
    assert ok["tokens"] == sum(
        ledger[0][k]
        for k in ("text_input_tokens", "image_input_tokens", "text_output_tokens", "image_output_tokens")
    )
    assert ok["prompt_sha256"] == hashlib.sha256(b"a lighthouse at dusk").hexdigest()
    # moderation.store_prompts is off by default: the hash only.
    assert ok["prompt"] is None

    assert (moderated["status"], moderated["status_class"]) == (400, "blocked")
    assert moderated["error_code"] == "moderation_blocked" and moderated["key_name"] == "acme-prod"
    assert moderated["request_id"] == blocked.value.response.headers["x-request-id"]
    assert moderated["cost_micros"] == 0 and moderated["prompt_sha256"] is not None

    assert (invalid["status"], invalid["status_class"], invalid["key_id"]) == (400, "4xx", key_id)
    assert invalid["error_message"] and "'7x7'" in invalid["error_message"]

    assert (unauthenticated["status"], unauthenticated["key_id"]) == (401, None)
    assert unauthenticated["error_code"] == "invalid_api_key"

    assert (quota["status"], quota["status_class"], quota["key_name"]) == (429, "4xx", "acme-prod")
    assert quota["error_code"] == "insufficient_quota"

    # Never a secret: neither tenant key appears anywhere in the log.
    text = repr(rows)
    assert key not in text and ok_key not in text and "sk-not-a-key" not in text
    # Only /v1 is logged: the admin calls above are not.
    assert all(row["route"].startswith("/v1/") for row in rows)
    # Nothing was dropped, and /metrics says so (the counter an operator alerts on).
    exposition = httpx.get(gw.url + "/metrics", timeout=30).text
    assert "gateway_request_log_dropped_total 0.0" in exposition


def test_prompts_are_kept_only_with_store_prompts(gateway_with: Any) -> None:
    gw: Gateway = gateway_with(LOCAL_UPSTREAM, moderation={"store_prompts": True})
    with pytest.raises(openai.BadRequestError):
        gw.client().images.generate(model="gpt-image-1", prompt=ALWAYS)
    (row,) = wait_for(lambda: log_rows(gw))
    assert row["prompt"] == ALWAYS and row["status_class"] == "blocked"


def test_the_log_can_be_turned_off(gateway_with: Any) -> None:
    gw: Gateway = gateway_with(LOCAL_UPSTREAM, console={"request_log": False})
    gw.client().images.generate(model="gpt-image-1", prompt="a lighthouse", size="1024x1024")
    assert len(gw.ledger()) == 1
    assert gw.query("SELECT COUNT(*) AS n FROM request_log") == [{"n": 0}]


def _seen(i: int, at: float) -> Seen:
    return Seen(at=at, request_id=f"req_{i}", method="POST", route="/v1/x", status=200, latency_ms=1)


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    async def run() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}")
        await upgrade_head(engine)
        dropped: list[int] = []
        log = RequestLog(
            engine, writer := create_writer(engine), capacity=3, on_drop=lambda: dropped.append(1)
        )
        now = time.time()
        for i in range(5):
            log.record(_seen(i, now))  # synchronous: nothing here can wait on the database
        assert (log.pending, log.dropped, len(dropped)) == (3, 2, 2)
        assert await log.flush() == 3
        assert (log.pending, log.written) == (0, 3)
        await writer.aclose()
        await engine.dispose()

    asyncio.run(run())


def test_a_failing_database_loses_the_batch_not_the_request(tmp_path: Path) -> None:
    async def run() -> None:
        # No migration: the table does not exist, so every write fails.
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
        log = RequestLog(engine, writer := create_writer(engine))
        log.record(_seen(1, time.time()))
        assert await log.flush() == 0
        assert (log.pending, log.written) == (0, 0)
        await writer.aclose()
        await engine.dispose()

    asyncio.run(run())


def test_retention_purges_old_entries_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.console.requestlog.PURGE_CHUNK", 2)

    async def run() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}")
        await upgrade_head(engine)
        log = RequestLog(engine, writer := create_writer(engine))
        now = datetime.now(UTC)
        for i in range(5):
            log.record(_seen(i, (now - timedelta(days=40)).timestamp()))
        log.record(_seen(99, now.timestamp()))
        await log.flush()
        assert await log.purge(now - timedelta(days=30)) == 5
        async with engine.connect() as conn:
            from sqlalchemy import text

            left = (await conn.execute(text("SELECT request_id FROM request_log"))).scalars().all()
        assert left == ["req_99"]
        await writer.aclose()
        await engine.dispose()

    asyncio.run(run())


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
        return
    from tests.services import fresh_postgres_database

    with fresh_postgres_database() as url:
        yield url


def test_batches_search_and_keyset_pages_on_both_databases(database_url: str) -> None:
    """The log's writes (with the ledger's tokens) and the console's reads, on SQLite and PostgreSQL."""
    from sqlalchemy import insert

    from app.console.queries import LogFilter, log_page
    from app.db.engine import create_sessionmaker
    from app.db.tables import ApiKey, LedgerEntry

    async def run() -> None:
        engine = create_engine(database_url)
        await upgrade_head(engine)
        sessions = create_sessionmaker(engine)
        async with engine.begin() as conn:
            await conn.execute(
                insert(ApiKey),
                [
                    dict(
                        id="key_a", name="Acme_Prod", key_hash="h" * 64, prefix="sk-gw-", moderation="default"
                    )
                ],
            )
            await conn.execute(
                insert(LedgerEntry),
                [
                    dict(
                        request_id="req_0",
                        key_id="key_a",
                        model="gpt-image-1",
                        endpoint="generations",
                        status="succeeded",
                        text_input_tokens=7,
                        image_output_tokens=100,
                        cost_micros=4_035,
                    )
                ],
            )
        log = RequestLog(engine, writer := create_writer(engine))
        now = time.time()
        for i in range(7):
            refused = i % 2 == 1
            log.record(
                Seen(
                    at=now + i,
                    request_id=f"req_{i}",
                    method="POST",
                    route="/v1/images/generations",
                    status=400 if refused else 200,
                    latency_ms=i,
                    key_id="key_a",
                    key_name="Acme_Prod",
                    model="gpt-image-1",
                    prompt="a \ud800 lone surrogate" if i == 2 else f"prompt {i}",
                    error_body=REFUSED_BODY if refused else None,
                )
            )
        assert await log.flush() == 7
        first = await log_page(sessions, LogFilter(), before=None, limit=3)
        assert [r.request_id for r in first.rows] == ["req_6", "req_5", "req_4"]
        assert first.next_before is not None
        second = await log_page(sessions, LogFilter(), before=int(first.next_before), limit=3)
        assert [r.request_id for r in second.rows] == ["req_3", "req_2", "req_1"]
        (ok,) = (await log_page(sessions, LogFilter(q="req_0"), before=None, limit=10)).rows
        assert (ok.tokens, ok.cost_micros, ok.status_class) == (107, 4_035, "ok")
        # Search: error text with a literal %, any case; a key name with a literal _.
        found = await log_page(sessions, LogFilter(q="100% WRONG"), before=None, limit=10)
        assert [r.request_id for r in found.rows] == ["req_5", "req_3", "req_1"]
        assert list((await log_page(sessions, LogFilter(q="100x"), before=None, limit=10)).rows) == []
        by_name = await log_page(
            sessions, LogFilter(q="acme_prod", status_class="4xx"), before=None, limit=10
        )
        assert len(by_name.rows) == 3
        assert list((await log_page(sessions, LogFilter(q="acmeXprod"), before=None, limit=10)).rows) == []
        await writer.aclose()
        await engine.dispose()

    asyncio.run(run())
