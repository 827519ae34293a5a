"""PgBouncer in transaction mode (issue 24): the answer for many nodes on one PostgreSQL.

A real pgbouncer (Debian's package) in front of the test PostgreSQL, with fewer server connections
than the gateway's pool asks for; the gateway runs with `database.pgbouncer: true` (asyncpg keeps
no prepared statements across transactions, which transaction pooling would hand to another
client). Sync requests and async tasks all succeed and the books are exact. (The same run with
`pgbouncer: false` was seen to fail: 500s from asyncpg's prepared statements landing on another
client's server connection; so the setting is what makes it pass.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.books import ledger_violations, query
from bench.gateway_process import GatewayProcess, reserve_port
from bench.traffic import create_key
from tests.conftest import ADMIN_KEY, migrate
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.reliability.harness import gateway_config
from tests.services import fresh_postgres_database, unavailable

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
GEN = "/v1/images/generations"


@pytest.fixture
def pgbouncer() -> Iterator[int]:
    if not Path(PGBOUNCER).exists():
        unavailable("pgbouncer", FileNotFoundError(PGBOUNCER))  # CI fails: .ci/run installs it
    port = reserve_port()
    # Outside pytest's private tmp tree, which the postgres user (below) cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="gw-pgbouncer-"))
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n* = host=127.0.0.1 port=5432 user=postgres\n"
        "[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        f"listen_port = {port}\nauth_type = any\npool_mode = transaction\n"
        # Fewer server connections than the gateway's pool: they are shared per transaction.
        "default_pool_size = 3\nmax_client_conn = 200\nunix_socket_dir =\n"
        f"logfile = {folder / 'pgbouncer.log'}\npidfile = {folder / 'pgbouncer.pid'}\n"
    )
    command = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        shutil.chown(folder, "postgres")
        command[1:1] = ["-u", "postgres"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in _read(folder / "pgbouncer.log"):
            assert process.poll() is None and time.monotonic() < deadline, _read(folder / "pgbouncer.log")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_gateway_through_pgbouncer_transaction_mode(
    upstream: FakeOpenAI, tmp_path: Path, pgbouncer: int
) -> None:
    upstream.always_fail = Fault.delay(0.05)
    with fresh_postgres_database() as direct:
        migrate(direct)  # migrations go to PostgreSQL itself, as README says
        name = direct.rsplit("/", 1)[1]
        bounced = f"postgresql+asyncpg://postgres@127.0.0.1:{pgbouncer}/{name}"
        config = gateway_config(
            upstream,
            tmp_path / "data",
            bounced,
            database={"url": bounced, "pgbouncer": True, "pool_size": 8, "max_overflow": 4},
            tasks={"workers": 1, "concurrency": 16, "poll_s": 0.1},
        )
        gateway = GatewayProcess(config, tmp_path).wait_ready()
        try:
            key, key_id = create_key(gateway.url, ADMIN_KEY)
            headers = {"authorization": f"Bearer {key}"}
            body = {"model": "gpt-image-1", "prompt": "a lighthouse", "size": "1024x1024"}
            answers: list[httpx.Response] = []
            lock = threading.Lock()

            def call(suffix: str) -> None:
                answer = httpx.post(gateway.url + GEN + suffix, json=body, headers=headers, timeout=120)
                with lock:
                    answers.append(answer)

            threads = [
                threading.Thread(target=call, args=("" if i % 2 else "?async=true",)) for i in range(24)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert sorted(a.status_code for a in answers) == [200] * 12 + [202] * 12, [
                a.text for a in answers if a.status_code >= 400
            ]
            deadline = time.monotonic() + 120
            while query(direct, "SELECT COUNT(*) AS n FROM tasks WHERE status <> 'succeeded'")[0]["n"]:
                failed = query(direct, "SELECT error FROM tasks WHERE status = 'failed'")
                assert not failed, failed
                assert time.monotonic() < deadline, "tasks did not finish"
                time.sleep(0.1)
            assert ledger_violations(direct, [key_id], None) == []
            assert len(query(direct, "SELECT request_id FROM ledger_entries WHERE images > 0")) == 24
            assert "prepared statement" not in gateway.logs()
        finally:
            gateway.stop()
