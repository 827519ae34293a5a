"""Database pressure (issue 24, acceptance 4): two gateway processes whose pools together ask for
more connections than PostgreSQL gives their role, and the gateway's connections killed mid-run
(what a PostgreSQL restart does to them).

- no accepted task fails: every one ends `succeeded`, none `task_interrupted` or `internal_error`;
- no client gets a 500: a sync request gets its image, or 503 `service_unavailable` with
  `retry-after` when the database could not be reached within `database.retry_s`;
- the ledger stays exact: one row per upstream answer, Σ ledger = Σ keys' spend, no hold left.

The pressure is real, not assumed: the test checks that the gateways met it (a 503 or a logged
retry). Everything waits on counts and states, never on a wall-clock margin.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.books import ledger_violations, query
from bench.gateway_process import GatewayProcess
from bench.traffic import create_key
from tests.conftest import ADMIN_KEY, migrate
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.reliability.harness import gateway_config
from tests.services import PG_ADMIN_DSN, fresh_postgres_database

# The gateways' role may hold this many connections; each process's pool may open 4 (2 kept + 2
# overflow), 8 together. The kept ones fit (README: Σ pool_size ≤ max_connections, so no process
# starves for good); the overflow does not, so the gateways meet "too many connections".
CONNECTION_LIMIT = 5
TASKS = 24
SYNC = 12
GEN = "/v1/images/generations"
PEPPER = "pressure-test-pepper-" + "7" * 32


async def _admin(sql: str) -> list[Any]:
    import asyncpg

    connection = await asyncpg.connect(PG_ADMIN_DSN.rsplit("/", 1)[0] + "/postgres", timeout=10)
    try:
        return list(await connection.fetch(sql))
    finally:
        await connection.close()


@pytest.fixture
def limited_database() -> Iterator[tuple[str, str, str]]:
    """A fresh database owned by a role of its own that may open only CONNECTION_LIMIT
    connections (superusers ignore such limits, so the gateway must not be one)."""
    role = "gw_pressure_" + secrets.token_hex(4)
    with fresh_postgres_database() as url:
        name = url.rsplit("/", 1)[1]
        asyncio.run(_admin(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT {CONNECTION_LIMIT}"))
        try:
            asyncio.run(_admin(f'ALTER DATABASE "{name}" OWNER TO {role}'))
            limited = url.replace("://postgres@", f"://{role}@")
            migrate(limited)
            yield limited, role, url
        finally:
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            asyncio.run(_admin(f"DROP ROLE IF EXISTS {role}"))


def terminate_connections(role: str) -> int:
    rows = asyncio.run(
        _admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    )
    return len(rows)


def test_pools_above_the_connection_limit_fail_nothing(
    upstream: FakeOpenAI, tmp_path: Path, limited_database: tuple[str, str, str]
) -> None:
    db_url, role, books = limited_database  # the test reads the books as the superuser
    # Each upstream call takes a while, so many tasks and requests hold work at once.
    upstream.always_fail = Fault.delay(0.2)
    nodes = []
    for index in range(2):
        config = gateway_config(
            upstream,
            tmp_path / f"node{index}",
            db_url,
            database={"url": db_url, "pool_size": 2, "max_overflow": 2, "pool_timeout_s": 2, "retry_s": 1},
            tasks={"workers": 1, "concurrency": 16, "poll_s": 0.1, "lease_s": 30},
            # One pepper for both nodes (a key made on one works on the other); no key cache, so
            # every request reads its key: more pressure.
            security={"key_cache_ttl_s": 0, "key_pepper": PEPPER},
            server={"drain_delay_s": 0},
        )
        nodes.append(GatewayProcess(config, tmp_path).wait_ready())
    try:
        key, key_id = create_key(nodes[0].url, ADMIN_KEY)
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": "gpt-image-1", "prompt": "a lighthouse", "size": "1024x1024"}
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def submit(index: int) -> str:
            """Submit until accepted, as a client honouring retry-after would (one idempotency key)."""
            node = nodes[index % 2]
            while True:
                answer = httpx.post(
                    node.url + GEN + "?async=true",
                    json=body,
                    headers={**headers, "idempotency-key": f"pressure-{index}"},
                    timeout=120,
                )
                with lock:
                    statuses[answer.status_code] += 1
                if answer.status_code == 202:
                    return str(answer.json()["id"])
                assert answer.status_code == 503, answer.text
                assert (
                    answer.headers["retry-after"] and answer.json()["error"]["code"] == "service_unavailable"
                )

        sync_answers: list[httpx.Response] = []

        def sync_call(index: int) -> None:
            answer = httpx.post(nodes[index % 2].url + GEN, json=body, headers=headers, timeout=120)
            with lock:
                sync_answers.append(answer)

        task_ids: list[str] = []
        submitters = [threading.Thread(target=lambda i=i: task_ids.append(submit(i))) for i in range(TASKS)]
        callers = [threading.Thread(target=sync_call, args=(i,)) for i in range(SYNC)]
        for thread in [*submitters, *callers]:
            thread.start()
        # Mid-run, cut every connection the gateways hold, as a PostgreSQL restart would.
        terminated = 0
        for answered in (4, 10, 16):
            assert upstream.wait_for_count(answered, GEN, timeout=120)
            terminated += terminate_connections(role)
        for thread in [*submitters, *callers]:
            thread.join(300)
        assert len(task_ids) == TASKS

        deadline = time.monotonic() + 300
        while query(books, "SELECT COUNT(*) AS n FROM tasks WHERE status IN ('queued', 'in_progress')")[0][
            "n"
        ]:
            assert time.monotonic() < deadline, "tasks did not finish"
            time.sleep(0.2)

        tasks = query(books, "SELECT id, status, error FROM tasks")
        assert len(tasks) == TASKS
        assert [t for t in tasks if t["status"] != "succeeded"] == []

        codes = Counter(a.status_code for a in sync_answers)
        assert set(codes) <= {200, 503}, [a.text for a in sync_answers if a.status_code not in (200, 503)]
        for answer in sync_answers:
            if answer.status_code == 503:
                assert answer.json()["error"]["code"] == "service_unavailable"
                assert int(answer.headers["retry-after"]) >= 1

        # Exact books: one ledger row per upstream answer, each the price of its usage, and the
        # keys' spend equal to the ledger; no hold left behind.
        assert ledger_violations(books, [key_id], None) == []
        billed = query(books, "SELECT request_id FROM ledger_entries WHERE images > 0")
        assert len(billed) == upstream.count(GEN) == TASKS + codes[200]
        assert len({r["request_id"] for r in billed}) == len(billed)

        # The pressure was met, not dodged: connections were cut, and retries or 503s happened.
        logs = nodes[0].logs() + nodes[1].logs()
        assert terminated > 0
        assert "database busy or unreachable; retrying" in logs or codes[503] or statuses[503], logs[-3000:]
        assert "unhandled error" not in logs and "task failed unexpectedly" not in logs, logs[-3000:]
    finally:
        for node in nodes:
            node.stop()
