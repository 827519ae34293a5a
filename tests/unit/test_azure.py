"""AzureOpenAIProvider against real HTTP upstreams on 127.0.0.1: addressing, auth, bodies, streams,
error shapes. A loopback resolver gives the upstream its Azure-style host name, whose resource
label must be scrubbed like the key."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from app.core.errors import UpstreamError, UpstreamRejected
from app.domain.catalog import Catalog
from app.domain.jobs import ImageJob, InputImage
from app.upstream.client import client_timeout, new_session
from app.upstream.config import UpstreamSettings
from app.upstream.providers.azure import (
    DEFAULT_API_VERSION,
    NOT_CONFIGURED,
    AzureOpenAIProvider,
    parse_duration,
    resource_endpoint,
    with_reset_retry_after,
)
from app.upstream.registry import ProviderRegistry
from tests.fakes.scripted_http import (
    Answer,
    LoopbackResolver,
    ScriptedUpstream,
    json_response,
    sse,
    sse_response,
)

CATALOG = Catalog.from_file(Path(__file__).resolve().parents[2] / "app" / "defaults" / "models.yaml")
HOST = "contoso-images.openai.azure.com"
ENDPOINT = f"https://{HOST}"  # for the tests without an upstream
API_KEY = "0123456789abcdef0123456789abcdef"
DEPLOYMENT = "prod-img-east"
VERSION = "2025-04-01-preview"
B64 = base64.b64encode(b"\x89PNG azure image bytes").decode()


def make_job(endpoint: str = "generations", model: str = "gpt-image-1", **forward: Any) -> ImageJob:
    caps = CATALOG.get(model)
    assert caps is not None
    return ImageJob(
        request_id="req_az",
        endpoint=endpoint,  # type: ignore[arg-type]
        model=model,
        caps=caps,
        prompt="a red fox",
        n=1,
        size="1024x1024",
        quality=caps.default_quality,
        background=None,
        output_format="png",
        output_compression=None,
        moderation="auto",
        stream=False,
        partial_images=0,
        response_format="b64_json",
        forward={"model": model, "prompt": "a red fox", **forward},
    )


def input_image(path: Path, data: bytes) -> InputImage:
    path.write_bytes(data)
    return InputImage(
        path=path, filename=None, format="png", width=8, height=8, has_alpha=True, size=len(data)
    )


def ok(_: web.Request) -> web.Response:
    return json_response(200, {"created": 1700000000, "data": [{"b64_json": B64}]})


@dataclasses.dataclass
class Harness:
    provider: AzureOpenAIProvider
    upstream: ScriptedUpstream
    endpoint: str  # http://contoso-images.openai.azure.com:<port>

    @property
    def generations(self) -> str:
        return f"{self.endpoint}/openai/deployments/{DEPLOYMENT}/images/generations?api-version={VERSION}"


Build = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def provider_for() -> AsyncIterator[Build]:
    async with AsyncExitStack() as stack:

        async def build(answer: Answer = ok, *, suffix: str = "", **kwargs: Any) -> Harness:
            upstream = await stack.enter_async_context(ScriptedUpstream(answer))
            endpoint = f"http://{HOST}:{upstream.port}"
            session = new_session(client_timeout(300, 10), max_connections=10, resolver=LoopbackResolver())
            stack.push_async_callback(session.close)
            options: dict[str, Any] = {
                "name": "azure",
                "base_url": endpoint + suffix,
                "api_key": API_KEY,
                "api_version": VERSION,
                "deployments": [DEPLOYMENT],
                **kwargs,
            }
            return Harness(AzureOpenAIProvider(session=session, **options), upstream, endpoint)

        yield build


# --- requests ---------------------------------------------------------------------------------------


async def test_generation_url_auth_and_body(provider_for: Build) -> None:
    h = await provider_for()
    job = make_job(quality="low", safety_identifier="user-42", future_field={"x": 1})
    result = await h.provider.generate(job, upstream_model=DEPLOYMENT)

    request = h.upstream.last
    assert request.method == "POST"
    assert request.url == h.generations
    assert request.headers["api-key"] == API_KEY
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert request.headers["x-request-id"] == "req_az"
    body = request.json()
    # The deployment decides the model; every other field goes as the client sent it.
    assert "model" not in body
    assert body == {
        "prompt": "a red fox",
        "quality": "low",
        "safety_identifier": "user-42",
        "future_field": {"x": 1},
    }
    assert result.body["data"][0]["b64_json"] == B64


async def test_dall_e_deployment_still_asks_for_base64(provider_for: Build) -> None:
    h = await provider_for()
    await h.provider.generate(make_job(model="dall-e-3", style="vivid"), upstream_model="dalle3")
    assert h.upstream.last.json() == {"prompt": "a red fox", "style": "vivid", "response_format": "b64_json"}
    assert h.upstream.last.path == "/openai/deployments/dalle3/images/generations"


@pytest.mark.parametrize("suffix", ["", "/", "/openai", "/openai/", "/OpenAI"])
async def test_base_url_forms(provider_for: Build, suffix: str) -> None:
    h = await provider_for(suffix=suffix)
    await h.provider.generate(make_job(), upstream_model=DEPLOYMENT)
    assert h.upstream.last.url == h.generations


async def test_default_api_version_and_quoted_deployment(provider_for: Build) -> None:
    h = await provider_for(api_version=None)
    await h.provider.generate(make_job(), upstream_model="img deploy/1")
    assert h.upstream.last.path_qs == (
        f"/openai/deployments/img%20deploy%2F1/images/generations?api-version={DEFAULT_API_VERSION}"
    )


async def test_no_key_sends_no_auth_header(provider_for: Build) -> None:
    h = await provider_for(api_key=None)
    await h.provider.generate(make_job(), upstream_model=DEPLOYMENT)
    assert "api-key" not in h.upstream.last.headers and "authorization" not in h.upstream.last.headers


async def test_edit_multipart_to_the_deployment(provider_for: Build, tmp_path: Path) -> None:
    h = await provider_for()
    images = (input_image(tmp_path / "a", b"\x89PNG-first"), input_image(tmp_path / "b", b"\x89PNG-second"))
    job = dataclasses.replace(
        make_job("edits", input_fidelity="high"), images=images, mask=input_image(tmp_path / "m", b"MASK")
    )
    await h.provider.edit(job, upstream_model=DEPLOYMENT)

    request = h.upstream.last
    assert request.url == h.generations.replace("/generations?", "/edits?")
    assert request.headers["api-key"] == API_KEY and "authorization" not in request.headers
    assert request.headers["content-type"].startswith("multipart/form-data")
    content = request.body
    assert b'name="model"' not in content
    assert b'name="prompt"\r\n\r\na red fox' in content
    assert b'name="input_fidelity"\r\n\r\nhigh' in content
    assert (
        content.count(b'name="image[]"') == 2 and b"\x89PNG-first" in content and b"\x89PNG-second" in content
    )
    assert b'name="mask"' in content and b"MASK" in content


async def test_stream_relays_events(provider_for: Build) -> None:
    partial = {"type": "image_generation.partial_image", "b64_json": B64, "partial_image_index": 0}
    done = {"type": "image_generation.completed", "b64_json": B64, "usage": {"total_tokens": 3}}
    chunks = sse(("image_generation.partial_image", partial), ("image_generation.completed", done))
    h = await provider_for(sse_response(chunks))
    job = make_job(partial_images=1)
    events = [e async for e in h.provider.stream(job, upstream_model=DEPLOYMENT)]

    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[1].data == done
    assert h.upstream.last.url == h.generations
    assert h.upstream.last.headers["accept"] == "text/event-stream"
    sent = h.upstream.last.json()
    assert sent["stream"] is True and sent["partial_images"] == 1 and "model" not in sent


async def test_stream_error_status_is_mapped_before_any_event(provider_for: Build) -> None:
    h = await provider_for(lambda _: json_response(400, content_filter_body()))
    events = h.provider.stream(make_job(), upstream_model=DEPLOYMENT)
    with pytest.raises(UpstreamRejected) as info:
        await anext(events)
    assert info.value.code == "moderation_blocked"


async def test_stream_error_event_is_mapped(provider_for: Build) -> None:
    error = {
        "error": {"code": "content_filter", "message": "Generated image was filtered by the safety system."}
    }
    h = await provider_for(sse_response(sse(("error", error))))
    with pytest.raises(UpstreamRejected) as info:
        async for _ in h.provider.stream(make_job(), upstream_model=DEPLOYMENT):
            pass
    assert info.value.to_body()["error"]["moderation_details"] == {
        "moderation_stage": "output",
        "categories": [],
    }


async def test_probe_lists_models_with_api_version(provider_for: Build) -> None:
    h = await provider_for(lambda _: web.Response(status=401))
    assert await h.provider.probe() is True
    assert h.upstream.last.method == "GET"
    assert h.upstream.last.url == f"{h.endpoint}/openai/models?api-version={VERSION}"
    assert h.upstream.last.headers["api-key"] == API_KEY


# --- error shapes -----------------------------------------------------------------------------------


def content_filter_body(code: str = "content_filter", message: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message or "Your request was rejected as a result of our safety system.",
            "param": "prompt",
            "type": None,
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "revised_prompt": "a secret revised prompt",
                "content_filter_results": {
                    "hate": {"filtered": False, "severity": "safe"},
                    "self_harm": {"filtered": True, "severity": "medium"},
                    "violence": {"filtered": True, "severity": "high"},
                    "jailbreak": {"filtered": False, "detected": False},
                    "custom_blocklists": {
                        "filtered": True,
                        "details": [{"id": "internal-list", "filtered": True}],
                    },
                },
            },
        }
    }


MODERATION = "image_generation_user_error"
CATEGORIES = ["self-harm", "violence", "custom_blocklists"]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, content_filter_body(), (400, MODERATION, "moderation_blocked", None, "input", CATEGORIES)),
        (
            400,
            content_filter_body("content_policy_violation"),
            (400, MODERATION, "moderation_blocked", None, "input", CATEGORIES),
        ),
        (
            400,
            {
                "error": {
                    "code": "contentFilter",
                    "message": "Generated image was filtered as a result of our safety system.",
                }
            },
            (400, MODERATION, "moderation_blocked", None, "output", []),
        ),
        (
            400,
            {
                "error": {
                    "code": "invalid_request_error",
                    "message": "blocked",
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": {"sexual": {"filtered": True, "severity": "high"}},
                    },
                }
            },
            (400, MODERATION, "moderation_blocked", None, "input", ["sexual"]),
        ),
        (
            400,
            {
                "error": {
                    "code": "invalid_value",
                    "message": "Invalid size.",
                    "param": "size",
                    "type": "invalid_request_error",
                }
            },
            (400, "invalid_request_error", "invalid_value", "size", None, None),
        ),
        (
            400,
            {
                "error": {
                    "code": "BadRequest",
                    "message": "Bad input.",
                    "details": [],
                    "target": "x",
                    "status": 400,
                }
            },
            (400, "invalid_request_error", "BadRequest", None, None, None),
        ),
        (
            500,
            {"error": {"code": "InternalServerError", "message": "Something broke.", "type": None}},
            (500, "api_error", "InternalServerError", None, None, None),
        ),
        (
            429,
            {"error": {"code": "429", "message": "Requests have exceeded call rate limit."}},
            (429, "rate_limit_error", "rate_limit_exceeded", None, None, None),
        ),
        (
            429,
            {
                "error": {
                    "code": "insufficient_quota",
                    "message": "Out of quota.",
                    "type": "insufficient_quota",
                }
            },
            (429, "insufficient_quota", "insufficient_quota", None, None, None),
        ),
        (
            401,
            {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}},
            (401, "invalid_request_error", "401", None, None, None),
        ),
    ],
)
async def test_error_mapping(
    provider_for: Build,
    status: int,
    body: dict[str, Any],
    expected: tuple[int, str, str, str | None, str | None, list[str] | None],
) -> None:
    h = await provider_for(lambda _: json_response(status, body))
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model=DEPLOYMENT)
    exc = info.value
    status_code, error_type, code, param, stage, categories = expected
    assert (exc.status_code, exc.error_type, exc.code, exc.param) == (status_code, error_type, code, param)
    error = exc.to_body()["error"]
    assert set(error) - {"message", "type", "param", "code"} == ({"moderation_details"} if stage else set())
    if stage is not None:
        assert error["moderation_details"] == {"moderation_stage": stage, "categories": categories}
        assert not exc.retryable
    assert error["message"] == body["error"]["message"]
    text = orjson.dumps(exc.to_body()).decode()
    for azure_only in ("inner", "ResponsibleAIPolicyViolation", "revised", "severity", "internal-list"):
        assert azure_only not in text


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            404,
            {
                "error": {
                    "code": "DeploymentNotFound",
                    "message": f"The API deployment {DEPLOYMENT} does not exist.",
                }
            },
        ),
        (404, {"error": {"code": "404", "message": "Resource not found"}}),
        (404, b"<html>not found</html>"),
        (
            400,
            {
                "error": {
                    "code": "OperationNotSupported",
                    "message": "The imagesGenerations operation does not work.",
                }
            },
        ),
    ],
)
async def test_configuration_errors_become_upstream_error(
    provider_for: Build, status: int, body: Any
) -> None:
    """A missing deployment or route is the gateway's fault: 502, retryable, nothing internal relayed."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    h = await provider_for(lambda _: web.Response(status=status, body=content))
    with pytest.raises(UpstreamError) as info:
        await h.provider.generate(make_job(), upstream_model=DEPLOYMENT)
    exc = info.value
    assert type(exc) is UpstreamError
    assert (exc.status_code, exc.code, exc.message) == (502, "upstream_error", NOT_CONFIGURED)


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [
        ({"retry-after": "12", "x-ratelimit-reset-requests": "60"}, "12"),
        ({"retry-after-ms": "1500", "x-ratelimit-reset-requests": "60"}, "2"),
        ({"x-ratelimit-reset-requests": "6m0s"}, "360"),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "1.5"}, "2"),
        ({"x-ratelimit-reset-tokens": "250ms"}, "1"),
        ({"x-ratelimit-reset-requests": "soon"}, None),
        ({}, None),
    ],
)
async def test_429_retry_after(provider_for: Build, headers: dict[str, str], retry_after: str | None) -> None:
    body = {"error": {"code": "429", "message": "Rate limit. Please retry after 12 seconds."}}
    h = await provider_for(lambda _: json_response(429, body, headers))
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model=DEPLOYMENT)
    exc = info.value
    assert exc.status_code == 429 and exc.retryable
    assert exc.retry_after == retry_after
    assert exc.headers.get("retry-after") == retry_after


