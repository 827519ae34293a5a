"""Load with upstream faults (issue 10): a bounded mixed run against a gateway process.

About 2,000 requests (generations, streams, edits, url results, async tasks) at concurrency 50, while
the fake upstream misbehaves on ~5 % of its calls with every fault kind it has (errors, delays, hangs,
dropped connections, invalid JSON, cut streams). Afterwards:

- no 5xx but the documented upstream ones, and every error OpenAI-shaped;
- the ledger invariant holds exactly: Σ ledger costs = Σ keys' spend = the catalog price of the usage
  the fake reported for the requests the clients saw complete; nothing stays reserved;
- no upload spool or task input file is left, no task is stuck (each one succeeded or failed);
- the gateway's resident memory after the run is at most 1.2 × what it was after a warm-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.books import expected_micros, ledger_violations, leftover_files, open_tasks
from bench.gateway_process import GatewayProcess, rss_kib
from bench.traffic import Traffic, create_key, summary
from tests.conftest import ADMIN_KEY
from tests.fakes.openai_upstream import FakeOpenAI
from tests.reliability.harness import gateway_config, inject_faults

WARM_UP = 400
REQUESTS = 2000
CONCURRENCY = 50
FAULT_RATE = 0.05


@pytest.fixture
def process(upstream: FakeOpenAI, tmp_path: Path) -> Iterator[tuple[GatewayProcess, Path, str]]:
    data_dir = tmp_path / "data"
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'load.db'}"
    gateway = GatewayProcess(gateway_config(upstream, data_dir, db_url), tmp_path).wait_ready()
    yield gateway, data_dir, db_url
    gateway.stop()


def test_mixed_load_with_upstream_faults_keeps_the_books_exact(
    process: tuple[GatewayProcess, Path, str], upstream: FakeOpenAI
) -> None:
    gateway, data_dir, db_url = process
    key, key_id = create_key(gateway.url, ADMIN_KEY)
    inject_faults(upstream, FAULT_RATE, seed=10)
    traffic = Traffic(gateway.url, key, seed=10)

    # Warm-up at full concurrency: pools, caches and the allocator reach their working size first.
    asyncio.run(traffic.run(requests=WARM_UP, concurrency=CONCURRENCY))
    rss_before = rss_kib(gateway.proc.pid)
    asyncio.run(traffic.run(requests=REQUESTS, concurrency=CONCURRENCY))
    stuck = asyncio.run(traffic.settle_tasks())
    rss_after = rss_kib(gateway.proc.pid)

    outcomes = traffic.outcomes
    described = summary(outcomes)
    fired = sum(f.fired for f in upstream.random_faults)
    assert fired >= 0.02 * len(outcomes), f"only {fired} faults fired: {described}"
    assert not stuck, f"tasks never finished: {[o.task_id for o in stuck]}"
    assert open_tasks(db_url) == 0
    bad = [o for o in outcomes if o.unexpected_5xx or o.status == 0 or not o.body_ok]
    assert not bad, f"{len(bad)} bad answers, e.g. {bad[:3]}; all: {described}"
    succeeded = [o for o in outcomes if o.completed]
    assert len(succeeded) >= 0.9 * len(outcomes), described
    assert ledger_violations(db_url, [key_id], expected_micros(outcomes)) == []
    assert leftover_files(data_dir) == []
    assert rss_after <= 1.2 * rss_before, f"RSS grew from {rss_before} KiB to {rss_after} KiB"
