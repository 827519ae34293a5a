"""ImageService.admit, the one admission path, on the gateway's real state (SQLite in tmp_path, the
built-in `local` upstream): validate → moderate → rate-limit → reserve, and every refusal leaves
nothing held (no reservation, no rate-limit slot)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from app.auth.keys import Caller
from app.billing.pricing import worst_case_cost
from app.core.errors import InvalidRequestError, ModerationBlockedError, QuotaExceededError, RateLimitError
from app.domain.money import apply_multiplier
from app.images.admission.requests import GenerationDraft
from app.runtime.lifespan import open_state
from app.runtime.state import AppState
from tests.conftest import LOCAL_UPSTREAM, make_settings
from tests.unit.ledger_db import Db

BODY = {"model": "gpt-image-1", "prompt": "a kite over the sea", "quality": "low", "size": "1024x1024"}


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[AppState]:
    settings = make_settings(tmp_path, [LOCAL_UPSTREAM], moderation={"blocklist": ["zebracorn"]})
    async with open_state(settings) as opened:
        yield opened


@pytest.fixture
def db(state: AppState) -> Db:
    return Db(state.engine, state.ledger._writer)


async def caller(db: Db, key_id: str = "k", *, quota: int | None = None, **limits: Any) -> Caller:
    await db.add_key(key_id, quota_micros=quota)
    return Caller(key_id=key_id, name=key_id, owner=None, models=None, moderation="default", **limits)


def draft(request_id: str = "req_1", **body: Any) -> GenerationDraft:
    return GenerationDraft(payload={**BODY, **body}, request_id=request_id)


async def test_admission_reserves_the_worst_case_and_holds_a_slot(state: AppState, db: Db) -> None:
    who = await caller(db, rpm=10)
    seen: list[str] = []
    admitted = await state.images.admit(
        caller=who, draft=draft(n=2), validated=lambda job: seen.append(job.model)
    )
    assert seen == ["gpt-image-1"] and admitted.job.n == 2
    assert admitted.grant is not None and admitted.hold is not None
    assert admitted.hold.amount_micros == worst_case_cost(admitted.job) > 0
    assert (await db.key("k"))["reserved"] == admitted.hold.amount_micros
    assert admitted.headers["x-ratelimit-remaining-requests"] == "9"
    await state.images.release(admitted.hold)
    assert (await db.key("k"))["reserved"] == 0


async def test_the_price_multiplier_scales_the_hold(state: AppState, db: Db) -> None:
    plain = await state.images.admit(caller=await caller(db, "a"), draft=draft("r1"))
    dear = await state.images.admit(
        caller=await caller(db, "b", price_multiplier_ppm=2_500_001), draft=draft("r2")
    )
    assert plain.hold is not None and dear.hold is not None
    assert dear.hold.amount_micros == apply_multiplier(plain.hold.amount_micros, 2_500_001)


async def test_a_concurrency_slot_is_held_until_released(state: AppState, db: Db) -> None:
    who = await caller(db, concurrency=1)
    first = await state.images.admit(caller=who, draft=draft("r1"))
    with pytest.raises(RateLimitError, match="concurrent"):
        await state.images.admit(caller=who, draft=draft("r2"))
    # The refused request reserved nothing on top of the first one's hold.
    assert first.hold is not None and (await db.key("k"))["reserved"] == first.hold.amount_micros
    assert first.grant is not None
    await state.images._limiter.release(first.grant)
    assert (await state.images.admit(caller=who, draft=draft("r3"))).grant is not None


async def test_a_task_is_admitted_without_a_concurrency_slot(state: AppState, db: Db) -> None:
    who = await caller(db, concurrency=1)
    queued = await state.images.admit(caller=who, draft=draft("r1"), asynchronous=True)
    assert queued.grant is None and queued.hold is not None
    # The slot was given back at once: a synchronous request still gets in.
    assert (await state.images.admit(caller=who, draft=draft("r2"))).grant is not None


async def test_stream_with_async_is_refused_before_anything_is_held(state: AppState, db: Db) -> None:
    who = await caller(db, rpm=1)
    with pytest.raises(InvalidRequestError) as refused:
        await state.images.admit(caller=who, draft=draft(stream=True), asynchronous=True)
    assert refused.value.param == "stream"
    assert (await db.key("k"))["reserved"] == 0
    # Not counted against the per-minute limit either.
    await state.images.admit(caller=who, draft=draft("r2"))


async def test_an_invalid_request_is_refused_with_nothing_held(state: AppState, db: Db) -> None:
    who = await caller(db, rpm=1)
    with pytest.raises(InvalidRequestError) as refused:
        await state.images.admit(caller=who, draft=draft(size="7x7"))
    assert refused.value.param == "size"
    with pytest.raises(InvalidRequestError):
        await state.images.admit(caller=who, draft=draft(model="no-such-model"))
    assert (await db.key("k"))["reserved"] == 0
    await state.images.admit(caller=who, draft=draft("r2"))  # the rpm budget is untouched


async def test_a_blocked_prompt_is_refused_before_the_rate_limit_and_the_hold(
    state: AppState, db: Db
) -> None:
    who = await caller(db, rpm=1)
    with pytest.raises(ModerationBlockedError):
        await state.images.admit(caller=who, draft=draft(prompt="a zebracorn at dusk"))
    assert await db.holds() == []
    await state.images.admit(caller=who, draft=draft("r2"))


async def test_the_per_minute_limit_refuses_with_nothing_held(state: AppState, db: Db) -> None:
    who = await caller(db, rpm=1)
    first = await state.images.admit(caller=who, draft=draft("r1"))
    with pytest.raises(RateLimitError) as refused:
        await state.images.admit(caller=who, draft=draft("r2"))
    assert int(refused.value.headers["retry-after"]) >= 1
    assert [h["request_id"] for h in await db.holds()] == ["r1"]
    assert first.hold is not None


async def test_a_quota_refusal_gives_the_slot_back_and_keeps_the_rate_headers(
    state: AppState, db: Db
) -> None:
    who = await caller(db, quota=1, concurrency=1, rpm=5)
    with pytest.raises(QuotaExceededError) as refused:
        await state.images.admit(caller=who, draft=draft("r1"))
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "4"
    assert await db.holds() == []
    # The concurrency slot was released: the next refusal is again the quota, not the slot.
    with pytest.raises(QuotaExceededError):
        await state.images.admit(caller=who, draft=draft("r2"))


async def test_a_key_limited_to_other_models_is_refused(state: AppState, db: Db) -> None:
    who = replace(await caller(db), models=frozenset({"dall-e-2"}))
    with pytest.raises(Exception) as refused:
        await state.images.admit(caller=who, draft=draft())
    assert getattr(refused.value, "status_code", None) in (403, 404)
    assert await db.holds() == []
