"""The official OpenAI Node SDK (npm `openai`, in tests/node) runs the batch guide against the gateway
(issue 27, acceptance 1): files.create, batches.create, batches.retrieve until completed, and
files.content of the output and error files, for generation lines (mixed models, sizes and `n`, a
few invalid lines, a moderation block) and for edit lines whose images are uploaded file ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.books import ledger_violations
from tests.conftest import Gateway, fake_upstream_config
from tests.contract.test_batches import FAST, MIXED_LINES
from tests.fakes.openai_upstream import FakeOpenAI

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
EDIT_LINES = 20


def run_guide(gateway: Gateway, key: str, mode: str, lines: int) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").exists():
        if os.environ.get("CI"):
            pytest.fail("node and tests/node/node_modules are required in CI (make test installs them)")
        pytest.skip("node or the npm openai package is missing; run make test")
    result = subprocess.run(
        [node, str(NODE_DIR / "batch.mjs"), gateway.url + "/v1", key, mode, str(lines)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=NODE_DIR,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture
def gw(gateway_with: Callable[..., Gateway], upstream: FakeOpenAI) -> Gateway:
    return gateway_with(fake_upstream_config(upstream), **FAST)


def test_node_sdk_runs_a_mixed_generation_batch(gw: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gw.create_key(name="node-batch")
    report = run_guide(gw, key, "generations", MIXED_LINES)
    assert report["status"] == "completed", report["statuses"]
    assert report["statuses"][0] == "validating"
    assert report["metadata"] == {"sdk": "node"}
    assert report["counts"] == {"total": MIXED_LINES + 3, "completed": MIXED_LINES, "failed": 3}
    created, started, finalizing, completed = report["timestamps"]
    assert created <= started <= finalizing <= completed
    outputs = {o["custom_id"]: o for o in report["outputs"]}
    assert sorted(outputs) == sorted(f"gen-{i}" for i in range(MIXED_LINES))
    models = ["gpt-image-1", "gpt-image-1-mini", "dall-e-3"]
    for custom_id, out in outputs.items():
        i = int(custom_id.split("-")[1])
        assert out["status"] == 200
        assert out["n"] == (2 if models[i % 3] != "dall-e-3" and i % 5 == 0 else 1)
        if i % 4 == 0:
            assert out["kind"] == "url" and httpx.get(out["url"]).status_code == 200
        else:
            assert out["kind"] == "b64_json" and out["png"] == "PNG"
    errors = {e["custom_id"]: e for e in report["errors"]}
    assert set(errors) == {"gen-bad-size", "gen-no-prompt", "gen-blocked"}
    assert errors["gen-bad-size"]["status"] == 400
    assert errors["gen-no-prompt"]["param"] == "prompt"
    assert errors["gen-blocked"]["code"] == "moderation_blocked"
    # Each completed line went upstream once and is one ledger row carrying the batch id.
    assert len(upstream.requests) == MIXED_LINES
    rows = gw.query(f"SELECT request_id, batch_id, cost_micros FROM ledger_entries WHERE key_id = '{key_id}'")
    assert len(rows) == MIXED_LINES and {r["batch_id"] for r in rows} == {report["id"]}
    problems = ledger_violations(gw.settings.database.url, [key_id], None)
    assert [p for p in problems if not p.startswith("ledger row ")] == []
    assert gw.key_row(key_id)["reserved_micros"] == 0
    assert gw.key_row(key_id)["spent_micros"] == sum(int(r["cost_micros"]) for r in rows)


def test_node_sdk_runs_an_edit_batch_by_file_id(gw: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gw.create_key(name="node-edits")
    report = run_guide(gw, key, "edits", EDIT_LINES)
    assert report["status"] == "completed", report["statuses"]
    assert report["counts"] == {"total": EDIT_LINES + 1, "completed": EDIT_LINES, "failed": 1}
    assert sorted(o["custom_id"] for o in report["outputs"]) == sorted(f"edit-{i}" for i in range(EDIT_LINES))
    assert all(o["status"] == 200 and o["png"] == "PNG" for o in report["outputs"])
    (by_url,) = report["errors"]
    assert by_url["custom_id"] == "by-url" and by_url["status"] == 400
    edits = [r for r in upstream.requests if r.path.endswith("/images/edits")]
    assert len(edits) == EDIT_LINES
    images = sorted(len([f for f in r.files if f.field != "mask"]) for r in edits)
    assert images == [1] * (EDIT_LINES // 2) + [2] * (EDIT_LINES // 2)
    assert sum(1 for r in edits if r.files_for("mask")) == EDIT_LINES // 5
    assert gw.key_row(key_id)["reserved_micros"] == 0
