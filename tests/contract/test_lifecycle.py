"""Model lifecycle (acceptance 5): retired models, remapping to the replacement, Sunset headers.

The dates that matter are set relative to today in a copy of the catalog (one model retired
yesterday, one retiring in a year), so the tests hold whatever day they run; the shipped dates
(gpt-image-1 on 2026-10-23, dall-e on 2026-05-12) are checked with an injected clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from app.core.errors import ModelRetiredError
from app.domain.catalog import Catalog
from app.images.admission.lifecycle import Lifecycle
from tests.conftest import MODELS_FILE, Gateway, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI

TODAY = dt.datetime.now(dt.UTC).date()
PAST = TODAY - dt.timedelta(days=1)
FUTURE = TODAY + dt.timedelta(days=365)


def models_file(tmp_path: Path) -> str:
    """The shipped catalog with gpt-image-1.5 retired yesterday (replaced by gpt-image-2) and
    gpt-image-1-mini retiring in a year."""
    raw = yaml.safe_load(Path(MODELS_FILE).read_text())
    raw["models"]["gpt-image-1.5"].update(retired_at=PAST.isoformat(), replacement="gpt-image-2")
    raw["models"]["gpt-image-1-mini"].update(retired_at=FUTURE.isoformat(), replacement="gpt-image-2")
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def openai_upstream(fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    """The fake as OpenAI itself: it follows OpenAI's retirements (the kind's default)."""
    config = fake_upstream_config(fake, models=["*"], **extra)
    config.pop("follows_retirements")
    return config


def post(gw: Gateway, key: str, model: str, **fields: Any) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/images/generations",
        json={"model": model, "prompt": "a lighthouse", **fields},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_retired_model_is_404_without_touching_the_upstream(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, tmp_path: Path
) -> None:
    gw = gateway_with(openai_upstream(upstream), models_file=models_file(tmp_path))
    key, key_id = gw.create_key(quota=1)
    response = post(gw, key, "gpt-image-1.5", size="1024x1024")
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    assert PAST.isoformat() in error["message"] and "gpt-image-2" in error["message"]
    assert upstream.count() == 0
    # Before any reservation: nothing held, nothing charged, no ledger row.
    row = gw.key_row(key_id)
    assert row["reserved_micros"] == 0 and row["spent_micros"] == 0
    assert gw.ledger() == []

    with pytest.raises(openai.NotFoundError) as raised:
        gw.client(key).images.generate(model="gpt-image-1.5", prompt="x")
    assert raised.value.code == "model_not_found"
    assert upstream.count() == 0


def test_a_retired_model_goes_only_to_upstreams_that_still_serve_it(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """An OpenAI upstream (following retirements) first in priority, and a compatible server that
    still serves the model behind it: the request skips the first and is served by the second."""
    second = FakeOpenAI(api_key=upstream.api_key).start()
    try:
        gw = gateway_with(
            openai_upstream(upstream, name="openai", priority=0),
            fake_upstream_config(second, name="compatible", models=["*"], priority=5),
            models_file=models_file(tmp_path),
        )
        response = post(gw, gw.create_key()[0], "gpt-image-1.5", size="1024x1024")
        assert response.status_code == 200, response.text
        assert upstream.count() == 0 and second.count() == 1
        assert response.headers["deprecation"].startswith("@")
        assert "x-gateway-model" not in response.headers
        (row,) = gw.ledger()
        assert (row["model"], row["upstream"]) == ("gpt-image-1.5", "compatible")
    finally:
        second.stop()


def test_remapped_retired_model_is_served_and_billed_as_its_replacement(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, tmp_path: Path
) -> None:
    gw = gateway_with(
        openai_upstream(upstream),
        models_file=models_file(tmp_path),
        lifecycle={"remap_retired": ["gpt-image-1.5"]},
    )
    key, _ = gw.create_key()
    response = post(gw, key, "gpt-image-1.5", size="1024x1024", quality="high")
    assert response.status_code == 200, response.text
    assert upstream.last.json["model"] == "gpt-image-2"
    assert response.headers["x-gateway-model"] == "gpt-image-2"
    retired = dt.datetime.combine(PAST, dt.time(0), tzinfo=dt.UTC)
    assert response.headers["deprecation"] == f"@{int(retired.timestamp())}"

    (row,) = gw.ledger()
    assert row["model"] == "gpt-image-2"
    # The fake's usage: 40 text in, 10 image in, 4160 image out, at gpt-image-2's prices
    # (5 / 8 / 30 per 1M), not gpt-image-1.5's (5 / 8 / 32): ceil(125,280 / 1e6 * 1e6) micro-units.
    expected = -(-(40 * 5_000_000 + 10 * 8_000_000 + 4160 * 30_000_000) // 1_000_000)
    assert row["cost_micros"] == expected
    assert response.headers["x-gateway-cost"] == f"0.{expected:06d}"


def test_scheduled_retirement_carries_sunset_on_every_answer(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI, tmp_path: Path
) -> None:
    gw = gateway_with(openai_upstream(upstream), models_file=models_file(tmp_path))
    key, _ = gw.create_key()
    ok = post(gw, key, "gpt-image-1-mini", size="1024x1024")
    assert ok.status_code == 200, ok.text
    sunset = parsedate_to_datetime(ok.headers["sunset"])
    assert sunset == dt.datetime.combine(FUTURE, dt.time(0), tzinfo=dt.UTC)
    # Errors about the model, and async answers, carry it too.
    bad = post(gw, key, "gpt-image-1-mini", quality="ultra")
    assert bad.status_code == 400 and bad.headers["sunset"] == ok.headers["sunset"]
    queued = httpx.post(
        gw.url + "/v1/images/generations?async=true",
        json={"model": "gpt-image-1-mini", "prompt": "later"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert queued.status_code == 202 and queued.headers["sunset"] == ok.headers["sunset"]
    # An active model carries none.
    assert "sunset" not in post(gw, key, "gpt-image-2", size="1024x1024").headers
    listed = {
        m["id"]: m
        for m in httpx.get(
            gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
        ).json()["data"]
    }
    assert listed["gpt-image-1-mini"]["state"] == "deprecated"
    assert listed["gpt-image-1.5"]["state"] == "retired"
    assert listed["gpt-image-2"]["state"] == "active"


def test_local_does_not_follow_retirements_by_default(local_gateway: Gateway) -> None:
    result = local_gateway.client().images.generate(
        model="gpt-image-1", prompt="still here", size="1024x1024"
    )
    assert result.data


def test_the_shipped_retirements_with_an_injected_clock() -> None:
    catalog = Catalog.from_file(MODELS_FILE)

    def lifecycle(day: dt.date, *, serves: bool = False, remap: bool = False) -> Lifecycle:
        now = dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC)
        return Lifecycle(catalog, serves_retired=lambda _m: serves, remaps=lambda _m: remap, now=lambda: now)

    gpt1 = catalog.get("gpt-image-1")
    assert gpt1 is not None
    before = lifecycle(dt.date(2026, 10, 22)).resolve(gpt1)
    assert before.caps.name == "gpt-image-1" and "Sunset" in before.headers
    assert parsedate_to_datetime(before.headers["Sunset"]) == dt.datetime(2026, 10, 23, tzinfo=dt.UTC)
    with pytest.raises(ModelRetiredError) as raised:
        lifecycle(dt.date(2026, 10, 23)).resolve(gpt1)
    assert "2026-10-23" in raised.value.message and "gpt-image-2.5-sunburst" in raised.value.message
    remapped = lifecycle(dt.date(2026, 12, 1), remap=True).resolve(gpt1)
    assert remapped.caps.name == "gpt-image-2.5-sunburst" and remapped.requested == "gpt-image-1"
    assert remapped.headers["x-gateway-model"] == "gpt-image-2.5-sunburst"
    still = lifecycle(dt.date(2026, 12, 1), serves=True).resolve(gpt1)
    assert still.caps.name == "gpt-image-1" and still.retired
    for name in ("dall-e-2", "dall-e-3"):
        caps = catalog.get(name)
        assert caps is not None and caps.retired_at == dt.date(2026, 5, 12)
        assert lifecycle(dt.date(2026, 5, 12)).state(caps) == "retired"
        assert lifecycle(dt.date(2026, 5, 11)).state(caps) == "deprecated"
