"""Forwarding a batch to OpenAI's own Batch API (issue 27, acceptance 5), through the official SDK,
against a fake OpenAI Files + Batches upstream (tests/fakes/openai_batch_upstream.py)."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.domain.money import apply_multiplier
from bench.gateway_process import GatewayProcess, gateway_config
from tests.conftest import ADMIN_KEY, LOCAL_UPSTREAM, Gateway, migrate, query
from tests.fakes.openai_batch_upstream import FakeOpenAIBatch
from tests.services import fresh_postgres_database

GEN = "/v1/images/generations"
KEY = "sk-batch-upstream-0123456789"
MODEL = "gpt-image-1.5"  # served by the batch upstream
TASK_MODEL = "gpt-image-1-mini"  # served by `local`: its lines run as tasks
# gpt-image-1.5's catalog prices, micro-units per token (text input, image output).
TEXT_IN, IMAGE_OUT = 5, 32
FAST = {"tasks": {"poll_s": 0.05}, "batches": {"poll_s": 0.05}}


def batch_upstream(fake: FakeOpenAIBatch) -> dict[str, Any]:
    return {
        "name": "oai-batch",
        "kind": "openai",
        "base_url": fake.url + "/v1",
        "api_key": KEY,
        "models": [MODEL],
        "batch": True,
        "poll_interval_s": 0.02,
        "poll_max_interval_s": 0.05,
        "follows_retirements": False,
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in lines)


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": GEN, "body": body}


def wait_for(client: openai.OpenAI, batch_id: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled") or time.monotonic() > deadline:
            return batch
        time.sleep(0.05)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    items = [json.loads(text) for text in client.files.content(file_id).text.splitlines() if text]
    return {item["custom_id"]: item for item in items}


def priced(usage: dict[str, Any]) -> int:
    """The catalog price of one fake line's usage (all text input, all image output)."""
    return usage["input_tokens"] * TEXT_IN + usage["output_tokens"] * IMAGE_OUT


def books(db_url: str, key_id: str) -> tuple[int, int, int, int, int]:
    """(Σ ledger costs, the key's spend, its months' spend, what it still reserves, holds left): the
    first three agree and the last two are 0 when the books balance (bench.books checks the same
    for one model's prices; these tests mix models)."""
    ledger = query(
        db_url, f"SELECT COALESCE(SUM(cost_micros), 0) AS n FROM ledger_entries WHERE key_id = '{key_id}'"
    )
    key = query(db_url, f"SELECT spent_micros, reserved_micros FROM api_keys WHERE id = '{key_id}'")[0]
    months = query(
        db_url, f"SELECT COALESCE(SUM(spent_micros), 0) AS n FROM key_periods WHERE key_id = '{key_id}'"
    )
    holds = query(db_url, f"SELECT COUNT(*) AS n FROM reservations WHERE key_id = '{key_id}'")
    return (
        int(ledger[0]["n"]),
        int(key["spent_micros"]),
        int(months[0]["n"]),
        int(key["reserved_micros"]),
        int(holds[0]["n"]),
    )


