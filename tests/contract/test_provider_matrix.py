"""One contract matrix for every provider kind (issue 28): the same checks, through the official
SDK and the gateway, against each provider's wire-format fake: sizes, n, formats, edits, stream,
async, moderation, 429/5xx failover and billing. A provider joins the matrix with one ``Provider``
row: its fake, its upstreams (a primary and a backup), a model for generations and one for edits,
and how its fake scripts a moderation refusal and a busy answer.

The per-provider files (``test_provider_<name>.py``) go deeper into each wire format; this one
proves that every kind keeps the same promises to the client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import orjson
import pytest
from openai.types import ImageGenCompletedEvent

from tests.conftest import Gateway, make_settings, start_gateway
from tests.contract.providers import ASYNC, books_violations, decoded, poll_task, uncharged
from tests.contract.test_provider_bfl import KEY as BFL_KEY
from tests.contract.test_provider_bfl import flux_upstream
from tests.contract.test_provider_fal import KEY as FAL_KEY
from tests.contract.test_provider_fal import fal_upstream
from tests.contract.test_provider_google import KEY as GOOGLE_KEY
from tests.contract.test_provider_google import google_upstreams
from tests.contract.test_provider_replicate import KEY as REPLICATE_KEY
from tests.contract.test_provider_replicate import replicate_upstream
from tests.contract.test_provider_stability import KEY as STABILITY_KEY
from tests.contract.test_provider_stability import stability_upstream
from tests.fakes import image_files as files
from tests.fakes.bfl_upstream import FakeBFL
from tests.fakes.fal_upstream import FakeFal
from tests.fakes.google_upstream import FakeGoogle
from tests.fakes.provider_fake import Outcome, ProviderFake
from tests.fakes.replicate_upstream import FakeReplicate
from tests.fakes.stability_upstream import FakeStability


@dataclass(frozen=True)
class Provider:
    name: str
    fake: Callable[[], ProviderFake]
    upstreams: Callable[[Any], list[dict[str, Any]]]
    backup: str  # the upstream a failover lands on
    model: str  # generations
    edit_model: str
    # The fake's script for an image the provider refuses, and for a busy (429/5xx) submission.
    moderated: Callable[[], Outcome]
    busy: Callable[[int], Outcome]
    submissions: Callable[[Any], int]


def _status(status: int, body: dict[str, Any], path: str | None = None) -> Outcome:
    return Outcome("status", status=status, body=orjson.dumps(body), path=path)


PROVIDERS = [
    Provider(
        name="gemini",
        fake=lambda: FakeGoogle(GOOGLE_KEY),
        upstreams=google_upstreams,
        backup="gemini-b",
        model="gemini-2.5-flash-image",
        edit_model="gemini-2.5-flash-image",
        moderated=lambda: Outcome("finish", detail="IMAGE_SAFETY", path=":generateContent"),
        busy=lambda s: _status(s, {"error": {"code": s, "message": "busy"}}, ":generateContent"),
        submissions=lambda fake: fake.count(":generateContent"),
    ),
    Provider(
        name="bfl",
        fake=lambda: FakeBFL(BFL_KEY),
        upstreams=lambda fake: [flux_upstream(fake), flux_upstream(fake, "flux-b", priority=1)],
        backup="flux-b",
        model="flux-2-pro",
        edit_model="flux-2-pro",
        moderated=lambda: Outcome("content_moderated", path="/v1/flux"),
        busy=lambda s: _status(s, {"detail": "busy"}, "/v1/flux"),
        submissions=lambda fake: len(fake.submissions),
    ),
    Provider(
        name="stability",
        fake=lambda: FakeStability(STABILITY_KEY),
        upstreams=lambda fake: [
            stability_upstream(fake),
            stability_upstream(fake, "stability-b", priority=1),
        ],
        backup="stability-b",
        model="stable-image-core",
        edit_model="stable-image-core",
        moderated=lambda: Outcome("content_filtered"),
        busy=lambda s: _status(s, {"id": "e", "name": "busy", "errors": ["busy"]}),
        submissions=lambda fake: len(fake.requests),
    ),
    Provider(
        name="fal",
        fake=lambda: FakeFal(FAL_KEY),
        upstreams=lambda fake: [fal_upstream(fake), fal_upstream(fake, "fal-b", priority=1)],
        backup="fal-b",
        model="fal-flux-kontext-pro",
        edit_model="fal-flux-kontext-pro",
        moderated=lambda: Outcome("nsfw", detail=4, path="/fal-ai/"),
        busy=lambda s: _status(s, {"detail": "busy"}, "/fal-ai/"),
        submissions=lambda fake: len(fake.submissions),
    ),
    Provider(
        name="replicate",
        fake=lambda: FakeReplicate(REPLICATE_KEY),
        upstreams=lambda fake: [replicate_upstream(fake), replicate_upstream(fake, "rep-b", priority=1)],
        backup="rep-b",
        model="replicate-flux-schnell",
        edit_model="replicate-flux-kontext-pro",
        moderated=lambda: Outcome("nsfw", path="/predictions"),
        busy=lambda s: _status(s, {"title": "busy", "detail": "busy", "status": s}, "/predictions"),
        submissions=lambda fake: len(fake.creations),
    ),
]


@dataclass
class Case:
    provider: Provider
    fake: Any
    gw: Gateway


@pytest.fixture(scope="module", params=PROVIDERS, ids=[p.name for p in PROVIDERS])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    provider: Provider = request.param
    with provider.fake() as fake:
        data_dir = tmp_path_factory.mktemp(f"matrix-{provider.name}")
        gateway = start_gateway(make_settings(data_dir, provider.upstreams(fake)), data_dir)
        try:
            yield Case(provider, fake, gateway)
        finally:
            gateway.close()


@pytest.fixture
def case(served: Case) -> Case:
    served.fake.clear()
    return served


def ledger_of(case: Case, key_id: str) -> list[dict[str, Any]]:
    return [r for r in case.gw.ledger() if r["key_id"] == key_id]


def test_sizes_keep_the_asked_ratio_and_report_what_was_made(case: Case) -> None:
    result = case.gw.client().images.generate(model=case.provider.model, prompt="x", size="1536x1024")
    image = decoded(result.data[0].b64_json)  # type: ignore[index]
    assert result.size == f"{image.width}x{image.height}"
    assert abs(image.width / image.height - 1.5) < 0.1, image.size


def test_n_images_are_made_and_billed(case: Case) -> None:
    key, key_id = case.gw.create_key()
    result = case.gw.client(key).images.generate(model=case.provider.model, prompt="x", n=2, size="1024x1024")
    assert result.data is not None and len(result.data) == 2
    (row,) = ledger_of(case, key_id)
    assert (row["status"], row["images"]) == ("succeeded", 2)
    assert books_violations(case.gw, [key_id]) == []


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_output_format_is_delivered(case: Case, fmt: str) -> None:
    result = case.gw.client().images.generate(
        model=case.provider.model,
        prompt="x",
        size="1024x1024",
        output_format=fmt,  # type: ignore[arg-type]
    )
    assert decoded(result.data[0].b64_json).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]  # type: ignore[index]
    assert result.output_format == fmt


def test_an_edit_is_served_and_billed(case: Case) -> None:
    key, key_id = case.gw.create_key()
    image = files.png(64, 64, mode="RGBA")  # with alpha: the edit area where a provider needs one
    result = case.gw.client(key).images.edit(
        model=case.provider.edit_model, image=("a.png", image, "image/png"), prompt="make it blue"
    )
    assert decoded(result.data[0].b64_json).width > 0  # type: ignore[index]
    (row,) = ledger_of(case, key_id)
    assert (row["endpoint"], row["status"], row["images"]) == ("edits", "succeeded", 1)
    assert books_violations(case.gw, [key_id]) == []


def test_a_stream_is_answered_with_completed_events(case: Case) -> None:
    stream = case.gw.client().images.generate(
        model=case.provider.model, prompt="x", size="1024x1024", stream=True
    )
    events = list(stream)
    assert [type(e) for e in events] == [ImageGenCompletedEvent]
    assert decoded(events[0].b64_json).width > 0  # type: ignore[union-attr]


def test_an_async_task_succeeds_and_is_billed_once(case: Case) -> None:
    key, key_id = case.gw.create_key()
    client = case.gw.client(key)
    raw = client.images.with_raw_response.generate(
        model=case.provider.model, prompt="x", size="1024x1024", extra_query=ASYNC
    )
    task = poll_task(client, raw.http_response.json()["id"])
    assert task["status"] == "succeeded", task
    assert decoded(task["result"]["data"][0]["b64_json"]).width > 0
    (row,) = ledger_of(case, key_id)
    assert (row["status"], row["images"]) == ("succeeded", 1)
    assert case.provider.submissions(case.fake) == 1
    assert books_violations(case.gw, [key_id]) == []


def test_a_moderation_refusal_is_moderation_blocked_free_and_not_retried(case: Case) -> None:
    case.fake.enqueue(case.provider.moderated())
    key, key_id = case.gw.create_key()
    with pytest.raises(openai.BadRequestError) as caught:
        case.gw.client(key).images.generate(model=case.provider.model, prompt="x", size="1024x1024")
    assert caught.value.code == "moderation_blocked"
    assert case.provider.submissions(case.fake) == 1  # a property of the prompt: not tried elsewhere
    uncharged(case.gw, key_id)


@pytest.mark.parametrize("status", [429, 503])
def test_a_busy_upstream_fails_over_and_the_backup_is_billed_once(case: Case, status: int) -> None:
    case.fake.enqueue(case.provider.busy(status))
    key, key_id = case.gw.create_key()
    result = case.gw.client(key).images.generate(model=case.provider.model, prompt="x", size="1024x1024")
    assert result.data
    assert case.provider.submissions(case.fake) == 2
    (row,) = ledger_of(case, key_id)
    assert (row["upstream"], row["status"], row["images"]) == (case.provider.backup, "succeeded", 1)
    assert books_violations(case.gw, [key_id]) == []
