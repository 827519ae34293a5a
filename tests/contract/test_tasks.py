"""Asynchronous tasks and response_format=url (SPEC §6, §8; issue 6)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import openai
import pytest

from bench.gateway_process import GatewayProcess
from tests.conftest import (
    ADMIN_KEY,
    Gateway,
    fake_upstream_config,
    make_settings,
    migrate,
    query,
    start_gateway,
)
from tests.fakes import image_files as files
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.s3_server import FakeS3
from tests.services import fresh_postgres_database

GEN = "/v1/images/generations"
ASYNC = {"async": "true"}


def poll(client: openai.OpenAI, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task = client.get(f"/tasks/{task_id}", cast_to=object)
        assert isinstance(task, dict)
        if task["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return task
        time.sleep(0.05)


def test_async_generation_through_the_sdk(gateway: Gateway, upstream: FakeOpenAI) -> None:
    client = gateway.client()
    raw = client.images.with_raw_response.generate(
        model="gpt-image-1", prompt="a kite", n=2, extra_query=ASYNC
    )
    assert raw.status_code == 202
    submitted = raw.http_response.json()
    assert submitted["object"] == "image.task" and submitted["status"] == "queued"
    assert submitted["id"] == submitted["task_id"] and submitted["id"].startswith("task_")
    assert raw.headers["location"] == f"/v1/tasks/{submitted['id']}"
    assert raw.headers["retry-after"] == "1"

    task = poll(client, submitted["id"])
    assert task["status"] == "succeeded", task
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    images = [base64.b64decode(item["b64_json"]) for item in task["result"]["data"]]
    assert len(images) == 2 and all(image.startswith(b"\x89PNG") for image in images)
    assert task["result"]["usage"]["total_tokens"] == upstream.usage["total_tokens"]
    reread = httpx.get(
        gateway.url + f"/v1/tasks/{submitted['id']}", headers={"Authorization": f"Bearer {client.api_key}"}
    )
    assert reread.headers["cache-control"] == "no-store"


def test_async_edit_with_url_results_match_the_upstream(gateway: Gateway, upstream: FakeOpenAI) -> None:
    client = gateway.client()
    source = files.png(128, 128)
    raw = client.images.with_raw_response.edit(
        model="gpt-image-1",
        image=[("a.png", source, "image/png"), ("b.png", source, "image/png")],
        prompt="x",
        response_format="url",
        extra_query=ASYNC,
    )
    assert raw.status_code == 202
    task = poll(client, raw.http_response.json()["id"])
    assert task["status"] == "succeeded", task
    (item,) = task["result"]["data"]
    downloaded = httpx.get(item["url"])
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    assert [f.data for f in upstream.last.files_for("image[]")] == [source, source]
    assert downloaded.content.startswith(b"\x89PNG")
    assert not list((gateway.data_dir / "spool").iterdir())
    assert not list((gateway.data_dir / "task_inputs").iterdir())


def test_synchronous_url_results_download_and_match(gateway: Gateway, upstream: FakeOpenAI) -> None:
    client = gateway.client()
    as_b64 = client.images.generate(
        model="dall-e-3", prompt="same", size="1024x1024", response_format="b64_json"
    )
    as_url = client.images.generate(model="dall-e-3", prompt="same", size="1024x1024", response_format="url")
    assert as_url.data and as_url.data[0].url and as_url.data[0].b64_json is None
    assert as_url.data[0].revised_prompt
    downloaded = httpx.get(as_url.data[0].url)
    assert downloaded.status_code == 200
    assert as_b64.data and downloaded.content == base64.b64decode(as_b64.data[0].b64_json or "")
    # The query string form works too, and the body wins over it.
    by_query = client.images.generate(model="dall-e-2", prompt="q", extra_query={"response_format": "url"})
    assert by_query.data and by_query.data[0].url
    body_wins = client.images.generate(
        model="dall-e-2", prompt="q", response_format="b64_json", extra_query={"response_format": "url"}
    )
    assert body_wins.data and body_wins.data[0].b64_json and not body_wins.data[0].url


def test_links_are_signed_and_expire(gateway: Gateway, upstream: FakeOpenAI) -> None:
    client = gateway.client()
    result = client.images.generate(model="gpt-image-1", prompt="x", response_format="url")
    assert result.data and result.data[0].url
    url = urlparse(result.data[0].url)
    params = {k: v[0] for k, v in parse_qs(url.query).items()}
    base = f"{url.scheme}://{url.netloc}{url.path}"

    def fetch(path: str, **changes: str) -> httpx.Response:
        return httpx.get(f"{url.scheme}://{url.netloc}{path}?{urlencode({**params, **changes})}")

    assert fetch(url.path).status_code == 200
    tampered = fetch(url.path, sig="0" * 64)
    assert tampered.status_code == 403 and tampered.json()["error"]["code"] == "invalid_signature"
    assert fetch(url.path, expires=str(int(params["expires"]) + 60)).status_code == 403
    expired = fetch(url.path, expires="1000")
    assert expired.status_code == 403
    other_name = url.path.rsplit("/", 1)[0] + "/img_" + "0" * 32 + ".png"
    assert fetch(other_name).status_code in (403, 404)
    for traversal in ("..%2F..%2Fgateway.db", "%2e%2e%2fadmin_key", "..", "img_../../admin_key"):
        response = httpx.get(f"{url.scheme}://{url.netloc}/v1/files/images/{traversal}?{urlencode(params)}")
        # ".." is resolved by the client to /v1/files/: the Files API's listing (issue 27), which
        # wants a key (401). Nothing reaches a file outside the store either way.
        assert response.status_code in ((403, 404, 401) if traversal == ".." else (403, 404)), traversal
        assert b"sk-" not in response.content
    assert httpx.get(base).status_code == 403


def test_isolation_between_keys(gateway: Gateway, upstream: FakeOpenAI) -> None:
    owner, intruder = gateway.client(), gateway.client()
    raw = owner.images.with_raw_response.generate(model="gpt-image-1", prompt="mine", extra_query=ASYNC)
    task_id = raw.http_response.json()["id"]
    poll(owner, task_id)
    with pytest.raises(openai.NotFoundError) as caught:
        intruder.get(f"/tasks/{task_id}", cast_to=object)
    assert caught.value.code == "not_found"
    listed = intruder.get("/tasks", cast_to=object)
    assert isinstance(listed, dict) and listed["data"] == []
    mine = owner.get("/tasks", cast_to=object)
    assert isinstance(mine, dict) and [t["id"] for t in mine["data"]] == [task_id]
    with pytest.raises(openai.NotFoundError):
        owner.get("/tasks/task_doesnotexist", cast_to=object)


def test_task_list_is_newest_first_and_paginated(gateway: Gateway, upstream: FakeOpenAI) -> None:
    client = gateway.client()
    ids = [
        client.images.with_raw_response.generate(
            model="gpt-image-1", prompt=str(i), extra_query=ASYNC
        ).http_response.json()["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    after: str | None = None
    while True:
        page = client.get(
            "/tasks", cast_to=object, options={"params": {"limit": 2, **({"after": after} if after else {})}}
        )
        assert isinstance(page, dict)
        seen += [t["id"] for t in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == list(reversed(ids))
    for task_id in ids:  # let them finish here, not during the next test
        poll(client, task_id)


def test_idempotency_key_gives_one_task_and_one_charge(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gateway.create_key(name="idempotent")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "order-42"}
    body = {"model": "gpt-image-1", "prompt": "once"}
    first = httpx.post(gateway.url + GEN, params=ASYNC, json=body, headers=headers)
    second = httpx.post(gateway.url + GEN, params=ASYNC, json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    client = gateway.client(key)
    assert poll(client, first.json()["id"])["status"] == "succeeded"
    # One task row is all there is to run (nothing else can call the upstream later), and it ran once.
    tasks = gateway.query(f"SELECT id, attempts FROM tasks WHERE key_id = '{key_id}'")
    assert [(t["id"], t["attempts"]) for t in tasks] == [(first.json()["id"], 1)]
    assert [r.json["prompt"] for r in upstream.requests if r.json].count("once") == 1
    rows = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert len(rows) == 1
    key_row = gateway.key_row(key_id)
    assert (int(key_row["spent_micros"]), int(key_row["reserved_micros"])) == (int(rows[0]["cost_micros"]), 0)


def test_errors_come_back_synchronously_without_a_task(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key(name="sync-errors")
    headers = {"Authorization": f"Bearer {key}"}
    streamed = httpx.post(
        gateway.url + GEN,
        params=ASYNC,
        json={"model": "gpt-image-1", "prompt": "x", "stream": True},
        headers=headers,
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
    invalid = httpx.post(
        gateway.url + GEN, params=ASYNC, json={"model": "gpt-image-1", "prompt": ""}, headers=headers
    )
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "empty_string"
    bad_flag = httpx.post(
        gateway.url + GEN,
        params={"async": "maybe"},
        json={"model": "gpt-image-1", "prompt": "x"},
        headers=headers,
    )
    assert bad_flag.status_code == 400 and bad_flag.json()["error"]["param"] == "async"
    listed = httpx.get(gateway.url + "/v1/tasks", headers=headers).json()
    assert listed["data"] == []
    assert upstream.count() == 0


def test_a_failing_upstream_fails_the_task_without_charge(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gateway.create_key(name="fails")
    upstream.enqueue_fault(
        Fault.status(400, "rejected upstream", code="content_policy_violation", param="prompt")
    )
    client = gateway.client(key)
    raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt="x", extra_query=ASYNC)
    task = poll(client, raw.http_response.json()["id"])
    assert task["status"] == "failed"
    assert task["error"]["code"] == "content_policy_violation" and "result" not in task
    key_row = gateway.key_row(key_id)
    assert (int(key_row["spent_micros"]), int(key_row["reserved_micros"])) == (0, 0)


def test_finished_tasks_past_retention_are_purged_with_their_images(
    gateway_with: Callable[..., Gateway],
    upstream: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Batches of two, so the purge has to go round its loop to reach the fourth expired task.
    monkeypatch.setattr("app.tasks.service.PURGE_BATCH", 2)
    gw = gateway_with(fake_upstream_config(upstream), storage={"purge_interval_s": 1})
    caplog.set_level(logging.INFO, logger="app.tasks.housekeeping")
    client = gw.client()
    ids = [
        client.images.with_raw_response.generate(
            model="gpt-image-1", prompt=f"p{i}", response_format="url", extra_query=ASYNC
        ).http_response.json()["id"]
        for i in range(5)
    ]
    assert [poll(client, task_id)["status"] for task_id in ids] == ["succeeded"] * 5
    images = gw.data_dir / "images"
    assert len(list(images.iterdir())) == 5
    expired, kept = ids[:4], ids[4]
    listed = ", ".join(f"'{task_id}'" for task_id in expired)
    gw.query(f"UPDATE tasks SET finished_at = '2000-01-01 00:00:00.000000' WHERE id IN ({listed})")

    # The purge logs once it has gone round its whole loop (rows, then their images, batch by
    # batch): wait for that line, not for the rows, which go before their images do.
    def purges() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.getMessage() == "housekeeping" and getattr(r, "fields", {}).get("chore") == "task-purge"
        ]

    deadline = time.monotonic() + 30
    while not purges() and time.monotonic() < deadline:
        time.sleep(0.05)
    # One pass saw all four: a pass that queried before the UPDATE found none and did not log.
    assert [r.fields for r in purges()] == [{"chore": "task-purge", "count": 4}]
    assert [row["id"] for row in gw.query("SELECT id FROM tasks")] == [kept]
    for task_id in expired:
        with pytest.raises(openai.NotFoundError):
            client.get(f"/tasks/{task_id}", cast_to=object)
    (survivor,) = poll(client, kept)["result"]["data"]
    assert [p.name for p in images.iterdir()] == [urlparse(survivor["url"]).path.rsplit("/", 1)[-1]]


# -- durability: SIGKILL mid-way, then restart --------------------------------------------------------


def process_config(tmp_path: Path, upstream: FakeOpenAI, db_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "admin_key": ADMIN_KEY,
        "data_dir": str(tmp_path / "data"),
        "database": {"url": db_url},
        "logging": {"level": "WARNING"},
        "upstreams": [fake_upstream_config(upstream, timeout_s=30)],
        "tasks": {"lease_s": 2, "poll_s": 0.1, "workers": 2},
        **extra,
    }


def test_tasks_survive_a_killed_gateway(upstream: FakeOpenAI, tmp_path: Path) -> None:
    upstream.always_fail = Fault.delay(0.6)
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'durable.db'}"
    config = process_config(tmp_path, upstream, db_url)
    first = GatewayProcess(config, tmp_path).wait_ready()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(first.url + "/admin/keys", json={"name": "durable"}, headers=admin).json()
    headers = {"Authorization": f"Bearer {created['key']}"}
    ids = [
        httpx.post(
            first.url + GEN, params=ASYNC, json={"model": "gpt-image-1", "prompt": f"p{i}"}, headers=headers
        ).json()["id"]
        for i in range(20)
    ]
    # Let some tasks finish and some be in flight, then kill without any chance to clean up.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done = query(db_url, "SELECT COUNT(*) AS n FROM tasks WHERE status = 'succeeded'")[0]["n"]
        if done >= 3:
            break
        time.sleep(0.05)
    first.kill()
    killed_at = query(db_url, "SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")
    assert any(row["status"] in ("queued", "in_progress") for row in killed_at), killed_at

    second = GatewayProcess(config, tmp_path).wait_ready()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            open_tasks = query(
                db_url, "SELECT COUNT(*) AS n FROM tasks WHERE status IN ('queued', 'in_progress')"
            )
            if open_tasks[0]["n"] == 0:
                break
            time.sleep(0.1)
    finally:
        second.stop()
    rows = query(db_url, "SELECT id, status, attempts FROM tasks")
    assert {r["status"] for r in rows} <= {"succeeded", "failed"}
    assert sorted(r["id"] for r in rows) == sorted(ids)
    # Each task's upstream call completed at most once: calls cut off by the kill were abandoned
    # by the fake before it answered, so delivered answers = calls − abandoned = tasks succeeded.
    prompts = [r.json["prompt"] for r in upstream.requests if r.json and r.path == GEN]
    delivered = len(prompts) - sum(1 for path, _ in upstream.abandoned if path == GEN)
    succeeded = [r for r in rows if r["status"] == "succeeded"]
    ledger = query(db_url, "SELECT request_id, status, cost_micros FROM ledger_entries")
    billed = [row for row in ledger if row["status"] == "succeeded"]
    assert len(billed) == len(succeeded)
    key_row = query(
        db_url, f"SELECT spent_micros, reserved_micros FROM api_keys WHERE id = '{created['id']}'"
    )[0]
    assert int(key_row["spent_micros"]) == sum(int(row["cost_micros"]) for row in ledger)
    assert int(key_row["reserved_micros"]) == 0
    assert len(prompts) >= len(ids)
    from collections import Counter

    # Each task's upstream work completed at most once: calls per task (its request id) minus the
    # ones the kill cut off before the fake answered.
    calls = Counter(r.headers.get("x-request-id") for r in upstream.requests if r.path == GEN)
    calls.subtract(Counter(rid for path, rid in upstream.abandoned if path == GEN))
    assert max(calls.values()) <= 1, calls
    assert len(succeeded) <= delivered <= len(ids)
    # A task whose upstream call was cut off by the kill is failed (uncharged), never re-run.
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == len(ids) - len(succeeded)
    failures = query(db_url, "SELECT error FROM tasks WHERE status = 'failed'")
    assert all("task_interrupted" in str(f["error"]) for f in failures)


def test_two_worker_processes_drain_a_postgres_queue_once(upstream: FakeOpenAI, tmp_path: Path) -> None:
    with fresh_postgres_database() as db_url:
        migrate(db_url)
        api = GatewayProcess(
            process_config(tmp_path, upstream, db_url, tasks={"workers": 0}), tmp_path
        ).wait_ready()
        try:
            created = httpx.post(
                api.url + "/admin/keys",
                json={"name": "drain"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ).json()

            async def submit_all() -> list[str]:
                async with httpx.AsyncClient(timeout=30) as client:
                    answers = await asyncio.gather(
                        *(
                            client.post(
                                api.url + GEN,
                                params=ASYNC,
                                json={"model": "gpt-image-1", "prompt": f"t{i}", "quality": "low"},
                                headers={"Authorization": f"Bearer {created['key']}"},
                            )
                            for i in range(100)
                        )
                    )
                return [a.json()["id"] for a in answers]

            ids = asyncio.run(submit_all())
        finally:
            api.stop()
        config_path = tmp_path / "worker.yaml"
        import yaml

        config_path.write_text(yaml.safe_dump(process_config(tmp_path, upstream, db_url)))
        import subprocess
        import sys

        from tests.conftest import ROOT

        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "app", "--config", str(config_path), "worker", "--concurrency", "3"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                remaining = query(db_url, "SELECT COUNT(*) AS n FROM tasks WHERE status <> 'succeeded'")[0][
                    "n"
                ]
                if remaining == 0:
                    break
                time.sleep(0.2)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(30)
        rows = query(db_url, "SELECT id, status, attempts, worker FROM tasks")
        assert sorted(r["id"] for r in rows) == sorted(ids)
        assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in rows)
        assert len({r["worker"].rsplit(":", 1)[0] for r in rows}) == 2, "both processes should have worked"
        prompts = [r.json["prompt"] for r in upstream.requests if r.json and r.path == GEN]
        assert sorted(prompts) == sorted(f"t{i}" for i in range(100))
        ledger = query(db_url, "SELECT COUNT(*) AS n FROM ledger_entries")
        assert ledger[0]["n"] == 100


# -- the S3 store behind the same API ----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[FakeS3]:
    with FakeS3() as server:
        yield server


def test_url_results_from_an_s3_store(s3: FakeS3, upstream: FakeOpenAI, tmp_path: Path) -> None:
    storage = s3.settings(bucket="gateway-images").model_dump(mode="json")
    for secret in ("access_key_id", "secret_access_key"):
        storage[secret] = getattr(s3.settings(), secret).get_secret_value()
    gw = start_gateway(
        make_settings(tmp_path / "s3gw", [fake_upstream_config(upstream)], storage=storage), tmp_path / "s3gw"
    )
    try:
        client = gw.client()
        as_url = client.images.generate(model="dall-e-2", prompt="s3", response_format="url")
        assert as_url.data and as_url.data[0].url and as_url.data[0].url.startswith(s3.endpoint_url)
        downloaded = httpx.get(as_url.data[0].url)
        assert downloaded.status_code == 200 and downloaded.content.startswith(b"\x89PNG")
        tampered = httpx.get(as_url.data[0].url.replace("Signature=", "Signature=00"))
        assert tampered.status_code == 403
        raw = client.images.with_raw_response.generate(
            model="gpt-image-1", prompt="s3 task", extra_query=ASYNC
        )
        task = poll(client, raw.http_response.json()["id"])
        assert task["status"] == "succeeded" and task["result"]["data"][0]["b64_json"]
    finally:
        gw.close()
