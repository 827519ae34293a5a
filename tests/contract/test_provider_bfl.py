"""Black Forest Labs FLUX behind /v1/images/* (issue 19): the official SDK through the gateway to a
fake FLUX API that speaks BFL's wire format (submit, poll, download)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types import ImageGenCompletedEvent

from bench.gateway_process import GatewayProcess
from tests.conftest import ADMIN_KEY, Gateway, make_settings, query, start_gateway
from tests.contract.providers import ASYNC, decoded, poll_task, uncharged
from tests.fakes import image_files as files
from tests.fakes.bfl_upstream import FakeBFL
from tests.fakes.provider_fake import Outcome

KEY = "bfl-key-0123456789abcdef"
PRO = "flux-pro-1.1"
KONTEXT = "flux-kontext-pro"


def flux_upstream(fake: FakeBFL, name: str = "flux-a", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "bfl",
        "base_url": fake.url,
        "api_key": KEY,
        "models": ["*"],
        "timeout_s": 10,
        "delivery_hosts": [f"127.0.0.1:{fake.server.port}"],
        "poll_interval_s": 0.02,
        "poll_max_interval_s": 0.05,
        "poll_budget_s": 10,
        **extra,
    }


@pytest.fixture(scope="module")
def bfl_fake() -> Iterator[FakeBFL]:
    with FakeBFL(KEY) as fake:
        yield fake


@pytest.fixture
def bfl(bfl_fake: FakeBFL) -> FakeBFL:
    bfl_fake.clear()
    return bfl_fake


@pytest.fixture(scope="module")
def gw(bfl_fake: FakeBFL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("bfl-gateway")
    upstreams = [flux_upstream(bfl_fake), flux_upstream(bfl_fake, "flux-b", priority=1)]
    gateway = start_gateway(make_settings(data_dir, upstreams), data_dir)
    yield gateway
    gateway.close()


def test_generation_submits_polls_and_downloads(gw: Gateway, bfl: FakeBFL) -> None:
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(
        model=PRO, prompt="a red kite", size="1536x1024", n=2, extra_body={"seed": 42}
    )
    submissions = bfl.submissions
    assert [r.path for r in submissions] == [f"/v1/{PRO}"] * 2
    assert all(r.headers["x-key"] == KEY for r in submissions)
    # 1536x1024 is past FLUX1.1 [pro]'s 1440: scaled to fit, multiples of 32, the ratio kept.
    assert submissions[0].json == {
        "prompt": "a red kite",
        "output_format": "png",
        "width": 1440,
        "height": 960,
        "seed": 42,
    }
    assert result.data is not None and len(result.data) == 2
    assert all(decoded(d.b64_json).size == (1440, 960) for d in result.data)
    assert result.size == "1440x960" and result.output_format == "png" and result.usage is None
    downloads = [r for r in bfl.requests if r.path.startswith("/delivery/")]
    assert len(downloads) == 2 and all("x-key" not in r.headers for r in downloads)
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["status"], row["images"], int(row["cost_micros"])) == ("succeeded", 2, 2 * 40_000)


def test_kontext_maps_size_to_the_nearest_ratio_and_reencodes_webp(gw: Gateway, bfl: FakeBFL) -> None:
    result = gw.client().images.generate(model=KONTEXT, prompt="x", size="1000x1600", output_format="webp")
    (submitted,) = bfl.submissions
    assert submitted.path == f"/v1/{KONTEXT}"
    assert submitted.json["aspect_ratio"] == "2:3" and submitted.json["output_format"] == "png"
    image = decoded(result.data[0].b64_json)  # type: ignore[index]
    assert image.format == "WEBP" and result.size == "{}x{}".format(*image.size)


def test_kontext_edit_sends_input_images(gw: Gateway, bfl: FakeBFL) -> None:
    images = [files.png(64, 64), files.jpeg(64, 48)]
    result = gw.client().images.edit(
        model=KONTEXT,
        image=[("a.png", images[0], "image/png"), ("b.jpg", images[1], "image/jpeg")],
        prompt="make it snow",
        output_format="jpeg",
    )
    (submitted,) = bfl.submissions
    assert base64.b64decode(submitted.json["input_image"]) == images[0]
    assert base64.b64decode(submitted.json["input_image_2"]) == images[1]
    assert "aspect_ratio" not in submitted.json  # size auto: Kontext keeps the input's ratio
    assert submitted.json["output_format"] == "jpeg"
    assert decoded(result.data[0].b64_json).format == "JPEG"  # type: ignore[index]


def test_kontext_refuses_masks(gw: Gateway, bfl: FakeBFL) -> None:
    with pytest.raises(openai.BadRequestError):
        gw.client().images.edit(
            model=KONTEXT,
            image=("a.png", files.png(64, 64), "image/png"),
            mask=("m.png", files.mask(64, 64), "image/png"),
            prompt="x",
        )
    assert bfl.requests == []


def test_slow_polling_backs_off_and_finishes(gw: Gateway, bfl: FakeBFL) -> None:
    bfl.enqueue(Outcome("slow", detail=4, path="/v1/flux"))
    result = gw.client().images.generate(model=PRO, prompt="x", size="1024x1024")
    assert decoded(result.data[0].b64_json).size == (1024, 1024)  # type: ignore[index]
    assert len(bfl.submissions) == 1 and bfl.polls == 5


def test_an_unreadable_poll_answer_is_polled_again(gw: Gateway, bfl: FakeBFL) -> None:
    bfl.enqueue(Outcome("poll_malformed", path="/v1/flux"))
    result = gw.client().images.generate(model=PRO, prompt="x", size="1024x1024")
    assert result.data and len(bfl.submissions) == 1 and bfl.polls == 2


def test_a_job_that_never_finishes_times_out_without_resubmitting(
    gateway_with: Callable[..., Gateway], bfl: FakeBFL
) -> None:
    # A job that never finishes, so the budget can be short; 2 s leaves room for a few polls on a
    # loaded box (each a round trip), where 0.3 s did not.
    gw = gateway_with(flux_upstream(bfl, poll_budget_s=2), flux_upstream(bfl, "flux-b", priority=1))
    bfl.enqueue(Outcome("never", path="/v1/flux"))
    key, key_id = gw.create_key()
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client(key).images.generate(model=PRO, prompt="x")
    assert (caught.value.status_code, caught.value.code) == (504, "upstream_timeout")
    assert len(bfl.submissions) == 1  # at most once: never submitted again elsewhere
    assert bfl.polls >= 3  # it was polled, with backoff, until the budget ran out
    uncharged(gw, key_id)


@pytest.mark.parametrize(("kind", "stage"), [("request_moderated", "input"), ("content_moderated", "output")])
def test_moderated_jobs_are_moderation_blocked_and_free(
    gw: Gateway, bfl: FakeBFL, kind: str, stage: str
) -> None:
    bfl.enqueue(Outcome(kind, path="/v1/flux"))
    key, key_id = gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(key).images.generate(model=PRO, prompt="x")
    assert (caught.value.type, caught.value.code) == ("image_generation_user_error", "moderation_blocked")
    assert caught.value.body["moderation_details"]["moderation_stage"] == stage  # type: ignore[index]
    assert len(bfl.submissions) == 1
    uncharged(gw, key_id)


def test_a_failed_job_fails_over(gw: Gateway, bfl: FakeBFL) -> None:
    bfl.enqueue(Outcome("job_error", path="/v1/flux"))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=PRO, prompt="x", size="1024x1024")
    assert result.data and len(bfl.submissions) == 2
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert (row["upstream"], int(row["cost_micros"])) == ("flux-b", 40_000)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_submit_429_and_5xx_fail_over(gw: Gateway, bfl: FakeBFL, status: int) -> None:
    body = orjson.dumps({"detail": "Too many active tasks"})
    bfl.enqueue(Outcome("status", status=status, body=body, headers={"retry-after": "2"}, path="/v1/flux"))
    key, key_id = gw.create_key()
    result = gw.client(key).images.generate(model=PRO, prompt="x", size="1024x1024")
    assert result.data
    (row,) = [r for r in gw.ledger() if r["key_id"] == key_id]
    assert row["upstream"] == "flux-b"


def test_submit_malformed_is_502(gateway_with: Callable[..., Gateway], bfl: FakeBFL) -> None:
    gw = gateway_with(flux_upstream(bfl))
    bfl.enqueue(Outcome("malformed", times=10, path="/v1/flux"))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model=PRO, prompt="x")
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_error")


@pytest.mark.parametrize("kind", ["foreign_sample", "foreign_polling"])
def test_urls_outside_the_allowed_hosts_are_never_fetched(
    gateway_with: Callable[..., Gateway], bfl: FakeBFL, kind: str
) -> None:
    gw = gateway_with(flux_upstream(bfl))
    bfl.enqueue(Outcome(kind, path="/v1/flux", times=10))
    key, key_id = gw.create_key()
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client(key).images.generate(model=PRO, prompt="x")
    assert caught.value.status_code == 502
    text = caught.value.response.text
    assert "169.254" not in text and "collector.example" not in text and "127.0.0.1" not in text
    if kind == "foreign_polling":
        assert bfl.polls == 0  # the key never went to the foreign host (nor was it polled here)
    assert not [r for r in bfl.requests if r.path.startswith("/delivery/")]
    uncharged(gw, key_id)


def test_a_refused_key_is_502_and_nothing_leaks(gateway_with: Callable[..., Gateway], bfl: FakeBFL) -> None:
    wrong = "bfl-wrong-key-0123456789"
    gw = gateway_with(flux_upstream(bfl, api_key=wrong))
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client().images.generate(model=PRO, prompt="x")
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_error")
    for secret in (wrong, bfl.url, "127.0.0.1"):
        assert secret not in caught.value.response.text


def test_stream_answers_completed_events(gw: Gateway, bfl: FakeBFL) -> None:
    events = list(gw.client().images.generate(model=PRO, prompt="x", size="1024x1024", stream=True))
    assert [type(e) for e in events] == [ImageGenCompletedEvent]
    assert decoded(events[0].b64_json).size == (1024, 1024)  # type: ignore[union-attr]


def test_async_task_records_the_provider_job(gw: Gateway, bfl: FakeBFL) -> None:
    client = gw.client()
    raw = client.images.with_raw_response.generate(model=PRO, prompt="x", size="1024x1024", extra_query=ASYNC)
    task_id = raw.http_response.json()["id"]
    task = poll_task(client, task_id)
    assert task["status"] == "succeeded", task
    assert decoded(task["result"]["data"][0]["b64_json"]).size == (1024, 1024)
    (row,) = gw.query(f"SELECT provider_job FROM tasks WHERE id = '{task_id}'")
    recorded = orjson.loads(row["provider_job"])
    assert recorded["upstream"] == "flux-a"
    assert [j["id"] for j in recorded["jobs"]] == list(bfl.jobs)


# -- acceptance 3: a worker SIGKILLed between submit and Ready resumes polling -----------------------


def test_a_flux_task_survives_a_sigkill_between_submit_and_ready(bfl: FakeBFL, tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'flux.db'}"
    config = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(tmp_path / "data"),
        "database": {"url": db_url},
        "logging": {"level": "WARNING"},
        "upstreams": [flux_upstream(bfl, poll_budget_s=60)],
        "tasks": {"lease_s": 1, "poll_s": 0.1, "workers": 1},
    }
    bfl.hold.set()  # every job stays Pending until released
    first = GatewayProcess(config, tmp_path).wait_ready()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(first.url + "/admin/keys", json={"name": "flux"}, headers=admin).json()
    headers = {"Authorization": f"Bearer {created['key']}"}
    submitted = httpx.post(
        first.url + "/v1/images/generations",
        params=ASYNC,
        json={"model": PRO, "prompt": "a kite", "size": "1024x1024"},
        headers=headers,
    )
    task_id = submitted.json()["id"]
    # Submitted upstream, its job recorded on the task, and being polled (Pending): kill now.
    assert bfl.wait_for_count(1, "/v1/get_result", timeout=30)
    (row,) = query(db_url, f"SELECT provider_job, dispatched_at FROM tasks WHERE id = '{task_id}'")
    assert row["provider_job"] and row["dispatched_at"]
    first.kill()
    assert len(bfl.submissions) == 1
    bfl.hold.clear()

    second = GatewayProcess(config, tmp_path).wait_ready()
    try:
        deadline = time.monotonic() + 60
        task: dict[str, Any] = {}
        while time.monotonic() < deadline:
            task = httpx.get(second.url + f"/v1/tasks/{task_id}", headers=headers).json()
            if task["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
    finally:
        second.stop()
    assert task["status"] == "succeeded", task
    assert decoded(task["result"]["data"][0]["b64_json"]).size == (1024, 1024)
    assert len(bfl.submissions) == 1  # resumed: polled again, never submitted twice
    ledger = query(db_url, "SELECT status, images, cost_micros FROM ledger_entries")
    assert [(r["status"], r["images"], int(r["cost_micros"])) for r in ledger] == [("succeeded", 1, 40_000)]
    key = query(db_url, f"SELECT spent_micros, reserved_micros FROM api_keys WHERE id = '{created['id']}'")[0]
    assert (int(key["spent_micros"]), int(key["reserved_micros"])) == (40_000, 0)