def submit(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    source = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h").id


@pytest.fixture(scope="module")
def fake_batch() -> Iterator[FakeOpenAIBatch]:
    with FakeOpenAIBatch(KEY) as fake:
        yield fake


@pytest.fixture
def fake(fake_batch: FakeOpenAIBatch) -> FakeOpenAIBatch:
    fake_batch.clear()
    return fake_batch


def test_lines_go_upstream_as_one_batch_and_map_back_by_custom_id(
    gateway_with: Callable[..., Gateway], fake: FakeOpenAIBatch
) -> None:
    gw = gateway_with(batch_upstream(fake), LOCAL_UPSTREAM, **FAST)
    key, key_id = gw.create_key()
    lines = [
        line("kite", model=MODEL, prompt="a red kite", size="1024x1024", quality="medium"),
        line("pair", model=MODEL, prompt="two boats", n=2, size="1024x1024", quality="high"),
        line("refused", model=MODEL, prompt="[fail] a thing", size="1024x1024"),
        line("unrun", model=MODEL, prompt="[error] a thing", size="1024x1024"),
        line("local", model=TASK_MODEL, prompt="a tree", size="1024x1024", quality="low"),
        line("invalid", model=MODEL, prompt="bad size", size="13x13"),
    ]
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        batch_id = submit(client, lines)
        batch = wait_for(client, batch_id)
        assert batch.status == "completed", batch
        outputs = read_jsonl(client, batch.output_file_id)
        errors = read_jsonl(client, batch.error_file_id)

    # One upload, one batch: the four valid lines of the batch upstream's model, by line number.
    assert (len(fake.uploads), len(fake.creates)) == (1, 1)
    (created,) = fake.creates
    assert created.json["metadata"] == {"gateway_batch_id": batch_id}
    sent = fake.input_lines(created.json["input_file_id"])
    assert [s["custom_id"] for s in sent] == ["L1", "L2", "L3", "L4"]
    assert [s["body"]["prompt"] for s in sent] == [
        "a red kite",
        "two boats",
        "[fail] a thing",
        "[error] a thing",
    ]
    assert all(s["url"] == GEN and s["body"]["model"] == MODEL for s in sent)

    # Results and errors map back to the tenant's custom ids.
    assert set(outputs) == {"kite", "pair", "local"}
    assert set(errors) == {"refused", "unrun", "invalid"}
    assert len(outputs["kite"]["response"]["body"]["data"]) == 1
    assert len(outputs["pair"]["response"]["body"]["data"]) == 2
    image = base64.b64decode(outputs["pair"]["response"]["body"]["data"][1]["b64_json"])
    assert image.startswith(b"\x89PNG")
    assert errors["refused"]["response"]["status_code"] == 400
    assert errors["refused"]["response"]["body"]["error"]["code"] == "moderation_blocked"
    assert errors["unrun"]["response"] is None
    assert errors["unrun"]["error"]["code"] == "server_error"
    assert errors["invalid"]["response"]["status_code"] == 400  # refused at admission, never sent
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 3)

    # Each forwarded line is priced from its own usage, exactly; failures cost nothing.
    rows = {
        r["request_id"]: r
        for r in gw.query(
            "SELECT request_id, status, images, cost_micros, upstream, batch_id FROM ledger_entries "
            f"WHERE key_id = '{key_id}'"
        )
    }
    assert {r["batch_id"] for r in rows.values()} == {batch_id}
    kite, pair = rows[f"{batch_id}-1"], rows[f"{batch_id}-2"]
    assert (kite["status"], kite["images"], kite["upstream"]) == ("succeeded", 1, "oai-batch")
    assert int(kite["cost_micros"]) == priced(fake.usage_for("L1"))
    assert (pair["images"], int(pair["cost_micros"])) == (2, priced(fake.usage_for("L2")))
    for failed in (f"{batch_id}-3", f"{batch_id}-4"):
        assert (rows[failed]["status"], int(rows[failed]["cost_micros"])) == ("failed", 0)
    assert rows[f"{batch_id}-5"]["upstream"] == "local"  # ran as a task
    assert f"{batch_id}-6" not in rows
    total = sum(int(r["cost_micros"]) for r in rows.values())
    assert batch.model_extra is not None and batch.model_extra["cost_micros"] == total
    assert books(gw.settings.database.url, key_id) == (total, total, total, 0, 0)


def test_the_tenant_price_carries_the_discount_the_operator_chose(
    gateway_with: Callable[..., Gateway], fake: FakeOpenAIBatch
) -> None:
    batches = {**FAST["batches"], "forward_tenant_discount_models": {MODEL: 500_000}}
    gw = gateway_with(batch_upstream(fake), LOCAL_UPSTREAM, tasks=FAST["tasks"], batches=batches)
    key, key_id = gw.create_key(price_multiplier="1.2")
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        batch = wait_for(
            client, submit(client, [line("a", model=MODEL, prompt="half price", size="1024x1024")])
        )
    assert batch.status == "completed", batch
    (row,) = gw.query(f"SELECT cost_micros FROM ledger_entries WHERE key_id = '{key_id}'")
    # The key's x1.2, with the upstream's 50% passed on: x0.6 of the catalog price, rounded up.
    assert int(row["cost_micros"]) == apply_multiplier(priced(fake.usage_for("L1")), 600_000)
    (spent,) = gw.query(f"SELECT spent_micros, reserved_micros FROM api_keys WHERE id = '{key_id}'")
    assert (int(spent["spent_micros"]), int(spent["reserved_micros"])) == (int(row["cost_micros"]), 0)


def test_an_expired_upstream_batch_expires_its_unfinished_lines(
    gateway_with: Callable[..., Gateway], fake: FakeOpenAIBatch
) -> None:
    gw = gateway_with(batch_upstream(fake), LOCAL_UPSTREAM, **FAST)
    key, key_id = gw.create_key()
    fake.expire_after = 2  # the upstream batch expires with its first two lines done
    lines = [line(f"c{i}", model=MODEL, prompt=f"late {i}", size="1024x1024") for i in range(5)]
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        batch = wait_for(client, submit(client, lines))
        outputs = read_jsonl(client, batch.output_file_id)
        errors = read_jsonl(client, batch.error_file_id)
    assert batch.status == "expired", batch
    assert set(outputs) == {"c0", "c1"}
    assert set(errors) == {"c2", "c3", "c4"}
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert all(e["response"] is None for e in errors.values())
    rows = gw.query(f"SELECT cost_micros FROM ledger_entries WHERE key_id = '{key_id}'")
    expected = priced(fake.usage_for("L1")) + priced(fake.usage_for("L2"))
    assert sorted(int(r["cost_micros"]) for r in rows) == sorted(
        [priced(fake.usage_for("L1")), priced(fake.usage_for("L2"))]
    )
    # The expired lines' holds went back: nothing stays reserved.
    assert books(gw.settings.database.url, key_id) == (expected, expected, expected, 0, 0)


