"""The console's Batches pages in a real browser (issue 27): list, detail with counts and progress,
downloads of the output and error files, and cancel, for the owning tenant and the operator.

Each test drives Debian's Chromium against a gateway on loopback served by the `local` renderer and
checks what the page shows against what the API and the database say."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import LOCAL_PACED, sign_in
from tests.conftest import Gateway, make_settings, start_gateway

GEN = "/v1/images/generations"
FAST = {"poll_s": 0.05}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": GEN, "body": body}


def _create_batch(gateway: Gateway, secret: str, lines: list[dict[str, Any]]) -> str:
    client = gateway.client(secret)
    source = client.files.create(file=("shots.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=source.id, endpoint=GEN, completion_window="24h").id


def _wait_status(gateway: Gateway, secret: str, batch_id: str, wanted: set[str]) -> Any:
    """Polls the API the way a client would; the bound only ends a broken run."""
    deadline = time.monotonic() + 120
    while True:
        batch = gateway.client(secret).batches.retrieve(batch_id)
        if batch.status in wanted:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)


@pytest.fixture
def batch_gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(make_settings(tmp_path, [LOCAL_PACED], tasks=FAST, batches=FAST), tmp_path)
    yield gw
    gw.close()


@pytest.fixture
def idle_batch_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """No task workers: a batch's admitted lines stay queued until the batch is cancelled."""
    gw = start_gateway(make_settings(tmp_path, [LOCAL_PACED], tasks={"workers": 0}, batches=FAST), tmp_path)
    yield gw
    gw.close()


def _download(page: Any, link_name: str) -> list[dict[str, Any]]:
    with page.expect_download() as info:
        page.get_by_role("link", name=link_name).click()
    path = info.value.path()
    return [json.loads(text) for text in Path(path).read_text().splitlines() if text]


def test_a_tenant_follows_their_batch_and_downloads_its_files(batch_gateway: Gateway, new_page: Any) -> None:
    secret, key_id = batch_gateway.create_key(name="catalogue", balance="20")
    other, _ = batch_gateway.create_key(name="someone-else")
    lines = [_line(f"shot-{i}", model="gpt-image-1", prompt=f"product shot {i}") for i in range(4)]
    lines.append(_line("too-small", model="gpt-image-1", prompt="x", size="3x3"))
    batch_id = _create_batch(batch_gateway, secret, lines)
    done = _wait_status(batch_gateway, secret, batch_id, {"completed"})

    page = new_page()
    sign_in(page, batch_gateway, secret)
    page.get_by_role("navigation").get_by_role("link", name="Batches").click()
    row = page.locator(f'tr[data-batch-id="{batch_id}"]')
    expect(row).to_contain_text("completed")
    expect(row.get_by_role("progressbar")).to_have_attribute("value", "100")
    row.get_by_role("link", name=batch_id).click()
    expect(page.locator("#batch-status")).to_have_text("completed")
    expect(page.locator("#batch-counts")).to_have_text("total 5, completed 4, failed 1")
    expect(page.locator("#batch-progress")).to_contain_text("100%: 5 of 5 line(s) ended")
    expect(page.locator("#batch-lines")).to_have_text("completed 4, failed 1")
    expect(page.locator(".key-name").last).to_have_text("catalogue")
    expect(page.get_by_role("button", name="Cancel batch")).to_have_count(0)
    # The cost so far is what the ledger holds for the batch's lines.
    ledger = [r for r in batch_gateway.ledger() if r["key_id"] == key_id]
    assert len(ledger) == 4 and done.model_extra is not None
    assert done.model_extra["cost_micros"] == sum(int(r["cost_micros"]) for r in ledger) > 0
    # Both files download as the API serves them.
    outputs = _download(page, str(done.output_file_id))
    assert sorted(o["custom_id"] for o in outputs) == [f"shot-{i}" for i in range(4)]
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    (error,) = _download(page, str(done.error_file_id))
    assert error["custom_id"] == "too-small" and error["response"]["status_code"] == 400
    api_output = batch_gateway.client(secret).files.content(str(done.output_file_id)).text
    assert sorted(json.loads(t)["custom_id"] for t in api_output.splitlines() if t) == sorted(
        o["custom_id"] for o in outputs
    )
    assert page.console_errors == []

    # Another tenant neither lists it nor opens it or its files.
    stranger = new_page()
    sign_in(stranger, batch_gateway, other)
    stranger.goto(batch_gateway.url + "/console/batches")
    expect(stranger.locator("#batches")).to_contain_text("No batches.")
    for path in ("", "/output.jsonl", "/errors.jsonl"):
        answer = stranger.goto(f"{batch_gateway.url}/console/batches/{batch_id}{path}")
        assert answer is not None and answer.status == 404

    # The operator sees every key's batches, with the key's name.
    operator = new_page()
    sign_in(operator, batch_gateway)
    operator.get_by_role("navigation").get_by_role("link", name="Batches").click()
    listed = operator.locator(f'tr[data-batch-id="{batch_id}"]')
    expect(listed.locator(".key-name")).to_have_text("catalogue")
    assert operator.console_errors == []


def test_the_operator_cancels_a_running_batch_and_its_holds_are_released(
    idle_batch_gateway: Gateway, new_page: Any
) -> None:
    secret, key_id = idle_batch_gateway.create_key(name="overnight", balance="20")
    lines = [_line(f"shot-{i}", model="gpt-image-1", prompt=f"product shot {i}") for i in range(6)]
    batch_id = _create_batch(idle_batch_gateway, secret, lines)
    _wait_status(idle_batch_gateway, secret, batch_id, {"in_progress"})
    deadline = time.monotonic() + 120  # the runner admits the lines: each holds its worst case
    while idle_batch_gateway.key_row(key_id)["reserved_micros"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    page = new_page()
    sign_in(page, idle_batch_gateway)
    page.goto(f"{idle_batch_gateway.url}/console/batches/{batch_id}")
    expect(page.locator("#batch-status")).to_have_text("in_progress")
    expect(page.locator("#batch-progress")).to_contain_text("0%: 0 of 6 line(s) ended")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel batch").click()
    expect(page.get_by_role("status")).to_contain_text("Cancelling")
    cancelled = _wait_status(idle_batch_gateway, secret, batch_id, {"cancelled"})
    page.reload()
    expect(page.locator("#batch-status")).to_have_text("cancelled")
    counts = cancelled.request_counts
    assert counts is not None and counts.completed == 0
    expect(page.locator("#batch-counts")).to_have_text(f"total 6, completed 0, failed {counts.failed}")
    expect(page.get_by_role("button", name="Cancel batch")).to_have_count(0)
    # Nothing ran: every hold went back and nothing was charged.
    row = idle_batch_gateway.key_row(key_id)
    assert (row["reserved_micros"], row["spent_micros"]) == (0, 0)
    assert [r for r in idle_batch_gateway.ledger() if r["key_id"] == key_id] == []
    errors = _error_lines(idle_batch_gateway, secret, cancelled)
    assert sorted(e["custom_id"] for e in errors) == [f"shot-{i}" for i in range(6)]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert page.console_errors == []


def _error_lines(gateway: Gateway, secret: str, batch: Any) -> list[dict[str, Any]]:
    text = gateway.client(secret).files.content(str(batch.error_file_id)).text
    return [json.loads(t) for t in text.splitlines() if t]
