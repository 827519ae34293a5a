"""Node loss under load (issue 24, acceptance 5): the production shape as real processes.

Two API nodes and a standalone worker, each with its own data directory, share one PostgreSQL,
Redis and S3 server; every node is started from the Kubernetes manifests (tests/cluster/nodes.py).
200 async tasks are submitted over both API nodes with a webhook endpoint on the key. Mid-run the
worker is killed with SIGKILL and a new one started; mid-submission one API node is killed too.

What must hold afterwards, counted rather than timed:
- every task the database holds ended: ``succeeded``, or ``failed`` with ``task_interrupted``
  (a task whose upstream call was dispatched when its worker died is never run again);
- no request id reached the upstream twice;
- each ended task's webhook event arrived, under one webhook-id (redeliveries of one event share
  it, so a receiver that dedupes on webhook-id sees each event exactly once);
- the ledger is exact in PostgreSQL: Σ rows = Σ keys' spend, each row priced from its tokens, no
  hold left, and the succeeded tasks are exactly the billed rows.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.books import ledger_violations, open_tasks, query
from bench.traffic import GEN, create_key
from tests.cluster.nodes import Launcher, Node, deep_merge, service_config, service_secrets
from tests.conftest import ADMIN_KEY
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.s3_server import FakeS3
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.services import fresh_postgres_database, require_redis

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

TASKS = 200
UPSTREAM_DELAY_S = 0.2
TERMINAL = {"succeeded", "failed"}
PEPPER = "cluster-pepper-" + "0123456789abcdef" * 2


def launcher(upstream: FakeOpenAI, s3: FakeS3, root: Path, db_url: str) -> Launcher:
    config = service_config(s3=s3, upstream=upstream, redis_prefix=f"gw:test:{secrets.token_hex(6)}:")
    config["upstreams"][0].update(timeout_s=2, connect_timeout_s=2)
    config["storage"]["bucket"] = "cluster"
    settings = {
        # Dead holds (a submission cut by the API node's kill) go 5 s after they were taken (the
        # shortest TTL the config takes: longer than a request can live with these deadlines); a
        # dead worker's lease lapses after 2 s.
        "billing": {"hold_ttl_s": 5, "reconcile_every_s": 0.25},
        "server": {"body_deadline_s": 1, "shutdown_grace_s": 0},
        "retry": {"initial_delay_s": 0.01, "max_delay_s": 0.05, "deadline_s": 1},
        # API nodes take no tasks (the ConfigMap's tasks.workers: 0); a worker runs 8 at once.
        "tasks": {"concurrency": 8, "lease_s": 2, "poll_s": 0.1},
        "webhooks": {"initial_backoff_s": 0.1, "max_backoff_s": 0.5, "poll_s": 0.05},
    }
    keys = service_secrets(
        database_url=db_url,
        redis_url=require_redis(),
        upstream=upstream,
        # What every node of a cluster shares (README: production shape): a key made on one node
        # is checked on another, and results live in the object store, so every node serves (and
        # renders events of) every task.
        key_pepper=PEPPER,
        signing_key="cluster-signing-" + "0123456789abcdef" * 2,
    )
    return Launcher(root, secrets=keys, config=deep_merge(config, settings))


def wait_until(condition: Any, timeout: float, what: str) -> None:
    """Bounds a failure only: the condition is what the test waits for."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


async def submit_all(nodes: list[str], key: str, *, kill_after: int, victim: Node) -> list[str]:
    """Submit TASKS tasks round-robin over ``nodes``; ``victim`` is killed once ``kill_after`` tasks
    were accepted. Returns the ids of the accepted tasks (a 202 read in full)."""
    accepted: list[str] = []
    killed = asyncio.Event()

    async def one(client: httpx.AsyncClient, index: int) -> None:
        base = nodes[index % len(nodes)]
        try:
            answer = await client.post(
                base + GEN,
                params={"async": "true"},
                json={"model": "gpt-image-1", "prompt": f"node loss {index}", "quality": "low"},
                headers={"Authorization": f"Bearer {key}"},
            )
        except httpx.TransportError:
            assert killed.is_set() and base == victim.url, f"a live node dropped submission {index}"
            return
        if answer.status_code == 202:
            accepted.append(answer.json()["id"])
            if len(accepted) == kill_after and not killed.is_set():
                killed.set()
                victim.kill()
        else:
            assert killed.is_set() and base == victim.url, (answer.status_code, answer.text)

    async with httpx.AsyncClient(timeout=60) as client:
        semaphore = asyncio.Semaphore(8)

        async def bounded(index: int) -> None:
            async with semaphore:
                await one(client, index)

        await asyncio.gather(*(bounded(i) for i in range(TASKS)))
    assert killed.is_set(), "the API node was never killed"
    return accepted


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def s3() -> Iterator[FakeS3]:
    with FakeS3() as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver().start()
    yield hook
    hook.stop()