def test_a_restart_while_the_upstream_batch_runs_polls_it_to_the_end(
    fake: FakeOpenAIBatch, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'forward.db'}"
    config = gateway_config(
        batch_upstream(fake),
        tmp_path / "data",
        db_url,
        admin_key=ADMIN_KEY,
        batches={"poll_s": 0.05, "lease_s": 1},
    )
    fake.hold.set()  # the upstream batch stays in_progress until released
    first = GatewayProcess(config, tmp_path).wait_ready()
    created = httpx.post(
        first.url + "/admin/keys", json={"name": "fwd"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    key, key_id = created["key"], created["id"]
    lines = [line(f"r{i}", model=MODEL, prompt=f"restart {i}", size="1024x1024") for i in range(6)]
    try:
        with openai.OpenAI(base_url=first.url + "/v1", api_key=key, max_retries=0) as client:
            batch_id = submit(client, lines)
        assert fake.polled(2)  # created, its id stored, and being polled: in_progress
        (stored,) = query(
            db_url, f"SELECT * FROM upstream_batches WHERE batch_id = '{batch_id}' AND upstream != ''"
        )
        assert stored["upstream_batch_id"] in fake.batches and stored["state"] == "running"
        held = query(db_url, f"SELECT reserved_micros FROM api_keys WHERE id = '{key_id}'")[0]
        assert int(held["reserved_micros"]) > 0  # each forwarded line holds its worst case
        before = max(h["expires_at"] for h in query(db_url, "SELECT expires_at FROM reservations"))
    finally:
        first.kill()

    second = GatewayProcess(config, tmp_path).wait_ready()
    try:
        seen = fake.polls
        assert fake.polled(seen + 1)  # the new process polls the same upstream batch
        # ... and keeps its lines' holds from the reconciler (the first process renewed them).
        holds = query(db_url, "SELECT expires_at FROM reservations")
        assert len(holds) == 6 and min(h["expires_at"] for h in holds) > before
        fake.hold.clear()
        with openai.OpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0) as client:
            batch = wait_for(client, batch_id)
            outputs = read_jsonl(client, batch.output_file_id)
    finally:
        second.stop()
    assert batch.status == "completed", batch
    assert set(outputs) == {f"r{i}" for i in range(6)}
    assert (len(fake.uploads), len(fake.creates)) == (1, 1)  # neither resubmitted nor lost
    rows = query(db_url, f"SELECT request_id, cost_micros FROM ledger_entries WHERE key_id = '{key_id}'")
    assert len(rows) == 6 and len({r["request_id"] for r in rows}) == 6  # each line once
    expected = sum(priced(fake.usage_for(f"L{i}")) for i in range(1, 7))
    assert sum(int(r["cost_micros"]) for r in rows) == expected
    assert books(db_url, key_id) == (expected, expected, expected, 0, 0)


def test_cancel_cancels_the_upstream_batch_and_gives_the_holds_back(
    gateway_with: Callable[..., Gateway], fake: FakeOpenAIBatch
) -> None:
    gw = gateway_with(batch_upstream(fake), LOCAL_UPSTREAM, **FAST)
    key, key_id = gw.create_key()
    fake.hold.set()
    lines = [line(f"x{i}", model=MODEL, prompt=f"cancel {i}", size="1024x1024") for i in range(3)]
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        batch_id = submit(client, lines)
        assert fake.polled(1)  # in_progress upstream
        assert client.batches.cancel(batch_id).status == "cancelling"
        batch = wait_for(client, batch_id)
        errors = read_jsonl(client, batch.error_file_id)
    assert batch.status == "cancelled", batch
    assert fake.count("/cancel") == 1
    assert set(errors) == {"x0", "x1", "x2"}
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    assert gw.query(f"SELECT request_id FROM ledger_entries WHERE key_id = '{key_id}'") == []
    assert books(gw.settings.database.url, key_id) == (0, 0, 0, 0, 0)


def test_an_upload_and_a_create_whose_answers_were_lost_are_found_not_repeated(
    gateway_with: Callable[..., Gateway], fake: FakeOpenAIBatch
) -> None:
    """The upstream did the work but its answer never arrived (502 after acting): the gateway finds
    the file by its name and the batch by its metadata instead of sending either again."""
    gw = gateway_with(batch_upstream(fake), LOCAL_UPSTREAM, **FAST)
    key, key_id = gw.create_key()
    fake.lose_answer = {("POST", "/v1/files"): 1, ("POST", "/v1/batches"): 1}
    lines = [line(f"z{i}", model=MODEL, prompt=f"lost {i}", size="1024x1024") for i in range(2)]
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        batch = wait_for(client, submit(client, lines))
        outputs = read_jsonl(client, batch.output_file_id)
    assert batch.status == "completed", batch
    assert set(outputs) == {"z0", "z1"}
    assert (len(fake.uploads), len(fake.creates)) == (1, 1)
    assert len(fake.batches) == 1 and len(fake.names) == 1
    expected = priced(fake.usage_for("L1")) + priced(fake.usage_for("L2"))
    assert books(gw.settings.database.url, key_id) == (expected, expected, expected, 0, 0)


def test_forwarding_on_postgresql_with_two_nodes(
    gateway_with: Callable[..., Gateway], fake: FakeOpenAIBatch, tmp_path: Path
) -> None:
    """Two gateways on one PostgreSQL database: one upstream batch, polled by whichever node holds
    the gateway batch's lease, each line charged once."""
    with fresh_postgres_database() as db_url:
        migrate(db_url)
        shared = {
            "database": {"url": db_url},
            "security": {"key_pepper": "forward-test-pepper-" + "x" * 32},
            "storage": {"path": str(tmp_path / "shared-store")},
            **FAST,
        }
        first = gateway_with(batch_upstream(fake), LOCAL_UPSTREAM, **shared)
        second = gateway_with(batch_upstream(fake), LOCAL_UPSTREAM, **shared)
        key, key_id = first.create_key()
        lines = [line(f"pg{i}", model=MODEL, prompt=f"p{i}", size="1024x1024") for i in range(8)]
        with openai.OpenAI(base_url=first.url + "/v1", api_key=key, max_retries=0) as client:
            batch_id = submit(client, lines)
        with openai.OpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0) as client:
            batch = wait_for(client, batch_id)
            outputs = read_jsonl(client, batch.output_file_id)
        assert batch.status == "completed", batch
        assert set(outputs) == {f"pg{i}" for i in range(8)}
        assert (len(fake.uploads), len(fake.creates)) == (1, 1)
        expected = sum(priced(fake.usage_for(f"L{i}")) for i in range(1, 9))
        assert books(db_url, key_id) == (expected, expected, expected, 0, 0)


