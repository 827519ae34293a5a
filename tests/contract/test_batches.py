"""OpenAI's Files and Batch APIs for images, through the official SDK (issue 27, SPEC §11)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.books import ledger_violations
from bench.gateway_process import GatewayProcess, gateway_config
from tests.conftest import ADMIN_KEY, Gateway, fake_upstream_config, migrate, query
from tests.fakes import image_files as files
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.s3_server import FakeS3
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.services import fresh_postgres_database

GEN = "/v1/images/generations"
EDITS = "/v1/images/edits"
BLOCKED = "a dismembered corpse"  # blocked by the default moderation level
# Generation lines of the mixed end-to-end batch: 1,000 in the acceptance run
# (GATEWAY_BATCH_LINES=1000, measured in the report); fewer by default to keep `make test` short.
MIXED_LINES = int(os.environ.get("GATEWAY_BATCH_LINES", "200"))
FAIRNESS_LINES = 5_000
FAST = {"tasks": {"poll_s": 0.05}, "batches": {"poll_s": 0.05}}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": GEN, "body": body}


def wait_for(client: openai.OpenAI, batch_id: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled") or time.monotonic() > deadline:
            return batch
        time.sleep(0.05)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(text) for text in client.files.content(file_id).text.splitlines() if text]


@pytest.fixture
def gw(gateway_with: Callable[..., Gateway], upstream: FakeOpenAI) -> Gateway:
    return gateway_with(fake_upstream_config(upstream), **FAST)


def test_files_round_trip_and_belong_to_their_key(gw: Gateway) -> None:
    client, other = gw.client(), gw.client()
    content = jsonl([line("a", model="gpt-image-1", prompt="x")] * 3)
    created = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    assert created.object == "file" and created.purpose == "batch" and created.status == "processed"
    assert created.bytes == len(content) and created.filename == "in.jsonl"
    assert created.expires_at is not None and created.expires_at > created.created_at
    assert client.files.retrieve(created.id).id == created.id
    assert [f.id for f in client.files.list()] == [created.id]
    assert client.files.content(created.id).content == content
    # Another key sees none of it.
    assert list(other.files.list()) == []
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        other.files.delete(created.id)
    deleted = client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    # Other purposes are a clear 400.
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose" and "batch" in caught.value.body["message"]  # type: ignore[index]
    # The signed image links under /v1/files/images/ are still their own route (no bearer key).
    assert httpx.get(gw.url + "/v1/files/images/img_" + "0" * 32 + ".png").status_code in (403, 404)
    missing = httpx.get(gw.url + "/v1/files/images/content")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "No such image."


def test_file_limits_refuse_while_arriving(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream), files={"max_bytes": 2048, "max_lines": 5})
    client = gw.client()
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 4096)), purpose="batch")
    assert too_big.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as too_long:
        client.files.create(file=("long.jsonl", io.BytesIO(b"{}\n" * 6)), purpose="batch")
    assert too_long.value.status_code == 413 and "lines" in str(too_long.value)
    # Exactly at the line limit, with no final newline, is fine.
    assert client.files.create(file=("ok.jsonl", io.BytesIO(b"{}\n" * 4 + b"{}")), purpose="batch")
    assert not list((gw.data_dir / "spool").iterdir())


def test_a_broken_file_fails_in_validating_with_line_numbers(gw: Gateway) -> None:
    key, key_id = gw.create_key(quota="100")
    client = gw.client(key)
    broken = jsonl(
        [
            line("ok-1", model="gpt-image-1", prompt="a"),
            b"{not json",
            line("ok-1", model="gpt-image-1", prompt="dup"),
            {**line("edit", model="gpt-image-1", prompt="e"), "url": "/v1/images/edits"},
            {**line("get", model="gpt-image-1", prompt="g"), "method": "GET"},
            {"custom_id": "nobody", "method": "POST", "url": GEN},
        ]
    )
    source = client.files.create(file=("broken.jsonl", io.BytesIO(broken)), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h")
    assert batch.status == "validating" and batch.object == "batch"
    batch = wait_for(client, batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    found = [(e.line, e.code) for e in batch.errors.data]
    assert found == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "invalid_method"),
        (6, "invalid_body"),
    ]
    assert batch.output_file_id is None and batch.error_file_id is None
    # Nothing was reserved, charged or queued.
    assert gw.key_row(key_id)["reserved_micros"] == 0 and gw.key_row(key_id)["spent_micros"] == 0
    assert gw.query(f"SELECT * FROM ledger_entries WHERE key_id = '{key_id}'") == []
    assert gw.query(f"SELECT * FROM tasks WHERE key_id = '{key_id}'") == []


def test_create_refuses_bad_parameters(gw: Gateway) -> None:
    client, other = gw.client(), gw.client()
    source = client.files.create(
        file=("x.jsonl", io.BytesIO(jsonl([line("a", prompt="x")]))), purpose="batch"
    )
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="48h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h")
    batch = client.batches.create(
        input_file_id=source.id, endpoint=GEN, completion_window="24h", metadata={"job": "nightly"}
    )
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    assert batch.metadata == {"job": "nightly"}


def test_mixed_generation_batch_end_to_end(gw: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gw.create_key()
    client = gw.client(key)
    lines: list[dict[str, Any]] = []
    models = [("gpt-image-1", "1024x1024"), ("gpt-image-1-mini", "1536x1024"), ("dall-e-3", "1024x1792")]
    for i in range(MIXED_LINES):
        model, size = models[i % 3]
        n = 2 if model != "dall-e-3" and i % 5 == 0 else 1
        fmt = "url" if i % 4 == 0 else "b64_json"
        lines.append(
            line(f"gen-{i}", model=model, prompt=f"product shot {i}", size=size, n=n, response_format=fmt)
        )
    invalid = {"gen-bad-size": {"model": "gpt-image-1", "prompt": "x", "size": "3x3"}}
    invalid["gen-no-prompt"] = {"model": "gpt-image-1"}
    invalid["gen-blocked"] = {"model": "gpt-image-1", "prompt": BLOCKED}
    for custom_id, body in invalid.items():
        lines.append(line(custom_id, **body))
    source = client.files.create(file=("shots.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    created = client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h")
    batch = wait_for(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        MIXED_LINES + 3,
        MIXED_LINES,
        3,
    )
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    outputs = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"gen-{i}" for i in range(MIXED_LINES))
    for out in outputs:
        i = int(out["custom_id"].split("-")[1])
        assert out["error"] is None and out["response"]["status_code"] == 200
        data = out["response"]["body"]["data"]
        expected_n = 2 if models[i % 3][0] != "dall-e-3" and i % 5 == 0 else 1
        assert len(data) == expected_n
        if i % 4 == 0:
            assert data[0]["url"].startswith("http") and httpx.get(data[0]["url"]).status_code == 200
        else:
            assert base64.b64decode(data[0]["b64_json"]).startswith(b"\x89PNG")
    by_id = {e["custom_id"]: e for e in errors}
    assert set(by_id) == set(invalid)
    assert by_id["gen-bad-size"]["response"]["status_code"] == 400
    assert by_id["gen-no-prompt"]["response"]["body"]["error"]["param"] == "prompt"
    assert by_id["gen-blocked"]["response"]["body"]["error"]["code"] == "moderation_blocked"
    # Every line went upstream once; the ledger holds exactly one row per completed line.
    assert len(upstream.requests) == MIXED_LINES
    rows = gw.query(f"SELECT request_id, cost_micros FROM ledger_entries WHERE key_id = '{key_id}'")
    assert sorted(r["request_id"] for r in rows) == sorted(f"{batch.id}-{n + 1}" for n in range(MIXED_LINES))
    assert batch.model_extra is not None
    assert batch.model_extra["cost_micros"] == sum(int(r["cost_micros"]) for r in rows)
    # The books balance (per-row token prices are bench.books' gpt-image-1 rates, so the per-row
    # check runs in the single-model quota test below; here the sums and holds).
    problems = ledger_violations(gw.settings.database.url, [key_id], None)
    assert [p for p in problems if not p.startswith("ledger row ")] == []
    assert gw.key_row(key_id)["spent_micros"] == sum(int(r["cost_micros"]) for r in rows)
    # Each line's ledger row carries the batch id: /admin/usage groups by it.
    usage = gw.admin("GET", "/admin/usage", params={"key_id": key_id, "group_by": "batch"}).json()
    (group,) = usage["data"]
    assert group["batch"] == batch.id and group["requests"] == MIXED_LINES
    # The listing pages by cursor.
    assert [b.id for b in client.batches.list(limit=1)] == [batch.id]


def test_lines_reserve_when_admitted_and_overflow_fails_with_insufficient_quota(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(
        fake_upstream_config(upstream),
        tasks=FAST["tasks"],
        batches={"poll_s": 0.05, "max_batch_lines_in_flight": 2},
    )
    # A quota that fits a few worst cases, far less than the whole file's.
    key, key_id = gw.create_key(quota="0.5")
    client = gw.client(key)
    lines = [
        line(f"l{i}", model="gpt-image-1", prompt=f"p{i}", size="1024x1024", quality="high")
        for i in range(12)
    ]
    source = client.files.create(file=("q.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = wait_for(
        client, client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h").id
    )
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    done, failed = batch.request_counts.completed, batch.request_counts.failed
    assert done + failed == 12 and done >= 1 and failed >= 1, batch.request_counts
    errors = read_jsonl(client, batch.error_file_id)
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"insufficient_quota"}
    assert all(e["response"]["status_code"] == 429 for e in errors)
    assert len(read_jsonl(client, batch.output_file_id)) == done == len(upstream.requests)
    row = gw.key_row(key_id)
    assert row["reserved_micros"] == 0
    assert ledger_violations(gw.settings.database.url, [key_id], None) == []


def test_cancel_stops_queued_lines_and_releases_their_holds(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    # No task workers: lines are admitted and queued but none runs, so cancel finds them queued.
    gw = gateway_with(fake_upstream_config(upstream), tasks={"workers": 0}, batches={"poll_s": 0.05})
    key, key_id = gw.create_key(quota="100")
    client = gw.client(key)
    lines = [line(f"c{i}", model="gpt-image-1", prompt=f"p{i}") for i in range(5)]
    source = client.files.create(file=("c.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h")
    deadline = time.monotonic() + 60
    while len(gw.query(f"SELECT id FROM tasks WHERE key_id = '{key_id}'")) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert gw.key_row(key_id)["reserved_micros"] > 0
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    batch = wait_for(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert batch.output_file_id is None
    errors = read_jsonl(client, batch.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == [f"c{i}" for i in range(5)]
    assert all(e["response"] is None and e["error"]["code"] == "batch_cancelled" for e in errors)
    statuses = gw.query(f"SELECT status FROM tasks WHERE key_id = '{key_id}'")
    assert {row["status"] for row in statuses} == {"failed"}
    assert gw.key_row(key_id)["reserved_micros"] == 0 and gw.key_row(key_id)["spent_micros"] == 0
    assert upstream.requests == []
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_missing")


def test_edit_lines_take_images_by_file_id(gw: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gw.create_key()
    client, other = gw.client(key), gw.client()
    photo = files.png(128, 128)
    mask = files.png(128, 128, mode="RGBA")
    shot = client.files.create(file=("shot.png", io.BytesIO(photo)), purpose="vision")
    matte = client.files.create(file=("mask.png", io.BytesIO(mask)), purpose="vision")
    foreign = other.files.create(file=("theirs.png", io.BytesIO(photo)), purpose="vision")
    lines = [
        {
            "custom_id": f"edit-{i}",
            "method": "POST",
            "url": EDITS,
            "body": {
                "model": "gpt-image-1",
                "prompt": f"on a white table {i}",
                "images": [{"file_id": shot.id}] * (2 if i % 2 else 1),
                **({"mask": {"file_id": matte.id}} if i % 5 == 0 else {}),
                "size": "1024x1024",
            },
        }
        for i in range(20)
    ]
    lines.append(
        {
            "custom_id": "by-url",
            "method": "POST",
            "url": EDITS,
            "body": {
                "model": "gpt-image-1",
                "prompt": "x",
                "images": [{"image_url": "http://10.0.0.1/a.png"}],
            },
        }
    )
    lines.append(
        {
            "custom_id": "not-mine",
            "method": "POST",
            "url": EDITS,
            "body": {"model": "gpt-image-1", "prompt": "x", "images": [{"file_id": foreign.id}]},
        }
    )
    source = client.files.create(file=("edits.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = wait_for(
        client, client.batches.create(input_file_id=source.id, endpoint=EDITS, completion_window="24h").id
    )
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (20, 2)
    outputs = {o["custom_id"]: o for o in read_jsonl(client, batch.output_file_id)}
    assert set(outputs) == {f"edit-{i}" for i in range(20)}
    assert all(
        base64.b64decode(o["response"]["body"]["data"][0]["b64_json"])[:4] == b"\x89PNG"
        for o in outputs.values()
    )
    edits = [r for r in upstream.requests if r.path.endswith("/images/edits")]
    assert len(edits) == 20
    images = [[f for f in r.files if f.field != "mask"] for r in edits]
    assert sorted(len(sent) for sent in images) == [1] * 10 + [2] * 10
    assert all(f.data == photo for sent in images for f in sent)
    assert sum(1 for r in edits if r.files_for("mask")) == 4
    errors = {e["custom_id"]: e for e in read_jsonl(client, batch.error_file_id)}
    assert errors["by-url"]["response"]["status_code"] == 400
    assert "does not fetch" in errors["by-url"]["response"]["body"]["error"]["message"]
    assert errors["not-mine"]["response"]["status_code"] == 404
    assert gw.key_row(key_id)["reserved_micros"] == 0
    assert not list((gw.data_dir / "spool").iterdir())


def test_a_large_batch_delays_another_keys_task_by_at_most_one_claim(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    """Counted, not timed: with no task workers of its own, the gateway admits the first
    ``max_batch_lines_in_flight`` of key A's 5,000 lines into the queue and the test is the worker
    pool, claiming ONE task at a time. Three of A's lines are running when key B submits a single
    async task; the next claim of one takes B's (the queue ranks keys by what they have in flight,
    then by age), though all of A's queued lines are older."""
    gw = gateway_with(
        fake_upstream_config(upstream),
        tasks={"workers": 0},
        batches={"poll_s": 0.05, "max_batch_lines_in_flight": 64},
    )
    key_a, id_a = gw.create_key(name="batch")
    client_a = gw.client(key_a)
    lines = [line(f"a{i}", model="gpt-image-1", prompt=f"p{i}") for i in range(FAIRNESS_LINES)]
    source = client_a.files.create(file=("a.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client_a.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h")
    deadline = time.monotonic() + 120
    while len(gw.query(f"SELECT id FROM tasks WHERE key_id = '{id_a}' AND status = 'queued'")) < 64:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client_a.batches.retrieve(batch.id).status == "in_progress"

    async def count_claims(submit_b: Callable[[], str]) -> tuple[int, str]:
        from app.db.engine import create_engine, create_sessionmaker
        from app.db.writer import create_writer
        from app.tasks.queue import TaskQueue

        engine = create_engine(gw.settings.database.url)
        writer = create_writer(engine)
        try:
            queue = TaskQueue(create_sessionmaker(engine), writer, lease_s=60)
            for _ in range(3):  # the pool runs three of the batch's lines
                (running,) = await queue.claim_batch("counting-pool", 1)
                assert running.key_id == id_a
            task_b = await asyncio.to_thread(submit_b)
            for claims in range(1, 200):
                (claimed,) = await queue.claim_batch("counting-pool", 1)
                if claimed.id == task_b:
                    return claims, task_b
            raise AssertionError("key B's task was never claimed")
        finally:
            await writer.aclose()
            await engine.dispose()

    key_b, id_b = gw.create_key(name="interactive")

    def submit_b() -> str:
        submitted = gw.client(key_b).images.with_raw_response.generate(
            model="gpt-image-1", prompt="now", extra_query={"async": "true"}
        )
        return str(submitted.http_response.json()["id"])

    claims, task_b = asyncio.run(count_claims(submit_b))
    assert claims == 1, f"key B's task waited {claims - 1} claims behind key A's batch"
    assert [r["id"] for r in gw.query(f"SELECT id FROM tasks WHERE key_id = '{id_b}'")] == [task_b]


def test_batch_webhooks_through_the_outbox(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    """batch.completed and batch.failed, signed (Standard Webhooks); the lines send no task events."""
    receiver = WebhookReceiver().start()
    try:
        gw = gateway_with(
            fake_upstream_config(upstream),
            **FAST,
            webhooks={"initial_backoff_s": 0.1, "max_backoff_s": 0.5, "poll_s": 0.05},
        )
        key, key_id = gw.create_key(name="hooked")
        created = gw.admin("POST", f"/admin/keys/{key_id}/webhooks", json={"url": receiver.url})
        assert created.status_code == 201, created.text
        receiver.secret = created.json()["secret"]
        client = gw.client(key)
        good = client.files.create(
            file=(
                "g.jsonl",
                io.BytesIO(jsonl([line(f"g{i}", model="gpt-image-1", prompt="x") for i in range(3)])),
            ),
            purpose="batch",
        )
        done = wait_for(
            client, client.batches.create(input_file_id=good.id, endpoint=GEN, completion_window="24h").id
        )
        assert done.status == "completed"
        (first,) = receiver.wait_for(1)
        assert first.verified and first.event["type"] == "batch.completed"
        assert first.event["data"]["id"] == done.id and first.event["data"]["status"] == "completed"
        assert first.event["data"]["output_file_id"] == done.output_file_id
        bad = client.files.create(file=("b.jsonl", io.BytesIO(b"nope\n")), purpose="batch")
        failed = wait_for(
            client, client.batches.create(input_file_id=bad.id, endpoint=GEN, completion_window="24h").id
        )
        assert failed.status == "failed"
        second = receiver.wait_for(2)[1]
        assert second.verified and second.event["type"] == "batch.failed"
        assert second.event["data"]["id"] == failed.id
        types = [r.event["type"] for r in receiver.received]
        assert types == ["batch.completed", "batch.failed"], types
    finally:
        receiver.stop()


def test_a_killed_gateway_ends_every_line_exactly_once(upstream: FakeOpenAI, tmp_path: Path) -> None:
    """SIGKILL mid-batch, restart: the batch completes, each line is in exactly one of the output and
    error files, nothing is sent upstream twice, and the books balance."""
    upstream.always_fail = Fault.delay(0.3)
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}"
    config = gateway_config(
        fake_upstream_config(upstream, timeout_s=30),
        tmp_path / "data",
        db_url,
        admin_key=ADMIN_KEY,
        tasks={"workers": 2, "poll_s": 0.05, "lease_s": 2},
        batches={"poll_s": 0.05, "lease_s": 2, "max_batch_lines_in_flight": 8},
    )
    first = GatewayProcess(config, tmp_path).wait_ready()
    created = httpx.post(
        first.url + "/admin/keys", json={"name": "crash"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    key, key_id = created["key"], created["id"]
    count = 40
    content = jsonl([line(f"k{i}", model="gpt-image-1", prompt=f"crash {i}") for i in range(count)])
    with openai.OpenAI(base_url=first.url + "/v1", api_key=key, max_retries=0) as client:
        source = client.files.create(file=("k.jsonl", io.BytesIO(content)), purpose="batch")
        batch_id = client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h").id
    deadline = time.monotonic() + 60
    while query(db_url, "SELECT COUNT(*) AS n FROM tasks WHERE status = 'succeeded'")[0]["n"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.kill()
    states = query(
        db_url, f"SELECT state, COUNT(*) AS n FROM batch_lines WHERE batch_id = '{batch_id}' GROUP BY state"
    )
    assert any(row["state"] in ("pending", "queued") for row in states), states

    second = GatewayProcess(config, tmp_path).wait_ready()
    try:
        with openai.OpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0) as client:
            batch = wait_for(client, batch_id)
            assert batch.status == "completed", batch
            outputs = read_jsonl(client, batch.output_file_id)
            errors = read_jsonl(client, batch.error_file_id)
    finally:
        second.stop()
    ended = [o["custom_id"] for o in outputs] + [e["custom_id"] for e in errors]
    assert sorted(ended) == sorted(f"k{i}" for i in range(count))  # each exactly once
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(outputs), len(errors))
    # A line cut off in flight by the kill fails uncharged (task_interrupted), never runs twice.
    assert {e["response"]["body"]["error"]["code"] for e in errors} <= {"task_interrupted"}
    prompts = [r.json["prompt"] for r in upstream.requests if r.json and r.path == GEN]
    delivered = len(prompts) - sum(1 for path, _ in upstream.abandoned if path == GEN)
    # An answer the fake sent just as the process died is not charged: that line failed
    # (task_interrupted), so answers delivered = lines completed + at most the interrupted ones.
    assert len(outputs) <= delivered <= len(outputs) + len(errors)
    assert len(set(prompts)) == len(prompts)  # no line sent upstream twice
    billed = query(
        db_url, f"SELECT request_id FROM ledger_entries WHERE key_id = '{key_id}' AND status = 'succeeded'"
    )
    assert len(billed) == len(outputs)
    # A hold taken by the admission the kill interrupted (before its task was written) has no task:
    # the reconciler gives it back at billing.hold_ttl_s, as for any request whose process died.
    # Admission is one line at a time, so there is at most one.
    stranded = query(
        db_url,
        f"SELECT id FROM reservations WHERE key_id = '{key_id}' "
        "AND request_id NOT IN (SELECT request_id FROM tasks)",
    )
    assert len(stranded) <= 1
    assert ledger_violations(db_url, [key_id], None, tolerated_holds=[h["id"] for h in stranded]) == []


def test_expiry_ends_the_lines_not_yet_running(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    """At expires_at the lines still waiting end as batch_expired and their holds go back."""
    gw = gateway_with(
        fake_upstream_config(upstream),
        tasks={"workers": 0},
        batches={"poll_s": 0.05, "max_batch_lines_in_flight": 3},
    )
    key, key_id = gw.create_key(quota="100")
    client = gw.client(key)
    lines = [line(f"x{i}", model="gpt-image-1", prompt=f"p{i}") for i in range(6)]
    source = client.files.create(file=("x.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h")
    assert batch.expires_at == batch.created_at + 24 * 3600
    deadline = time.monotonic() + 60
    while len(gw.query(f"SELECT id FROM tasks WHERE key_id = '{key_id}'")) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The completion window passes (the row's deadline moved, not the clock: nothing sleeps).
    gw.query(f"UPDATE batches SET expires_at = '2000-01-01 00:00:00.000000' WHERE id = '{batch.id}'")
    batch = wait_for(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    errors = read_jsonl(client, batch.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == [f"x{i}" for i in range(6)]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert gw.key_row(key_id)["reserved_micros"] == 0 and upstream.requests == []


def test_a_batch_on_postgresql_with_two_nodes(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """Two gateways on one PostgreSQL database: the batch is leased to one at a time, its lines run
    on both nodes' workers, and it completes once with one ledger row per line."""
    with fresh_postgres_database() as db_url:
        migrate(db_url)
        # What the nodes share: the database, the key pepper and the store (one directory here;
        # a bucket in production).
        shared = {
            "database": {"url": db_url},
            "security": {"key_pepper": "batch-test-pepper-" + "x" * 32},
            "storage": {"path": str(tmp_path / "shared-store")},
            **FAST,
        }
        first = gateway_with(fake_upstream_config(upstream), **shared)
        second = gateway_with(fake_upstream_config(upstream), **shared)
        key, key_id = first.create_key()
        lines = [line(f"pg{i}", model="gpt-image-1", prompt=f"p{i}", n=1 + i % 2) for i in range(30)]
        lines.append(line("pg-bad", model="gpt-image-1", prompt="x", size="9x9"))
        client = first.client(key)
        source = client.files.create(file=("pg.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = wait_for(
            second.client(key),
            client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h").id,
        )
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (30, 1)
        outputs = read_jsonl(client, batch.output_file_id)
        assert sorted(o["custom_id"] for o in outputs) == sorted(f"pg{i}" for i in range(30))
        assert len(upstream.requests) == 30
        assert ledger_violations(db_url, [key_id], None) == []
        rows = query(db_url, f"SELECT batch_id FROM ledger_entries WHERE key_id = '{key_id}'")
        assert [r["batch_id"] for r in rows] == [batch.id] * 30


def test_files_and_a_batch_on_an_s3_store(gateway_with: Callable[..., Gateway], upstream: FakeOpenAI) -> None:
    """Blobs live in the bucket beside the images (multipart upload for large files), read back in
    chunks; the batch's output file goes there too."""
    with FakeS3() as s3:
        storage = s3.settings(bucket="gateway-images").model_dump(mode="json")
        for secret in ("access_key_id", "secret_access_key"):
            storage[secret] = getattr(s3.settings(), secret).get_secret_value()
        gw = gateway_with(fake_upstream_config(upstream), storage=storage, **FAST)
        client = gw.client()
        # Larger than boto3's 8 MiB multipart threshold.
        padding = "x" * 1000
        big = jsonl([line(f"s{i}", model="gpt-image-1", prompt=f"p{i}", user=padding) for i in range(9000)])
        assert len(big) > 8 * 1024 * 1024
        stored = client.files.create(file=("big.jsonl", io.BytesIO(big)), purpose="batch")
        assert client.files.content(stored.id).content == big
        client.files.delete(stored.id)
        small = client.files.create(
            file=(
                "s.jsonl",
                io.BytesIO(jsonl([line(f"s{i}", model="gpt-image-1", prompt="p") for i in range(3)])),
            ),
            purpose="batch",
        )
        batch = wait_for(
            client, client.batches.create(input_file_id=small.id, endpoint=GEN, completion_window="24h").id
        )
        assert batch.status == "completed", batch
        assert len(read_jsonl(client, batch.output_file_id)) == 3
