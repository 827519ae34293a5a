"""The moderation service: levels bounded by the key's policy, the checker pipeline, audit events, errors."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.core.errors import GatewayError, InvalidRequestError
from app.moderation import (
    ModerationBlockedError,
    ModerationService,
    ModerationSettings,
    PolicyError,
    UpstreamModerationSettings,
    effective_level,
)
from app.moderation.base import ModerationUnavailableError
from tests.unit.test_moderation_corpus import load_corpus

ROOT = Path(__file__).resolve().parents[2]
MEDIUM = "a gory horror scene"  # blocked at auto only
HIGH = "a beheading video still"  # blocked at both levels


async def service_for(**settings: Any) -> ModerationService:
    return ModerationService.from_settings(ModerationSettings(**settings), base_dir=ROOT)


@pytest.fixture
async def service() -> AsyncIterator[ModerationService]:
    svc = await service_for()
    yield svc
    await svc.aclose()


async def check(
    svc: ModerationService, prompt: str, level: str = "auto", policy: str = "default", **kw: Any
) -> Any:
    return await svc.check_prompt(
        prompt=prompt, requested_level=level, key_policy=policy, key_id="key-1", **kw
    )


@pytest.mark.parametrize(
    ("requested", "key_policy", "expected"),
    [
        ("low", "default", "low"),
        ("auto", "default", "auto"),
        (None, "default", "auto"),
        ("low", "strict", "auto"),
        ("auto", "strict", "auto"),
        ("low", "off", "off"),
        ("auto", "off", "off"),
    ],
)
def test_effective_level(requested: str | None, key_policy: str, expected: str) -> None:
    assert effective_level(requested, key_policy) == expected


def test_effective_level_rejects_unknown_values() -> None:
    with pytest.raises(InvalidRequestError) as info:
        effective_level("high", "default")
    assert info.value.param == "moderation" and info.value.status_code == 400
    with pytest.raises(ValueError, match="unknown key moderation policy"):
        effective_level("auto", "lenient")


async def test_low_is_more_lenient_than_auto(service: ModerationService) -> None:
    low, auto = await check(service, MEDIUM, "low"), await check(service, MEDIUM, "auto")
    assert (low.level, low.blocked, low.audit) == ("low", False, None)
    assert (auto.level, auto.blocked) == ("auto", True)
    assert (await check(service, HIGH, "low")).blocked


async def test_a_strict_key_cannot_loosen_to_low(service: ModerationService) -> None:
    outcome = await check(service, MEDIUM, "low", policy="strict")
    assert outcome.level == "auto" and outcome.blocked
    assert outcome.verdict.level == "auto" and outcome.audit is not None and outcome.audit.level == "auto"


async def test_a_key_with_moderation_off_passes_everything(service: ModerationService) -> None:
    for row in load_corpus():
        outcome = await check(service, row.prompt, "auto", policy="off")
        assert outcome.level == "off" and not outcome.blocked and outcome.audit is None


async def test_disabled_moderation_is_off_but_still_validates_the_level() -> None:
    svc = await service_for(enabled=False)
    assert (await check(svc, HIGH)).level == "off"
    with pytest.raises(InvalidRequestError):
        await check(svc, HIGH, "strictest")


async def test_block_produces_verdict_audit_and_error(service: ModerationService) -> None:
    outcome = await check(service, HIGH)
    verdict, audit = outcome.verdict, outcome.audit
    assert verdict.blocked and verdict.categories == ("violence/graphic",)
    assert (verdict.stage, verdict.checker, verdict.level) == ("input", "classifier", "auto")
    assert audit is not None
    assert (
        audit.key_id == "key-1"
        and audit.categories == ("violence/graphic",)
        and audit.checker == "classifier"
    )
    assert audit.prompt_sha256 == hashlib.sha256(HIGH.encode()).hexdigest()
    assert audit.prompt is None  # store_prompts is off by default
    assert audit.rules == ("violence/graphic:beheading",)
    with pytest.raises(ModerationBlockedError) as info:
        outcome.raise_if_blocked()
    error = info.value
    assert isinstance(error, GatewayError) and error.status_code == 400
    assert error.to_body() == {
        "error": {
            "message": error.message,
            "type": "image_generation_user_error",
            "param": None,
            "code": "moderation_blocked",
            "moderation_details": {"moderation_stage": "input", "categories": ["violence/graphic"]},
        }
    }


async def test_passing_outcome_does_not_raise(service: ModerationService) -> None:
    outcome = await check(service, "a killer whale at sunset")
    assert not outcome.blocked and outcome.audit is None
    outcome.raise_if_blocked()


async def test_store_prompts_keeps_the_raw_prompt() -> None:
    svc = await service_for(store_prompts=True)
    outcome = await check(svc, HIGH)
    assert outcome.audit is not None and outcome.audit.prompt == HIGH


async def test_global_and_per_key_blocklists_block_at_every_level() -> None:
    svc = await service_for(blocklist=["acme{,corp}", "rival brand"])
    for level in ("low", "auto"):
        outcome = await check(svc, "an AcmeCorp logo", level)
        assert outcome.verdict.categories == ("blocklist",) and outcome.verdict.checker == "blocklist"
        assert outcome.audit is not None and outcome.audit.rules == ("blocklist:acme{,corp}",)
    assert not (await check(svc, "a cat")).blocked
    keyed = await check(svc, "a cat named Tom", "low", block=["tom"])
    assert keyed.verdict.categories == ("blocklist",)
    assert not (await check(svc, "a cat named Tom", "low", block=["jerry"])).blocked
    assert (await check(svc, "a t0m cat", block=["tom"])).blocked  # operator terms are normalised too


async def test_per_key_allowlist_unblocks_a_false_positive(service: ModerationService) -> None:
    prompt = "a Molotov cocktail exhibit in a Finnish war museum"
    assert (await check(service, prompt)).blocked
    assert not (await check(service, prompt, allow=["molotov cocktail exhibit"])).blocked


async def test_block_wins_over_allow() -> None:
    svc = await service_for(blocklist=["gore"], allowlist=["al gore"])
    assert (await check(svc, "Al Gore speaking", allow=["al gore"])).verdict.checker == "blocklist"
    assert (await check(svc, "Al Gore speaking")).verdict.checker == "blocklist"


async def test_checkers_are_configurable() -> None:
    only_lists = await service_for(checkers=["blocklist"], blocklist=["acme"])
    assert not (await check(only_lists, HIGH)).blocked
    assert only_lists.classifier is None
    nothing = await service_for(checkers=[])
    assert not (await check(nothing, HIGH)).blocked
    with pytest.raises(ValidationError):
        ModerationSettings(checkers=["classifier", "classifier"])


async def test_from_settings_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        ModerationService.from_settings(ModerationSettings(policy_file="nope.yaml"), base_dir=tmp_path)
    with pytest.raises(PolicyError, match="no letters"):
        ModerationService.from_settings(ModerationSettings(blocklist=["***"]), base_dir=ROOT)
    absolute = ModerationSettings(policy_file=str(ROOT / "app" / "defaults" / "moderation.yaml"))
    svc = ModerationService.from_settings(absolute, base_dir=tmp_path)
    assert svc.classifier is not None


async def test_images_pass_without_an_upstream_model(service: ModerationService) -> None:
    outcome = await service.check_images(
        images=[b"\x89PNG"], requested_level="auto", key_policy="default", key_id="k"
    )
    assert not outcome.blocked and outcome.level == "auto"


def test_settings_validation() -> None:
    with pytest.raises(ValidationError):
        ModerationSettings.model_validate({"unknown": 1})
    with pytest.raises(ValidationError, match="between 0 and 1"):
        UpstreamModerationSettings(api_key="k", thresholds={"auto": {"*": 1.5}})
    assert not UpstreamModerationSettings(api_key="").active
    assert UpstreamModerationSettings(api_key="sk-real").active
    assert not UpstreamModerationSettings(api_key="sk-real", enabled=False).active
    parsed = ModerationSettings.model_validate(
        {"upstream": {"base_url": "http://127.0.0.1:1/v1", "api_key": "sk-x", "fail_open": False}}
    )
    assert parsed.upstream is not None and parsed.upstream.fail_open is False
    assert "sk-x" not in repr(parsed)


def test_unavailable_error_is_a_retryable_503() -> None:
    error = ModerationUnavailableError()
    assert error.status_code == 503 and error.code == "moderation_unavailable"
