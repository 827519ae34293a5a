"""Moderation through an upstream ``/v1/moderations`` model, against the fake OpenAI server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from app.moderation import ModerationService, ModerationSettings, ModerationUnavailableError
from app.moderation.upstream import image_mime, max_scores
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.openai_wire import Fault

ROOT = Path(__file__).resolve().parents[2]
MODERATIONS = "/v1/moderations"
Factory = Callable[..., Coroutine[Any, Any, ModerationService]]


def png(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def make_service(upstream: FakeOpenAI) -> AsyncIterator[Factory]:
    """Build services whose upstream moderation is the fake; every one is closed at the end."""
    built: list[ModerationService] = []

    async def make(**upstream_settings: Any) -> ModerationService:
        config = {
            "base_url": upstream.base_url,
            "api_key": upstream.api_key,
            "timeout_s": 5.0,
            **upstream_settings,
        }
        svc = ModerationService.from_settings(ModerationSettings(upstream=config), base_dir=ROOT)
        built.append(svc)
        return svc

    yield make
    for svc in built:
        await svc.aclose()


async def check(svc: ModerationService, prompt: str, level: str = "auto") -> Any:
    return await svc.check_prompt(prompt=prompt, requested_level=level, key_policy="default", key_id="key-9")


async def check_images(svc: ModerationService, images: list[Any], level: str = "auto") -> Any:
    return await svc.check_images(images=images, requested_level=level, key_policy="default", key_id="key-9")


async def test_flagged_text_is_blocked_with_the_upstream_category(
    upstream: FakeOpenAI, make_service: Factory
) -> None:
    upstream.moderation_flag_words = {"zorblax"}
    upstream.moderation_category = "harassment"
    svc = await make_service()
    outcome = await check(svc, "a friendly zorblax at the door")
    assert outcome.blocked
    verdict = outcome.verdict
    assert (
        verdict.categories == ("harassment",) and verdict.checker == "upstream" and verdict.stage == "input"
    )
    assert verdict.scores == {"harassment": pytest.approx(0.97)}
    assert outcome.audit is not None and outcome.audit.rules == ("upstream:harassment",)
    request = upstream.last
    assert request.path == MODERATIONS
    assert request.json == {"model": "omni-moderation-latest", "input": ["a friendly zorblax at the door"]}
    assert request.bearer == upstream.api_key


async def test_clean_text_passes_after_one_upstream_call(upstream: FakeOpenAI, make_service: Factory) -> None:
    svc = await make_service()
    outcome = await check(svc, "a watercolor of a lighthouse")
    assert not outcome.blocked and not outcome.verdict.degraded
    assert upstream.count(MODERATIONS) == 1


async def test_thresholds_are_per_level(upstream: FakeOpenAI, make_service: Factory) -> None:
    upstream.moderation_flag_words = {"zorblax"}
    upstream.moderation_category = "violence"
    svc = await make_service()  # default thresholds: violence is only looked at by `auto`
    assert not (await check(svc, "zorblax", "low")).blocked
    assert (await check(svc, "zorblax", "auto")).blocked
    upstream.moderation_category = "sexual/minors"
    assert (await check(svc, "zorblax", "low")).verdict.categories == ("sexual/minors",)
    strict = await make_service(thresholds={"low": {"*": 0.99}, "auto": {"violence": 0.5}})
    upstream.moderation_category = "violence"
    assert not (await check(strict, "zorblax", "low")).blocked  # 0.97 < 0.99
    assert (await check(strict, "zorblax", "auto")).blocked


async def test_local_checkers_run_first_and_spare_the_upstream_call(
    upstream: FakeOpenAI, make_service: Factory
) -> None:
    svc = await make_service()
    outcome = await check(svc, "a beheading video still")
    assert outcome.verdict.checker == "classifier"
    assert upstream.count(MODERATIONS) == 0


async def test_flagged_edit_image_is_blocked(
    upstream: FakeOpenAI, make_service: Factory, tmp_path: Path
) -> None:
    upstream.moderation_flag_images = True
    upstream.moderation_category = "sexual"
    svc = await make_service()
    path = tmp_path / "input.png"
    path.write_bytes(png("blue"))
    outcome = await check_images(svc, [png(), path])
    assert outcome.blocked and outcome.verdict.categories == ("sexual",)
    assert outcome.verdict.checker == "upstream" and outcome.verdict.stage == "input"
    assert outcome.audit is not None and outcome.audit.prompt_sha256 is None
    assert len(outcome.audit.image_sha256) == 2
    bodies = [r.json for r in upstream.requests if r.path == MODERATIONS]
    assert len(bodies) == 2  # one image per request
    for body in bodies:
        assert body["model"] == "omni-moderation-latest"
        (item,) = body["input"]
        assert item["type"] == "image_url"
        assert item["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")


async def test_edit_files_are_shrunk_before_moderation_and_audited_by_the_original_hash(
    upstream: FakeOpenAI, make_service: Factory, tmp_path: Path
) -> None:
    upstream.moderation_flag_images = True
    svc = await make_service()
    big = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 2000), "green").save(big, format="JPEG", quality=95)
    outcome = await check_images(svc, [big])
    assert outcome.blocked and outcome.audit is not None
    assert outcome.audit.image_sha256 == (hashlib.sha256(big.read_bytes()).hexdigest(),)
    (body,) = [r.json for r in upstream.requests if r.path == MODERATIONS]
    url = body["input"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as sent:
        assert max(sent.size) <= 1024 and sent.size[0] / sent.size[1] == pytest.approx(1.5, rel=0.01)


async def test_clean_edit_image_passes(upstream: FakeOpenAI, make_service: Factory) -> None:
    svc = await make_service()
    outcome = await check_images(svc, [png()])
    assert not outcome.blocked and outcome.audit is None
    assert upstream.count(MODERATIONS) == 1


async def test_images_are_skipped_when_the_key_is_off_or_images_are_not_moderated(
    upstream: FakeOpenAI, make_service: Factory
) -> None:
    upstream.moderation_flag_images = True
    svc = await make_service(moderate_images=False)
    assert not (await check_images(svc, [png()])).blocked
    off = await make_service()
    outcome = await off.check_images(images=[png()], requested_level="auto", key_policy="off", key_id="k")
    assert outcome.level == "off" and not outcome.blocked
    assert upstream.count(MODERATIONS) == 0


@pytest.mark.parametrize("fault", [Fault.delay(300, path=MODERATIONS), Fault.hang(path=MODERATIONS)])
async def test_timeout_fails_open_when_configured(
    upstream: FakeOpenAI, make_service: Factory, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.enqueue_fault(fault)
    svc = await make_service(timeout_s=0.3, fail_open=True)
    with caplog.at_level(logging.WARNING, logger="app.moderation.upstream"):
        outcome = await check(svc, "a watercolor of a lighthouse")
    assert not outcome.blocked and outcome.verdict.degraded
    assert "failing open" in caplog.text and "UpstreamTimeout" in caplog.text
    assert upstream.url not in caplog.text and upstream.api_key not in caplog.text


@pytest.mark.parametrize("fault", [Fault.delay(300, path=MODERATIONS), Fault.hang(path=MODERATIONS)])
async def test_timeout_fails_closed_when_configured(
    upstream: FakeOpenAI, make_service: Factory, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.enqueue_fault(fault)
    svc = await make_service(timeout_s=0.3, fail_open=False)
    with caplog.at_level(logging.WARNING), pytest.raises(ModerationUnavailableError) as info:
        await check(svc, "a watercolor of a lighthouse")
    body = str(info.value.to_body())
    assert info.value.status_code == 503
    assert upstream.url not in body and upstream.api_key not in body
    assert upstream.url not in caplog.text and upstream.api_key not in caplog.text


async def test_image_timeout_follows_the_policy_too(upstream: FakeOpenAI, make_service: Factory) -> None:
    upstream.enqueue_fault(Fault.delay(300, path=MODERATIONS))
    opened = await make_service(timeout_s=0.3, fail_open=True)
    outcome = await check_images(opened, [png()])
    assert not outcome.blocked and outcome.verdict.degraded
    upstream.enqueue_fault(Fault.delay(300, path=MODERATIONS))
    closed = await make_service(timeout_s=0.3, fail_open=False)
    with pytest.raises(ModerationUnavailableError):
        await check_images(closed, [png()])


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(500, path=MODERATIONS),
        Fault.status(401, path=MODERATIONS),
        Fault.invalid_json(path=MODERATIONS),
        Fault.close(path=MODERATIONS),
    ],
)
async def test_other_failures_follow_the_policy(
    upstream: FakeOpenAI, make_service: Factory, fault: Fault
) -> None:
    upstream.enqueue_fault(fault)
    svc = await make_service(fail_open=False)
    with pytest.raises(ModerationUnavailableError):
        await check(svc, "a lighthouse")
    upstream.enqueue_fault(
        Fault(fault.kind, status_code=fault.status_code, error=fault.error, body=fault.body)
    )
    lenient = await make_service(fail_open=True)
    assert (await check(lenient, "a lighthouse")).verdict.degraded


async def test_wrong_key_is_a_failure_not_a_pass(upstream: FakeOpenAI, make_service: Factory) -> None:
    svc = await make_service(api_key="sk-wrong-key", fail_open=False)
    with pytest.raises(ModerationUnavailableError):
        await check(svc, "a lighthouse")


async def test_upstream_is_skipped_without_a_key(upstream: FakeOpenAI) -> None:
    settings = ModerationSettings(upstream={"base_url": upstream.base_url, "api_key": ""})
    svc = ModerationService.from_settings(settings, base_dir=ROOT)
    assert svc.upstream is None
    assert not (await check(svc, "zorblax forbidden")).blocked
    assert upstream.count(MODERATIONS) == 0


async def test_aclose_closes_the_client_and_repr_hides_url_and_key(
    upstream: FakeOpenAI, make_service: Factory
) -> None:
    svc = await make_service()
    assert svc.upstream is not None
    assert upstream.url not in repr(svc.upstream) and upstream.api_key not in repr(svc.upstream)
    await svc.aclose()
    assert svc.upstream._client.is_closed


async def test_an_injected_client_is_left_open(upstream: FakeOpenAI) -> None:
    async with aiohttp.ClientSession() as client:
        settings = ModerationSettings(upstream={"base_url": upstream.base_url, "api_key": upstream.api_key})
        svc = ModerationService.from_settings(settings, base_dir=ROOT, client=client)
        assert not (await check(svc, "a lighthouse")).blocked
        await svc.aclose()
        assert not client.closed


def test_response_parsing() -> None:
    payload = {
        "results": [
            {
                "categories": {"violence": True, "hate": False},
                "category_scores": {"violence": 0.4, "hate": 0.1},
            },
            {"categories": {"violence": False, "self-harm": True}, "category_scores": {"violence": 0.8}},
        ]
    }
    assert max_scores(payload) == {"violence": 0.8, "hate": 0.1, "self-harm": 1.0}
    with pytest.raises(Exception, match="invalid response"):
        max_scores({"nope": []})
    assert image_mime(b"\xff\xd8\xff\xe0....") == "image/jpeg"
    assert image_mime(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_mime(b"unknown") == "image/png"
