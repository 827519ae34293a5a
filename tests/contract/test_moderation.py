"""Moderation on the request path (SPEC §4, issue 7): levels, key policy, upstream model, audit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, fake_upstream_config, make_settings, start_gateway
from tests.fakes import image_files as files
from tests.fakes.openai_upstream import FakeOpenAI, Fault

GEN = "/v1/images/generations"
AUTO_ONLY = "a naked woman posing on a bed"  # blocked at auto, allowed at low (corpus: expect auto)
ALWAYS = "a dismembered corpse"  # blocked at both levels (corpus: expect low)
BENIGN = "a killer whale breaching in the ocean"


def generate(gw: Gateway, key: str, prompt: str, **fields: Any) -> httpx.Response:
    return httpx.post(
        gw.url + GEN,
        json={"model": "gpt-image-1", "prompt": prompt, **fields},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def assert_blocked(response: httpx.Response, category: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("image_generation_user_error", "moderation_blocked")
    assert error["moderation_details"]["moderation_stage"] == "input"
    assert category in error["moderation_details"]["categories"]


def test_levels_and_key_policies(gateway: Gateway, upstream: FakeOpenAI) -> None:
    default_key, _ = gateway.create_key(name="default")
    strict_key, _ = gateway.create_key(name="strict", moderation="strict")
    off_key, _ = gateway.create_key(name="off", moderation="off")

    assert generate(gateway, default_key, BENIGN).status_code == 200
    assert_blocked(generate(gateway, default_key, AUTO_ONLY), "sexual")
    assert generate(gateway, default_key, AUTO_ONLY, moderation="low").status_code == 200
    assert upstream.last.json is not None and upstream.last.json["moderation"] == "low"
    assert_blocked(generate(gateway, default_key, ALWAYS, moderation="low"), "violence/graphic")

    # A strict key is moderated as auto even when it asks for low, and auto is what goes upstream.
    assert_blocked(generate(gateway, strict_key, AUTO_ONLY, moderation="low"), "sexual")
    assert generate(gateway, strict_key, BENIGN, moderation="low").status_code == 200
    assert upstream.last.json is not None and upstream.last.json["moderation"] == "auto"

    # A trusted key with moderation off reaches the upstream with anything.
    before = upstream.count(GEN)
    assert generate(gateway, off_key, ALWAYS).status_code == 200
    assert upstream.count(GEN) == before + 1


def test_obfuscated_prompts_are_blocked(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key(name="obfuscated")
    for prompt in ("a d1smemb3red c0rpse", "a d\u200bismembered corpse", "a d i s m e m b e r e d corpse"):
        assert_blocked(generate(gateway, key, prompt), "violence/graphic")
    assert upstream.count() == 0


def test_blocks_are_not_billed_and_are_audited_without_the_prompt(
    gateway: Gateway, upstream: FakeOpenAI
) -> None:
    key, key_id = gateway.create_key(name="audited", quota="1")
    assert_blocked(generate(gateway, key, ALWAYS), "violence/graphic")
    assert upstream.count() == 0
    assert not [r for r in gateway.ledger() if r["key_id"] == key_id]
    row = gateway.key_row(key_id)
    assert (int(row["spent_micros"]), int(row["reserved_micros"])) == (0, 0)

    events = gateway.admin("GET", "/admin/moderation/events", params={"key_id": key_id}).json()["data"]
    (event,) = events
    assert event["categories"] == ["violence/graphic"] and event["stage"] == "input"
    assert event["level"] == "auto" and event["prompt"] is None
    assert len(event["prompt_sha256"]) == 64
    assert ALWAYS not in str(events)
    assert gateway.admin("GET", "/admin/moderation/events", params={"category": "violence/graphic"}).json()[
        "data"
    ]

    metrics = httpx.get(gateway.url + "/metrics").text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    blocks = samples[
        ("gateway_moderation_blocks_total", (("category", "violence/graphic"), ("stage", "input")))
    ]
    assert blocks >= 1


def test_per_key_allow_and_block_lists(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gateway.create_key(
        name="lists", moderation_block=["acme corp"], moderation_allow=["naked woman"]
    )
    blocked = generate(gateway, key, "an ad for acme corp")
    assert blocked.status_code == 400
    assert generate(gateway, key, AUTO_ONLY).status_code == 200
    other_key, _ = gateway.create_key(name="no-lists")
    assert generate(gateway, other_key, "an ad for acme corp").status_code == 200
    bad = gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"moderation_block": [""]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "moderation_block"


def test_edits_and_async_submissions_are_moderated(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key(name="edit-moderation")
    client = gateway.client(key)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            model="gpt-image-1", image=("a.png", files.png(64, 64), "image/png"), prompt=ALWAYS
        )
    assert caught.value.code == "moderation_blocked"
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="gpt-image-1", prompt=ALWAYS, extra_query={"async": "true"})
    assert (
        httpx.get(gateway.url + "/v1/tasks", headers={"Authorization": f"Bearer {key}"}).json()["data"] == []
    )
    assert upstream.count() == 0


def test_upstream_moderation_refusals_are_relayed_uncharged(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, key_id = gateway.create_key(name="upstream-refusal")
    upstream.enqueue_fault(Fault.moderation_blocked(stage="output", categories=("sexual",)))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client(key).images.generate(model="gpt-image-1", prompt=BENIGN)
    body = caught.value.body
    assert isinstance(body, dict)
    assert caught.value.code == "moderation_blocked"
    assert body["moderation_details"] == {"moderation_stage": "output", "categories": ["sexual"]}
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert row["status"] == "failed" and row["cost_micros"] == 0


# -- an upstream moderation model (/v1/moderations on the fake) -------------------------------------


@pytest.fixture
def moderated(upstream: FakeOpenAI, tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def start(*, fail_open: bool = True, timeout_s: float = 5.0) -> Gateway:
        moderation = {
            "checkers": ["blocklist", "classifier", "upstream"],
            "upstream": {
                "base_url": upstream.base_url,
                "api_key": "sk-upstream-test",
                "timeout_s": timeout_s,
                "fail_open": fail_open,
            },
        }
        data_dir = tmp_path / f"mod{len(started)}"
        gw = start_gateway(
            make_settings(data_dir, [fake_upstream_config(upstream)], moderation=moderation), data_dir
        )
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


def test_upstream_model_flags_text_and_edit_images(moderated: Any, upstream: FakeOpenAI) -> None:
    gw = moderated()
    key, _ = gw.create_key(name="upstream-model")
    upstream.moderation_flag_words = {"zebra"}
    upstream.moderation_category = "violence"
    assert_blocked(generate(gw, key, "a zebra in a field"), "violence")
    assert upstream.count("/v1/moderations") == 1 and upstream.count(GEN) == 0
    assert generate(gw, key, "a horse in a field").status_code == 200

    upstream.moderation_flag_images = True
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.edit(
            model="gpt-image-1", image=("a.png", files.png(64, 64), "image/png"), prompt="a horse"
        )
    assert caught.value.code == "moderation_blocked"
    assert upstream.count("/v1/images/edits") == 0


@pytest.mark.parametrize("fail_open", [True, False])
def test_moderation_upstream_timeout_follows_the_policy(
    moderated: Any, upstream: FakeOpenAI, fail_open: bool
) -> None:
    gw = moderated(fail_open=fail_open, timeout_s=0.5)
    key, _ = gw.create_key(name="timeout")
    upstream.enqueue_fault(Fault.delay(300, path="/v1/moderations"))  # ends when the gateway leaves
    response = generate(gw, key, "a horse in a field")
    if fail_open:
        assert response.status_code == 200
        assert upstream.count(GEN) == 1
    else:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "moderation_unavailable"
        assert upstream.count(GEN) == 0
    assert "sk-upstream-test" not in response.text and upstream.base_url not in response.text
