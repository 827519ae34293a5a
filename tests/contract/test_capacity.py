"""Capacity (issue 16): honest upstream limits and many tasks in flight, proven by counting.

The fake upstream's gate holds every image request until N requests are in flight at once, so the
count it reports (`max_in_flight`) is how much work the gateway really held in flight; nothing here
measures time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from tests.conftest import ADMIN_KEY, Gateway, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI

GEN = "/v1/images/generations"
BODY = {"model": "gpt-image-1", "prompt": "capacity", "quality": "low"}


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


async def _post_many(
    url: str, key: str, n: int, params: dict[str, str] | None = None
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def post(i: int) -> httpx.Response:
            # A 503 with retry-after (the database busy on a loaded box) is retried, as the SDKs do.
            for _ in range(5):
                answer = await client.post(
                    url + GEN,
                    params=params,
                    json={**BODY, "prompt": f"capacity {i}"},
                    headers={"Authorization": f"Bearer {key}"},
                )
                if answer.status_code != 503 or "retry-after" not in answer.headers:
                    break
                await asyncio.sleep(min(float(answer.headers["retry-after"]), 5.0))
            return answer

        return await asyncio.gather(*(post(i) for i in range(n)))


def test_300_sync_requests_without_max_concurrency_are_all_in_flight_at_once(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream, timeout_s=300))
    key, _ = gw.create_key(name="many")
    # Held until 300 are in flight together; a pool capped at 100 would never get there.
    upstream.hold(300, timeout_s=120)
    answers = asyncio.run(_post_many(gw.url, key, 300))
    assert [a.status_code for a in answers] == [200] * 300
    assert upstream.max_in_flight >= 100
    assert upstream.max_in_flight == 300


def test_a_capped_upstream_queues_then_answers_busy_with_retry_after(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream, max_concurrency=2, queue_timeout_s=30))
    key, _ = gw.create_key(name="capped")
    upstream.hold(10_000, timeout_s=60)  # held until released

    async def scenario() -> list[httpx.Response]:
        pending = asyncio.ensure_future(_post_many(gw.url, key, 3))
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(1500):
                listed = (await client.get(gw.url + "/admin/upstreams", headers=admin)).json()
                (fake,) = listed["data"]
                if fake["waiting"]["request"] == 1 and fake["in_flight"] == 2:
                    break
                await asyncio.sleep(0.02)
            assert fake["max_concurrency"] == 2
            assert fake["waiting"] == {"request": 1, "task": 0}, fake
            metrics = (await client.get(gw.url + "/metrics")).text
            assert 'gateway_upstream_waiting{source="request",upstream="fake"} 1.0' in metrics
        assert upstream.in_flight == 2  # the cap holds: the third never reached the upstream
        upstream.release()
        return await pending

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200] * 3
    assert upstream.max_in_flight == 2


def test_a_full_upstream_answers_its_busy_status_when_the_wait_runs_out(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream, max_concurrency=1, queue_timeout_s=0, busy_status=429))
    key, key_id = gw.create_key(name="busy")
    upstream.hold(10_000, timeout_s=60)

    async def scenario() -> httpx.Response:
        first = asyncio.ensure_future(_post_many(gw.url, key, 1))
        assert await asyncio.to_thread(wait_until, lambda: upstream.in_flight == 1)
        (busy,) = await _post_many(gw.url, key, 1)
        upstream.release()
        (ok,) = await first
        assert ok.status_code == 200
        return busy

    busy = asyncio.run(scenario())
    assert busy.status_code == 429, busy.text
    assert busy.json()["error"]["code"] == "rate_limit_exceeded"
    assert busy.json()["error"]["type"] == "rate_limit_error"
    assert int(busy.headers["retry-after"]) >= 1
    assert "fake" not in busy.text and upstream.url not in busy.text
    # Nothing was charged for the refused call, and no hold is left behind.
    assert len([r for r in gw.ledger() if r["key_id"] == key_id]) == 1
    assert int(gw.key_row(key_id)["reserved_micros"]) == 0
    # Our own cap is not the upstream's failure: its breaker stays closed.
    listed = gw.admin("GET", "/admin/upstreams").json()["data"][0]
    assert listed["state"] == "closed" and listed["consecutive_failures"] == 0


def test_200_async_tasks_run_at_once_in_one_process(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream, timeout_s=300), tasks={"poll_s": 0.1})
    key, key_id = gw.create_key(name="async-many")
    # Two worker loops running a task each (the old design) would never get 100 in flight.
    upstream.hold(150, timeout_s=120)
    submitted = asyncio.run(_post_many(gw.url, key, 200, params={"async": "true"}))
    assert [s.status_code for s in submitted] == [202] * 200
    ids = [s.json()["id"] for s in submitted]
    assert wait_until(
        lambda: gw.query("SELECT COUNT(*) AS n FROM tasks WHERE status = 'succeeded'")[0]["n"] == 200,
        timeout=240,
    ), gw.query("SELECT status, error, COUNT(*) AS n FROM tasks GROUP BY status, error")
    assert upstream.max_in_flight >= 100
    rows = gw.query("SELECT id, attempts FROM tasks")
    assert sorted(r["id"] for r in rows) == sorted(ids) and {r["attempts"] for r in rows} == {1}
    billed = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert len(billed) == 200 and {r["status"] for r in billed} == {"succeeded"}
    assert int(gw.key_row(key_id)["spent_micros"]) == sum(int(r["cost_micros"]) for r in billed)
    assert int(gw.key_row(key_id)["reserved_micros"]) == 0


def test_the_pool_renews_the_lease_of_a_task_running_longer_than_lease_s(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    # lease_s 12: renewed every 4 s, so a loaded box has 8 s of slack before a lease lapses (with
    # lease_s 4 a run at load 23 lost the lease: the renewal loop waited over 2.7 s for the CPU).
    gw = gateway_with(fake_upstream_config(upstream, timeout_s=300), tasks={"lease_s": 12, "poll_s": 0.05})
    key, _ = gw.create_key(name="long-task")
    upstream.hold(10_000, timeout_s=60)  # the task runs until the test releases it
    (submitted,) = asyncio.run(_post_many(gw.url, key, 1, params={"async": "true"}))
    task_id = submitted.json()["id"]
    assert upstream.wait_for_count(1, path=GEN, timeout=20)

    def lease_row() -> dict[str, object]:
        (row,) = gw.query(f"SELECT * FROM tasks WHERE id = '{task_id}'")
        return row

    first_lease = str(lease_row()["lease_until"])
    # Wait (on the database, not a timer) until the lease was renewed past two original leases
    # (lease_s 12: the lease alone would have lapsed at started + 12 s).
    started = str(lease_row()["started_at"])
    assert wait_until(
        lambda: (
            gw.query(
                f"SELECT COUNT(*) AS n FROM tasks WHERE id = '{task_id}' "
                f"AND julianday(lease_until) - julianday('{started}') > 24.0 / 86400"
            )[0]["n"]
            == 1
        ),
        timeout=180,
    )
    row = lease_row()
    assert str(row["lease_until"]) > first_lease
    assert row["status"] == "in_progress" and row["attempts"] == 1
    upstream.release()
    assert wait_until(lambda: lease_row()["status"] == "succeeded", timeout=30), lease_row()
    assert lease_row()["attempts"] == 1
    assert upstream.count(GEN) == 1  # never taken (and sent) twice


def test_max_queued_tasks_answers_429_with_retry_after_and_holds_nothing(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream), tasks={"workers": 0})
    key, key_id = gw.create_key(name="queue-cap", max_queued_tasks=3)
    assert gw.admin("GET", f"/admin/keys/{key_id}").json()["max_queued_tasks"] == 3
    answers = asyncio.run(_post_many(gw.url, key, 3, params={"async": "true"}))
    assert [a.status_code for a in answers] == [202] * 3
    reserved = int(gw.key_row(key_id)["reserved_micros"])
    (full,) = asyncio.run(_post_many(gw.url, key, 1, params={"async": "true"}))
    assert full.status_code == 429, full.text
    assert full.json()["error"]["code"] == "rate_limit_exceeded"
    assert full.json()["error"]["type"] == "rate_limit_error"
    assert int(full.headers["retry-after"]) >= 1
    assert int(gw.key_row(key_id)["reserved_micros"]) == reserved  # the refused task's hold is gone
    other, _ = gw.create_key(name="other-tenant")
    (fine,) = asyncio.run(_post_many(gw.url, other, 1, params={"async": "true"}))
    assert fine.status_code == 202
    changed = gw.admin(
        "PATCH", f"/admin/keys/{key_id}", json={"max_queued_tasks": None, "max_tasks_in_flight": 2}
    )
    assert changed.status_code == 200 and changed.json()["max_tasks_in_flight"] == 2
