"""Issue 23 item 9: a failed database write on PostgreSQL logs no prompt and no key hash.

On 9a64885 a failed task insert logged the statement's parameters (the task's spec, the prompt in
it) and asyncpg's DETAIL ("Failing row contains (…)"), and a failed key insert the key's hash.
Here the database refuses the rows (a CHECK the test adds), the client gets a clean 500, and the
captured log names the error and its constraint only.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import LOCAL_UPSTREAM, Gateway, make_settings, migrate, start_gateway
from tests.services import fresh_postgres_database

PROMPT = "prompt-marker-7f3a9c a lighthouse the user never wants logged"
NAME = "name-marker-51be0d"


def _pg(url: str, sql: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.fixture
def pg_gateway(tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    with fresh_postgres_database() as url:
        migrate(url)
        gateway = start_gateway(make_settings(tmp_path, [LOCAL_UPSTREAM], database={"url": url}), tmp_path)
        try:
            yield gateway, url
        finally:
            gateway.close()


def _no_secrets_in(text: str) -> None:
    assert "prompt-marker-7f3a9c" not in text
    assert "name-marker-51be0d" not in text
    assert "Failing row" not in text and "DETAIL" not in text
    assert "parameters:" not in text.lower().replace("[sql parameters hidden", "")
    # A key's hash is 64 hex characters; nothing of the kind is logged.
    assert re.search(r"[0-9a-f]{64}", text) is None


def test_a_failed_task_insert_logs_neither_the_prompt_nor_the_parameters(
    pg_gateway: tuple[Gateway, str], caplog: Any
) -> None:
    gateway, url = pg_gateway
    key, _ = gateway.create_key()
    _pg(url, "ALTER TABLE tasks ADD CONSTRAINT refuse_all CHECK (attempts < 0) NOT VALID")
    with caplog.at_level("DEBUG"):
        response = httpx.post(
            gateway.url + "/v1/images/generations?async=true",
            json={"model": "gpt-image-1.5", "prompt": PROMPT, "size": "1024x1024"},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "idem-" + "a" * 40},
            timeout=30,
        )
    assert response.status_code == 500, response.text
    assert PROMPT not in response.text
    assert "refuse_all" in caplog.text  # the error is logged, summarized
    _no_secrets_in(caplog.text)
    # The hold went back: nothing is reserved for a task that does not exist.
    assert gateway.query("SELECT count(*) AS n FROM tasks")[0]["n"] == 0


def test_a_failed_key_insert_logs_no_hash(pg_gateway: tuple[Gateway, str], caplog: Any) -> None:
    gateway, url = pg_gateway
    _pg(url, f"ALTER TABLE api_keys ADD CONSTRAINT refuse_name CHECK (name <> '{NAME}') NOT VALID")
    with caplog.at_level("DEBUG"):
        response = gateway.admin("POST", "/admin/keys", json={"name": NAME})
    assert response.status_code == 500, response.text
    assert "refuse_name" in caplog.text
    _no_secrets_in(caplog.text)


def test_the_engine_hides_parameters(tmp_path: Path) -> None:
    from app.db.engine import create_engine

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        assert engine.sync_engine.hide_parameters
    finally:
        asyncio.run(engine.dispose())