async def test_secrets_scrubbed(provider_for: Build) -> None:
    def answer(request: web.Request) -> web.Response:
        message = (
            f"Call to http://{request.host}{request.raw_path} with key {API_KEY} failed on {request.host}: "
            f"resource contoso-images, deployment {DEPLOYMENT} overloaded"
        )
        body = {
            "error": {"code": "ServiceUnavailable", "message": message, "hint": f"retry {DEPLOYMENT} later"}
        }
        return json_response(503, body)

    h = await provider_for(answer)
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model=DEPLOYMENT)
    exc = info.value
    assert exc.status_code == 503 and exc.retryable
    rendered = str(exc) + orjson.dumps(exc.to_body()).decode()
    for leaked in (API_KEY, h.endpoint, HOST, "contoso-images", DEPLOYMENT, "http://"):
        assert leaked not in rendered
    assert exc.to_body()["error"]["hint"] == "retry [redacted] later"


# --- helpers and wiring -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("12", 12.0),
        ("1.5", 1.5),
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("1h2m3s", 3723.0),
        ("250ms", 0.25),
        ("", None),
        (None, None),
        ("-1", None),
        ("nan", None),
        ("5 s", None),
        ("1sx", None),
    ],
)
def test_parse_duration(value: str | None, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


def test_reset_headers_untouched_without_a_reset() -> None:
    headers = {"Content-Type": "application/json"}
    assert with_reset_retry_after(headers) is headers


def test_resource_endpoint() -> None:
    assert resource_endpoint("https://r.openai.azure.com/openai/") == "https://r.openai.azure.com"
    assert resource_endpoint("http://127.0.0.1:9000") == "http://127.0.0.1:9000"


async def test_registry_builds_an_azure_provider() -> None:
    settings = UpstreamSettings(
        name="azure",
        kind="azure",
        base_url=ENDPOINT + "/",
        api_key=API_KEY,
        models=["gpt-image-1.5", {"name": "gpt-image-1", "upstream_model": DEPLOYMENT}],
    )
    registry = ProviderRegistry.build([settings], CATALOG)
    try:
        (provider,) = registry.providers()
        assert isinstance(provider, AzureOpenAIProvider)
        assert provider._api_version == DEFAULT_API_VERSION
        assert provider._images_url("edits", DEPLOYMENT) == (
            f"{ENDPOINT}/openai/deployments/{DEPLOYMENT}/images/edits?api-version={DEFAULT_API_VERSION}"
        )
        assert DEPLOYMENT in provider._secrets and "gpt-image-1.5" not in provider._secrets
        assert [r.upstream_model for r in registry.routes("gpt-image-1")] == [DEPLOYMENT]
        assert [r.upstream_model for r in registry.routes("gpt-image-1.5")] == ["gpt-image-1.5"]
    finally:
        await registry.aclose()