def test_node_loss_under_load_loses_nothing(
    upstream: FakeOpenAI, s3: FakeS3, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    upstream.always_fail = Fault.delay(UPSTREAM_DELAY_S)
    with fresh_postgres_database() as db_url:
        nodes = launcher(upstream, s3, tmp_path, db_url)
        nodes.migrate()
        try:
            api_a, api_b = nodes.api("a", ready=False), nodes.api("b", ready=False)
            workers: list[Node] = []
            try:
                api_a.wait_ready()
                api_b.wait_ready()
                key, key_id = create_key(api_a.url, ADMIN_KEY)
                hooked = httpx.post(
                    api_a.url + f"/admin/keys/{key_id}/webhooks",
                    json={"url": receiver.url, "description": "node loss"},
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                )
                assert hooked.status_code == 201, hooked.text
                receiver.secret = hooked.json()["secret"]

                workers.append(nodes.worker("w1"))
                # API node B dies after a quarter of the tasks were accepted; submissions in flight to it
                # are cut (the client sees a transport error, and the task may or may not exist).
                accepted = asyncio.run(
                    submit_all([api_a.url, api_b.url], key, kill_after=TASKS // 4, victim=api_b)
                )
                assert len(accepted) >= TASKS // 2, f"only {len(accepted)} tasks were accepted"

                # The worker dies while it has calls in flight at the upstream; another takes over.
                wait_until(lambda: upstream.in_flight > 0, 60, "the worker to call the upstream")
                in_flight_at_kill = upstream.in_flight
                workers[0].kill()
                assert open_tasks(db_url) > 0, "the worker's kill came too late: nothing was left to do"
                workers.append(nodes.worker("w2"))
                wait_until(lambda: open_tasks(db_url) == 0, 240, "every task to end")
                wait_until(
                    lambda: not query(db_url, "SELECT id FROM reservations"), 60, "every hold to be settled"
                )
            finally:
                for worker in workers:
                    worker.stop()
                api_b.stop()

            tasks = query(db_url, "SELECT id, request_id, status, error, cost_micros FROM tasks")
            statuses = Counter(t["status"] for t in tasks)
            assert set(statuses) <= TERMINAL, statuses
            assert set(accepted) <= {t["id"] for t in tasks}, "an accepted task was lost"
            for task in tasks:
                if task["status"] == "failed":
                    assert "task_interrupted" in str(task["error"]), task
            assert in_flight_at_kill > 0 and statuses["failed"] >= 1, "the worker's kill interrupted nothing"

            # No request reached the upstream twice.
            calls = Counter(r.headers.get("x-request-id") for r in upstream.requests if r.path == GEN)
            assert max(calls.values(), default=0) <= 1, [rid for rid, n in calls.items() if n > 1][:5]

            # The books: exact, and exactly the succeeded tasks billed.
            assert ledger_violations(db_url, [key_id], None) == []
            billed = {
                r["request_id"]: int(r["cost_micros"])
                for r in query(
                    db_url, "SELECT request_id, cost_micros FROM ledger_entries WHERE cost_micros > 0"
                )
            }
            succeeded = {t["request_id"]: int(t["cost_micros"]) for t in tasks if t["status"] == "succeeded"}
            assert billed == succeeded
            # What the node losses may have cost the operator: one row per interrupted task, free to
            # the tenant, carrying its reservation as the upper bound, and summed by /admin/usage.
            rows = query(
                db_url,
                "SELECT request_id, cost_micros, operator_cost_micros, reserved_micros, estimated "
                "FROM ledger_entries WHERE status = 'interrupted'",
            )
            interrupted = {t["request_id"] for t in tasks if t["status"] == "failed"}
            assert {r["request_id"] for r in rows} == interrupted
            assert all(int(r["cost_micros"]) == 0 and r["estimated"] for r in rows)
            assert all(int(r["operator_cost_micros"]) == int(r["reserved_micros"]) > 0 for r in rows)
            report = httpx.get(
                api_a.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
            ).json()
            assert report["totals"]["operator_cost_micros"] == sum(
                int(r["operator_cost_micros"]) for r in rows
            )

            # Each ended task's event arrived, and all deliveries of one event share one webhook-id.
            ended = {t["id"]: t["status"] for t in tasks}
            try:
                wait_until(
                    lambda: {r.event["data"]["id"] for r in receiver.received if r.verified} >= set(ended),
                    120,
                    "every task's webhook",
                )
            except AssertionError:
                got = {r.event["data"]["id"] for r in receiver.received if r.verified}
                rows = query(db_url, "SELECT task_id, status, attempts, last_error FROM webhook_deliveries")
                missing = [r for r in rows if r["task_id"] not in got]
                raise AssertionError(
                    f"{len(got)} of {len(ended)} tasks' events arrived; {len(receiver.received)} deliveries; "
                    f"{len(rows)} outbox rows, {Counter(r['status'] for r in rows)}; "
                    f"missing e.g. {missing[:3]}; "
                    f"tasks without an outbox row: {len(set(ended) - {r['task_id'] for r in rows})}"
                ) from None
            finally:
                api_a.stop()
            ids_per_task: dict[str, set[str]] = defaultdict(set)
            for got in receiver.received:
                assert got.verified, "a delivery failed its signature"
                event = got.event
                assert event["type"] == f"image.task.{ended[event['data']['id']]}"
                ids_per_task[event["data"]["id"]].add(got.headers["webhook-id"])
            assert all(len(ids) == 1 for ids in ids_per_task.values()), "one event under two webhook-ids"
            redelivered = len(receiver.received) - len(ids_per_task)
            print(
                f"node loss: {len(accepted)} accepted, {statuses['succeeded']} succeeded, "
                f"{statuses['failed']} interrupted, {redelivered} redeliveries of one webhook-id"
            )
        finally:
            nodes.stop_all()  # whatever the test left running when it failed
