"""Crash consistency (issue 10): SIGKILL the gateway, or a standalone worker, at random points of a
stream of requests, restart it, and check that the books and the queue come back consistent.

After the last restart:
- every hold of a request that died with its process is released (by the reconciler, once
  ``billing.hold_ttl_s`` has passed) or was settled: nothing stays reserved;
- every task ends, succeeded or failed; a task cut off after its upstream call was dispatched is
  failed as ``task_interrupted``, uncharged, and never run again (the upstream may have done the work);
- Σ ledger costs = Σ keys' spend, and every request a client saw complete (a 200 read to its end, a
  stream read to its normal end, a task read as succeeded) has its ledger row at the catalog price of
  the usage that client saw.

The one window where a completed upstream call goes unbilled, by design: between the upstream's answer
and the commit of its settlement (ledger row, charge, release, and for a task its outcome, all in one
transaction). A kill in that window loses the charge; it never produces a charge without its row, nor
a second charge: a synchronous request's client sees no answer (the response is only sent after the
commit), and a task keeps its ``dispatched_at`` mark and is failed uncharged instead of re-run. The
tests measure that window (answers the fake delivered minus rows billed) rather than assert it empty.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.books import ledger_violations, leftover_files, open_tasks, usage_cost
from bench.gateway_process import GatewayProcess
from bench.traffic import EDIT, GEN, Outcome, Traffic, create_key, summary
from tests.conftest import ADMIN_KEY, ROOT, migrate, query
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.reliability.harness import gateway_config
from tests.services import fresh_postgres_database

KILLS = 3
# Every upstream call takes this long, so that each kill finds calls in flight.
UPSTREAM_DELAY_S = 0.3


def crash_config(upstream: FakeOpenAI, tmp_path: Path, db_url: str, *, workers: int = 2) -> dict[str, Any]:
    return gateway_config(
        upstream,
        tmp_path / "data",
        db_url,
        # Holds of dead requests are released 5 s after they were taken, checked 4 times a second
        # (the settings refuse a TTL a live request could outlast: here body 1 s + retries 1 s + a
        # 2 s upstream timeout, no shutdown grace); a dead worker's task lease lapses after 2 s.
        billing={"hold_ttl_s": 5, "reconcile_every_s": 0.25},
        server={"body_deadline_s": 1, "shutdown_grace_s": 0},
        retry={"initial_delay_s": 0.01, "max_delay_s": 0.05, "deadline_s": 1},
        tasks={"workers": workers, "lease_s": 2, "poll_s": 0.1},
    )


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def orphaned_submission_holds(db_url: str) -> list[str]:
    """Holds no task and no ledger row references. An async submission cut by a kill between its
    reservation and its task insert leaves one; no task owns it, so the reconciler releases it
    after the hold TTL like any other dead hold: none may remain."""
    return []


def dead_holds_released(db_url: str) -> bool:
    tolerated = set(orphaned_submission_holds(db_url))
    held = {r["id"] for r in query(db_url, "SELECT id FROM reservations")}
    return held <= tolerated


def inputs_of_ended_tasks(db_url: str, data_dir: Path) -> list[Path]:
    ended = {t["id"] for t in query(db_url, "SELECT id FROM tasks WHERE status IN ('succeeded', 'failed')")}
    return [p for p in leftover_files(data_dir) if p.parent.name in ended]


def check_completed_requests_are_billed(db_url: str, outcomes: list[Outcome]) -> None:
    """Each request whose client saw it complete has one ledger row, at the price of what it saw."""
    rows = query(db_url, "SELECT request_id, cost_micros, images FROM ledger_entries")
    by_request = Counter(r["request_id"] for r in rows)
    assert max(by_request.values(), default=0) <= 1, "a request was settled twice"
    cost = {r["request_id"]: int(r["cost_micros"]) for r in rows}
    for outcome in outcomes:
        if outcome.completed:
            assert outcome.request_id in cost, f"completed but unbilled: {outcome}"
            assert cost[outcome.request_id] == sum(usage_cost(u) for u in outcome.completed), outcome


def check_tasks(db_url: str) -> list[dict[str, Any]]:
    """Every task ended; failures are interruptions, uncharged; successes are billed once."""
    tasks = query(db_url, "SELECT id, request_id, status, error, cost_micros FROM tasks")
    assert {t["status"] for t in tasks} <= {"succeeded", "failed"}, Counter(t["status"] for t in tasks)
    ledger = {r["request_id"]: r for r in query(db_url, "SELECT request_id, cost_micros FROM ledger_entries")}
    for task in tasks:
        billed = ledger.get(task["request_id"])
        if task["status"] == "failed":
            assert "task_interrupted" in str(task["error"]), task
            assert int(task["cost_micros"]) == 0 and (billed is None or int(billed["cost_micros"]) == 0)
        else:
            assert billed is not None and int(billed["cost_micros"]) == int(task["cost_micros"]) > 0, task
    return tasks


def upstream_window(upstream: FakeOpenAI, db_url: str) -> tuple[int, int]:
    """(answers the fake delivered, of those the ones billed). Each upstream call is made at most once
    per request id; the difference is the unbilled window described above."""
    calls = Counter(r.headers.get("x-request-id") for r in upstream.requests if r.path in (GEN, EDIT))
    calls.subtract(Counter(rid for path, rid in upstream.abandoned if path in (GEN, EDIT)))
    delivered = {rid for rid, n in calls.items() if n > 0}
    assert max(calls.values(), default=0) <= 1, "an upstream call was completed twice for one request"
    billed = {
        r["request_id"] for r in query(db_url, "SELECT request_id FROM ledger_entries WHERE images > 0")
    }
    assert billed <= delivered, f"billed without an upstream answer: {billed - delivered}"
    return len(delivered), len(billed)


def test_sigkill_of_the_gateway_mid_traffic(upstream: FakeOpenAI, tmp_path: Path) -> None:
    upstream.always_fail = Fault.delay(UPSTREAM_DELAY_S)
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}"
    config = crash_config(upstream, tmp_path, db_url)
    rng = random.Random(20)
    gateway = GatewayProcess(config, tmp_path).wait_ready()
    key, key_id = create_key(gateway.url, ADMIN_KEY)
    traffic = Traffic(gateway.url, key, seed=20)
    killed_in_flight = 0

    async def until_killed(process: GatewayProcess) -> None:
        nonlocal killed_in_flight
        run = asyncio.ensure_future(traffic.run(seconds=60, concurrency=16))
        await asyncio.sleep(rng.uniform(0.8, 2.0))
        killed_in_flight += upstream.in_flight
        process.kill()
        traffic.stopped = True
        await run
        traffic.stopped = False

    try:
        for _ in range(KILLS):
            asyncio.run(until_killed(gateway))
            gateway = GatewayProcess(config, tmp_path).wait_ready()
            traffic.base_url = gateway.url
        # The restarted gateway serves, finishes or fails every task, and releases every dead hold.
        # The spool folders of uploads cut off by a kill, and the inputs of an async edit killed
        # between moving them and committing its task, are the orphan sweep's once they are older
        # than uploads.orphan_age_s / tasks.inputs_orphan_age_s (far longer than this test): what is
        # checked is that nothing new is left after restart, and that the sweep at start removes
        # the inputs of tasks that had finished (a kill between the outcome and the removal).
        spooled_at_restart = leftover_files(tmp_path / "data")
        asyncio.run(traffic.run(requests=20, concurrency=4))
        stuck = asyncio.run(traffic.settle_tasks(timeout_s=60))
        assert not stuck, [o.task_id for o in stuck]
        wait_until(lambda: dead_holds_released(db_url), 30, "the reconciler to release dead holds")
        wait_until(
            lambda: not inputs_of_ended_tasks(db_url, tmp_path / "data"),
            30,
            "the inputs of ended tasks to be removed",
        )
    finally:
        gateway.stop()

    assert killed_in_flight > 0, "no kill found an upstream call in flight"
    assert open_tasks(db_url) == 0
    assert any(o.status == 0 for o in traffic.outcomes), "no request was cut by a kill"
    check_tasks(db_url)
    check_completed_requests_are_billed(db_url, traffic.outcomes)
    tolerated = orphaned_submission_holds(db_url)
    assert ledger_violations(db_url, [key_id], None, tolerated_holds=tolerated) == [], summary(
        traffic.outcomes
    )
    left = leftover_files(tmp_path / "data")
    assert set(left) <= set(spooled_at_restart), "requests after the restart left files behind"
    assert not inputs_of_ended_tasks(db_url, tmp_path / "data"), "inputs of ended tasks were kept"
    delivered, billed = upstream_window(upstream, db_url)
    assert billed >= sum(1 for o in traffic.outcomes if o.completed)
    print(f"crash window: {delivered - billed} of {delivered} delivered upstream answers unbilled")


@pytest.mark.postgres
def test_sigkill_of_a_standalone_worker(upstream: FakeOpenAI, tmp_path: Path) -> None:
    upstream.always_fail = Fault.delay(UPSTREAM_DELAY_S)
    rng = random.Random(21)
    with fresh_postgres_database() as db_url:
        migrate(db_url)
        api_config = crash_config(upstream, tmp_path, db_url, workers=0)
        worker_config = tmp_path / "worker.yaml"
        worker_config.write_text(yaml.safe_dump(crash_config(upstream, tmp_path, db_url)))
        api = GatewayProcess(api_config, tmp_path).wait_ready()
        worker: subprocess.Popen[bytes] | None = None
        try:
            key, key_id = create_key(api.url, ADMIN_KEY)
            traffic = Traffic(api.url, key, seed=21)
            traffic.MIX = (("async_generate", 3), ("async_edit", 1))
            asyncio.run(traffic.run(requests=80, concurrency=8))
            assert all(o.task_id for o in traffic.outcomes), summary(traffic.outcomes)
            for _ in range(KILLS):
                worker = start_worker(worker_config)
                # Once it is at work (upstream calls in flight), at a random point of its calls.
                wait_until(lambda: upstream.in_flight > 0, 30, "the worker to call the upstream")
                time.sleep(rng.uniform(0, 2 * UPSTREAM_DELAY_S))
                worker.kill()
                worker.wait(10)
            assert open_tasks(db_url) > 0, "the kills came too late: the queue was already empty"
            worker = start_worker(worker_config)
            stuck = asyncio.run(traffic.settle_tasks(timeout_s=90))
            assert not stuck, [o.task_id for o in stuck]
            wait_until(lambda: dead_holds_released(db_url), 30, "every task hold to be settled or released")
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(30)
            api.stop()

        tasks = check_tasks(db_url)
        assert any(t["status"] == "failed" for t in tasks), "no kill interrupted a dispatched task"
        check_completed_requests_are_billed(db_url, traffic.outcomes)
        assert ledger_violations(db_url, [key_id], None) == []
        delivered, billed = upstream_window(upstream, db_url)
        assert billed == sum(1 for t in tasks if t["status"] == "succeeded")
        print(f"crash window: {delivered - billed} of {delivered} delivered upstream answers unbilled")
        assert not list((tmp_path / "data" / "task_inputs").rglob("*-*")), "inputs of ended tasks left"


def start_worker(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", "--config", str(config), "worker", "--concurrency", "3"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
