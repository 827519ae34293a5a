"""Issue 15: money is exact on every path. One regression test per defect found in review, each
driving a real gateway against the fake OpenAI upstream with the official SDK or plain HTTP."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from app.images import service as service_module
from app.upstream.call import UpstreamCall
from bench.traffic import sse_events
from tests.conftest import MODELS_FILE, Gateway, fake_upstream_config
from tests.fakes import image_files
from tests.fakes.openai_upstream import FakeOpenAI, Fault

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
# gpt-image-1 prices, micro-units per token: text in 5, image in 10, image out 40.
TEXT_IN, IMAGE_IN, IMAGE_OUT = 5, 10, 40


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def rows_of(gw: Gateway, key_id: str) -> list[dict[str, Any]]:
    return [r for r in gw.ledger() if r["key_id"] == key_id]


def wait_task(gw: Gateway, key: str, task_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = httpx.get(gw.url + f"/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}).json()
        return body if body["status"] in ("succeeded", "failed") else None

    task = wait_for(done, timeout=60)
    assert task, f"task {task_id} never finished"
    return task


# -- defect 2: an async task must not loosen a strict key's moderation ------------------------------


def test_async_tasks_run_at_the_keys_effective_moderation_level(
    gateway: Gateway, upstream: FakeOpenAI
) -> None:
    key, _ = gateway.create_key(name="strict-async", moderation="strict")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-image-1", "prompt": "a lighthouse", "moderation": "low"}
    submitted = httpx.post(gateway.url + GEN, json=body, params={"async": "true"}, headers=headers)
    assert submitted.status_code == 202, submitted.text
    assert wait_task(gateway, key, submitted.json()["id"])["status"] == "succeeded"
    assert upstream.last.json["moderation"] == "auto"

    fields = {"model": "gpt-image-1", "prompt": "a lighthouse", "moderation": "low"}
    files = {"image": ("in.png", image_files.png(64, 48), "image/png")}
    edited = httpx.post(
        gateway.url + EDIT, data=fields, files=files, params={"async": "true"}, headers=headers
    )
    assert edited.status_code == 202, edited.text
    assert wait_task(gateway, key, edited.json()["id"])["status"] == "succeeded"
    assert upstream.last.field("moderation") == "auto"

    # The task stores what admission produced, not the client's payload.
    (spec,) = gateway.query(f"SELECT spec FROM tasks WHERE id = '{edited.json()['id']}'")
    stored = spec["spec"] if isinstance(spec["spec"], dict) else orjson.loads(spec["spec"])
    assert "payload" not in stored
    assert stored["job"]["moderation"] == "auto" and stored["job"]["forward"]["moderation"] == "auto"


# -- defect 3: a completed upstream call is billed even if the client leaves after it answered -----


def leave_when(url: str, key: str, body: dict[str, Any], ready: Callable[[], bool]) -> None:
    """POST ``body`` and hang up (the request is cancelled, httpx closes the connection) as soon as
    ``ready()``: the test decides the moment, not a client timeout racing the gateway."""

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            sending = asyncio.ensure_future(
                client.post(url + GEN, json=body, headers={"Authorization": f"Bearer {key}"})
            )
            try:
                for _ in range(1000):
                    if ready():
                        break
                    assert not sending.done(), "the answer came before the moment to leave"
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError("the moment to leave never came")
            finally:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)

    asyncio.run(run())


def test_client_leaving_while_url_images_are_stored_is_still_billed(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway_with(fake_upstream_config(upstream))
    storing, left = threading.Event(), threading.Event()
    original = service_module.store_images

    async def slow_store(*args: Any, **kwargs: Any) -> Any:
        storing.set()
        await asyncio.to_thread(left.wait, 60)  # the client gives up while the answer is being stored
        for _ in range(100):  # loop turns (no clock) for the gateway to read the hang-up
            await asyncio.sleep(0)
        return await original(*args, **kwargs)

    monkeypatch.setattr(service_module, "store_images", slow_store)
    key, key_id = gw.create_key(name="leaves-during-store")
    body = {"model": "gpt-image-1", "prompt": "x", "n": 10, "response_format": "url", "quality": "low"}
    leave_when(gw.url, key, body, storing.is_set)
    left.set()
    rows = wait_for(lambda: rows_of(gw, key_id))
    assert [r["status"] for r in rows] == ["succeeded"]
    assert rows[0]["images"] == 10 and int(rows[0]["cost_micros"]) > 0
    row = gw.key_row(key_id)
    assert (int(row["spent_micros"]), int(row["reserved_micros"])) == (int(rows[0]["cost_micros"]), 0)


def test_client_leaving_while_the_upstream_body_arrives_is_still_billed(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway_with(fake_upstream_config(upstream))
    key, key_id = gw.create_key(name="leaves-during-body")
    # 200 headers at once, the body when the test says (the delay only bounds a failing test).
    upstream.enqueue_fault(Fault.slow_body(120))
    # Leave once the gateway has read the headers (its request path marks the call answered).
    answered = threading.Event()
    original = UpstreamCall.answered

    def also_signal(call: UpstreamCall) -> None:
        original(call)
        if call.on_answer is not None:  # the request path's call, not a probe's
            answered.set()

    monkeypatch.setattr(UpstreamCall, "answered", also_signal)
    leave_when(gw.url, key, {"model": "gpt-image-1", "prompt": "x"}, answered.is_set)
    upstream.send_slow_bodies()
    rows = wait_for(lambda: rows_of(gw, key_id))
    assert [r["status"] for r in rows] == ["succeeded"]
    usage = upstream.usage
    expected = (
        usage["input_tokens_details"]["text_tokens"] * TEXT_IN
        + usage["input_tokens_details"]["image_tokens"] * IMAGE_IN
        + usage["output_tokens_details"]["image_tokens"] * IMAGE_OUT
    )
    assert int(rows[0]["cost_micros"]) == expected
    assert int(gw.key_row(key_id)["spent_micros"]) == expected


# -- defect 4: partial usage details are not under-billed ------------------------------------------


def test_partial_usage_details_fall_back_to_the_totals(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.usage = {
        "input_tokens": 60,
        "input_tokens_details": {"image_tokens": 0},  # no text_tokens
        "output_tokens": 900,
        "output_tokens_details": {"reasoning_tokens": 0},  # no image_tokens
        "total_tokens": 960,
    }
    key, key_id = gateway.create_key(name="partial-details")
    response = httpx.post(
        gateway.url + GEN,
        json={"model": "gpt-image-1", "prompt": "x"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200
    (row,) = rows_of(gateway, key_id)
    assert (row["text_input_tokens"], row["image_output_tokens"]) == (60, 900)
    assert int(row["cost_micros"]) == 60 * TEXT_IN + 900 * IMAGE_OUT
    assert response.headers["x-gateway-cost"] == f"0.{60 * TEXT_IN + 900 * IMAGE_OUT:06d}"


# -- defect 5: a stream that ends without `completed` is an error, and is billed as documented -----


def test_stream_ending_without_completed_is_an_error_event_and_a_failed_row(
    gateway: Gateway, upstream: FakeOpenAI
) -> None:
    upstream.enqueue_fault(Fault.stream_end(1))  # one partial image, then a clean end
    key, key_id = gateway.create_key(name="no-completed")
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        for event in gateway.client(key).images.generate(
            model="gpt-image-1", prompt="x", stream=True, partial_images=2
        ):
            received.append(event.type)
    assert received == ["image_generation.partial_image"]
    assert "before the image was completed" in str(raised.value)
    (row,) = rows_of(gateway, key_id)
    assert (row["status"], row["error_code"], row["images"]) == ("failed", "stream_incomplete", 0)
    # The partial image the client got: 100 image output tokens, as OpenAI bills it (an estimate).
    assert (row["image_output_tokens"], int(row["cost_micros"]), bool(row["estimated"])) == (100, 4000, True)
    assert int(gateway.key_row(key_id)["spent_micros"]) == 4000


# -- defect 6: abandoned tasks release their hold -----------------------------------------------------


def test_tasks_abandoned_after_max_attempts_release_their_hold(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    shared = {"database": {"url": db_url}, "security": {"key_pepper": "issue-15-shared-pepper-0123456789"}}
    submitter = gateway_with(fake_upstream_config(upstream), tasks={"workers": 0}, **shared)
    key, key_id = submitter.create_key(name="abandoned", quota="10")
    submitted = httpx.post(
        submitter.url + GEN,
        json={"model": "gpt-image-1", "prompt": "x"},
        params={"async": "true"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert submitted.status_code == 202
    task_id = submitted.json()["id"]
    assert int(submitter.key_row(key_id)["reserved_micros"]) > 0
    # Its last allowed worker died mid-run: the lease lapsed after the final attempt.
    submitter.query(
        "UPDATE tasks SET status = 'in_progress', attempts = 3, worker = 'dead', "
        f"lease_until = '2020-01-01 00:00:00+00:00' WHERE id = '{task_id}'"
    )
    worker = gateway_with(fake_upstream_config(upstream), tasks={"workers": 1, "poll_s": 0.05}, **shared)
    task = wait_task(worker, key, task_id)
    assert (task["status"], task["error"]["code"]) == ("failed", "task_abandoned")
    assert wait_for(lambda: int(worker.key_row(key_id)["reserved_micros"]) == 0)
    assert worker.query(f"SELECT * FROM reservations WHERE key_id = '{key_id}'") == []
    assert int(worker.key_row(key_id)["spent_micros"]) == 0


# -- defect 8: 400s, never 500s, on bad dates and huge integers --------------------------------------


def test_bad_dates_and_huge_integers_answer_400_naming_the_field(gateway: Gateway) -> None:
    key, _ = gateway.create_key(name="reports")
    own = httpx.get(
        gateway.url + "/v1/usage",
        params={"from": "9999-12-31T23:59:59-01:00"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert own.status_code == 400 and own.json()["error"]["param"] == "from"
    admin = gateway.admin("GET", "/admin/usage", params={"to": "9999-12-31T23:59:59-01:00"})
    assert admin.status_code == 400 and admin.json()["error"]["param"] == "to"

    naive = gateway.admin("POST", "/admin/keys", json={"name": "n", "expires_at": "2020-01-01T00:00:00"})
    assert naive.status_code == 400 and naive.json()["error"]["param"] == "expires_at"
    edge = gateway.admin("POST", "/admin/keys", json={"name": "n", "expires_at": "9999-12-31T23:59:59-01:00"})
    assert edge.status_code == 400 and edge.json()["error"]["param"] == "expires_at"
    huge = gateway.admin("POST", "/admin/keys", json={"name": "n", "rpm": 99999999999999999999})
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "rpm"
    _, key_id = gateway.create_key(name="patched")
    patched = gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"concurrency": 2**40})
    assert patched.status_code == 400 and patched.json()["error"]["param"] == "concurrency"


def test_cli_expires_at_takes_the_readmes_date_form(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "models_file": MODELS_FILE,
                "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"},
                "upstreams": [{"name": "local", "kind": "local", "models": ["*"]}],
            }
        )
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=300,  # bounds a hang only: a CLI start took over 60 s at load 23
        )

    created = cli("keys", "create", "--name", "dated", "--expires-at", "2030-01-01")
    assert created.returncode == 0, created.stderr
    assert orjson.loads(created.stdout)["expires_at"] == 1893456000  # 2030-01-01T00:00:00Z
    bad = cli("keys", "create", "--name", "bad", "--expires-at", "next tuesday")
    assert bad.returncode == 1 and "--expires-at" in bad.stderr and "Traceback" not in bad.stderr


# -- defect 9: masked key fragments in upstream errors are scrubbed --------------------------------


def test_masked_key_fragments_in_upstream_errors_are_scrubbed(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.enqueue_fault(
        Fault.status(
            400, "Incorrect API key provided: sk-upstr***3456. Also sk-...abcd.", code="invalid_value"
        )
    )
    key, _ = gateway.create_key(name="scrub")
    response = httpx.post(
        gateway.url + GEN,
        json={"model": "gpt-image-1", "prompt": "x"},
        headers={"Authorization": f"Bearer {key}"},
    )
    message = response.json()["error"]["message"]
    assert "sk-upstr" not in message and "3456" not in message and "abcd" not in message, message
    assert "sk-***" in message


# -- defect 10: usage on every synthesized completed event -------------------------------------------


def test_every_synthesized_completed_event_carries_its_share_of_usage(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream, stream=False))
    key, key_id = gw.create_key(name="replayed")
    events = list(
        gw.client(key).images.generate(model="gpt-image-1", prompt="x", stream=True, n=3, quality="low")
    )
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(completed) == 3
    assert all(e.usage is not None for e in completed)
    total = upstream.usage
    assert sum(e.usage.output_tokens for e in completed if e.usage) == total["output_tokens"]
    assert sum(e.usage.input_tokens for e in completed if e.usage) == total["input_tokens"]
    (row,) = rows_of(gw, key_id)
    assert row["image_output_tokens"] == total["output_tokens_details"]["image_tokens"]


# -- defect 11: streams do not claim to be free; the charge is in the last completed event ---------


def test_streams_carry_their_cost_in_the_completed_event_not_a_zero_header(
    gateway: Gateway, upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    key, key_id = gateway.create_key(name="stream-cost")
    client = gateway.client(key)
    with client.images.with_streaming_response.generate(
        model="gpt-image-1", prompt="x", stream=True, partial_images=1
    ) as response:
        assert "x-gateway-cost" not in response.headers
        text = response.read().decode()
    events = [(name, orjson.loads(data)) for name, data in sse_events(text)]
    (completed,) = [data for name, data in events if name == "image_generation.completed"]
    (row,) = rows_of(gateway, key_id)
    assert completed["gateway_cost"] == f"{int(row['cost_micros']) / 1e6:.6f}"
    assert int(row["cost_micros"]) > 0

    # The access log line has the charge too (written once the response has ended: wait for it).
    def logged() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.getMessage() == "request" and getattr(r, "fields", {}).get("key_id") == key_id
        ]

    records = wait_for(logged)
    assert records and records[-1].fields["cost_micros"] == int(row["cost_micros"])  # type: ignore[attr-defined]


# -- defect 12: rate-limit reset headers and CORS -----------------------------------------------------


def test_ratelimit_headers_are_readable_by_browsers(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    gw = gateway_with(fake_upstream_config(upstream), server={"cors_origins": ["https://app.example"]})
    key, _ = gw.create_key(name="cors", rpm=5)
    response = httpx.post(
        gw.url + GEN,
        json={"model": "gpt-image-1", "prompt": "x"},
        headers={"Authorization": f"Bearer {key}", "Origin": "https://app.example"},
    )
    assert response.status_code == 200
    exposed = {h.strip() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {
        "x-gateway-cost",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "retry-after",
    } <= exposed


# -- acceptance 3: one admission function and one settlement-row writer, for every mode --------


def test_sync_stream_and_async_run_through_one_admission_and_one_settlement(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.billing.ledger import LedgerService
    from app.images.service import ImageService
    from app.images.settlement import Settlement

    admitted: list[tuple[str, bool, bool]] = []
    settled: list[str] = []
    rows_written: list[str] = []
    admit, settle, ledger_settle = ImageService.admit, Settlement.settle, LedgerService.settle

    async def spy_admit(self: ImageService, **kwargs: Any) -> Any:
        admission = await admit(self, **kwargs)
        admitted.append((admission.job.endpoint, admission.job.stream, kwargs.get("asynchronous", False)))
        return admission

    async def spy_settle(self: Settlement, outcome: Any, **kwargs: Any) -> Any:
        settled.append(outcome.job.request_id)
        return await settle(self, outcome, **kwargs)

    async def spy_ledger(self: LedgerService, hold: Any, record: Any, **kwargs: Any) -> None:
        assert record.request_id in settled, "a ledger row written outside Settlement.settle"
        rows_written.append(record.request_id)
        await ledger_settle(self, hold, record, **kwargs)

    monkeypatch.setattr(ImageService, "admit", spy_admit)
    monkeypatch.setattr(Settlement, "settle", spy_settle)
    monkeypatch.setattr(LedgerService, "settle", spy_ledger)
    gw = gateway_with(fake_upstream_config(upstream))
    key, key_id = gw.create_key(name="paths")
    client = gw.client(key)
    client.images.generate(model="gpt-image-1", prompt="sync")
    list(client.images.generate(model="gpt-image-1", prompt="stream", stream=True, partial_images=1))
    client.images.edit(model="gpt-image-1", prompt="edit", image=("in.png", image_files.png(), "image/png"))
    task = httpx.post(
        gw.url + GEN,
        json={"model": "gpt-image-1", "prompt": "async"},
        params={"async": "true"},
        headers={"Authorization": f"Bearer {key}"},
    ).json()
    assert wait_task(gw, key, task["id"])["status"] == "succeeded"
    assert admitted == [
        ("generations", False, False),
        ("generations", True, False),
        ("edits", False, False),
        ("generations", False, True),
    ]
    request_ids = [r["request_id"] for r in rows_of(gw, key_id)]
    assert sorted(rows_written) == sorted(request_ids) and len(request_ids) == 4
    assert set(request_ids) <= set(settled)


def test_only_the_settlement_module_writes_settlement_rows() -> None:
    """A source check beside the behavioural one above: nothing else calls the ledger's settle."""
    root = Path(__file__).resolve().parents[2] / "app"
    callers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "ledger.settle(" in path.read_text() or "_ledger.settle(" in path.read_text()
    )
    assert callers == ["images/settlement.py"]