def test_collecting_again_charges_nothing_twice(
    gateway_with: Callable[..., Gateway], fake: FakeOpenAIBatch
) -> None:
    """A process that died after settling the lines but before recording the collection done: the
    next one reads the upstream's files again, and every line it finds settled is left alone."""
    gw = gateway_with(batch_upstream(fake), LOCAL_UPSTREAM, **FAST)
    key, key_id = gw.create_key()
    lines = [line(f"t{i}", model=MODEL, prompt=f"twice {i}", size="1024x1024") for i in range(3)]
    lines.append(line("t-fail", model=MODEL, prompt="[fail] twice", size="1024x1024"))
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        batch_id = submit(client, lines)
        assert wait_for(client, batch_id).status == "completed"
        before = gw.query(f"SELECT id, request_id, cost_micros FROM ledger_entries WHERE key_id = '{key_id}'")
        # Back to where such a process left it: the files read, nothing yet marked done.
        gw.query(
            "UPDATE upstream_batches SET state = 'collecting' "
            f"WHERE batch_id = '{batch_id}' AND upstream != ''"
        )
        gw.query(
            "UPDATE batches SET status = 'in_progress', output_file_id = NULL, error_file_id = NULL, "
            f"completed_at = NULL, worker = NULL, lease_until = NULL WHERE id = '{batch_id}'"
        )
        again = wait_for(client, batch_id)
        outputs = read_jsonl(client, again.output_file_id)
        errors = read_jsonl(client, again.error_file_id)
    assert again.status == "completed", again
    assert set(outputs) == {"t0", "t1", "t2"} and set(errors) == {"t-fail"}
    assert len(fake.files) == 3  # input, output and error files: nothing was sent again
    after = gw.query(f"SELECT id, request_id, cost_micros FROM ledger_entries WHERE key_id = '{key_id}'")
    assert after == before and len(after) == 4
    expected = sum(priced(fake.usage_for(f"L{i}")) for i in range(1, 4))
    assert books(gw.settings.database.url, key_id) == (expected, expected, expected, 0, 0)
