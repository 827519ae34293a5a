"""AzureOpenAIProvider against httpx.MockTransport: addressing, auth, bodies, streams, error shapes."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.errors import UpstreamError, UpstreamRejected
from app.images.capabilities import Catalog
from app.images.jobs import ImageJob, InputImage
from app.settings import UpstreamSettings
from app.upstream.providers.azure import (
    DEFAULT_API_VERSION,
    NOT_CONFIGURED,
    AzureOpenAIProvider,
    parse_duration,
    resource_endpoint,
    with_reset_retry_after,
)
from app.upstream.registry import ProviderRegistry

CATALOG = Catalog.from_file(Path(__file__).resolve().parents[2] / "config" / "models.yaml")
ENDPOINT = "https://contoso-images.openai.azure.com"
HOST = "contoso-images.openai.azure.com"
API_KEY = "0123456789abcdef0123456789abcdef"
DEPLOYMENT = "prod-img-east"
VERSION = "2025-04-01-preview"
GENERATIONS = f"{ENDPOINT}/openai/deployments/{DEPLOYMENT}/images/generations?api-version={VERSION}"
B64 = base64.b64encode(b"\x89PNG azure image bytes").decode()

Handler = Callable[[httpx.Request], httpx.Response]


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


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, content=orjson.dumps(body), headers={"content-type": "application/json", **(headers or {})}
    )


def ok(_: httpx.Request) -> httpx.Response:
    return json_response(200, {"created": 1700000000, "data": [{"b64_json": B64}]})


class Recorder:
    def __init__(self, answer: Handler = ok) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()  # multipart bodies are streamed from the spooled files: read them while open
        self.requests.append(request)
        return self.answer(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


@pytest.fixture
async def provider_for() -> AsyncIterator[Callable[..., AzureOpenAIProvider]]:
    clients: list[httpx.AsyncClient] = []

    def build(handler: Handler, **kwargs: Any) -> AzureOpenAIProvider:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        clients.append(client)
        options: dict[str, Any] = {
            "name": "azure",
            "base_url": ENDPOINT,
            "api_key": API_KEY,
            "api_version": VERSION,
            "deployments": [DEPLOYMENT],
            **kwargs,
        }
        return AzureOpenAIProvider(client=client, **options)

    yield build
    for client in clients:
        await client.aclose()


# --- requests ---------------------------------------------------------------------------------------


async def test_generation_url_auth_and_body(provider_for: Callable[..., AzureOpenAIProvider]) -> None:
    rec = Recorder()
    job = make_job(quality="low", safety_identifier="user-42", future_field={"x": 1})
    result = await provider_for(rec).generate(job, upstream_model=DEPLOYMENT)

    request = rec.last
    assert request.method == "POST"
    assert str(request.url) == GENERATIONS
    assert request.url.params["api-version"] == VERSION
    assert request.headers["api-key"] == API_KEY
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-request-id"] == "req_az"
    body = orjson.loads(request.content)
    # The deployment decides the model; every other field goes as the client sent it.
    assert "model" not in body
    assert body == {
        "prompt": "a red fox",
        "quality": "low",
        "safety_identifier": "user-42",
        "future_field": {"x": 1},
    }
    assert result.body["data"][0]["b64_json"] == B64


async def test_dall_e_deployment_still_asks_for_base64(
    provider_for: Callable[..., AzureOpenAIProvider],
) -> None:
    rec = Recorder()
    await provider_for(rec).generate(make_job(model="dall-e-3", style="vivid"), upstream_model="dalle3")
    body = orjson.loads(rec.last.content)
    assert body == {"prompt": "a red fox", "style": "vivid", "response_format": "b64_json"}
    assert rec.last.url.path == "/openai/deployments/dalle3/images/generations"


@pytest.mark.parametrize(
    "base_url",
    [ENDPOINT, ENDPOINT + "/", ENDPOINT + "/openai", ENDPOINT + "/openai/", ENDPOINT + "/OpenAI"],
)
async def test_base_url_forms(provider_for: Callable[..., AzureOpenAIProvider], base_url: str) -> None:
    rec = Recorder()
    await provider_for(rec, base_url=base_url).generate(make_job(), upstream_model=DEPLOYMENT)
    assert str(rec.last.url) == GENERATIONS


async def test_default_api_version_and_quoted_deployment(
    provider_for: Callable[..., AzureOpenAIProvider],
) -> None:
    rec = Recorder()
    await provider_for(rec, api_version=None).generate(make_job(), upstream_model="img deploy/1")
    assert rec.last.url.raw_path.decode() == (
        f"/openai/deployments/img%20deploy%2F1/images/generations?api-version={DEFAULT_API_VERSION}"
    )


async def test_no_key_sends_no_auth_header(provider_for: Callable[..., AzureOpenAIProvider]) -> None:
    rec = Recorder()
    await provider_for(rec, api_key=None).generate(make_job(), upstream_model=DEPLOYMENT)
    assert "api-key" not in rec.last.headers and "authorization" not in rec.last.headers


async def test_edit_multipart_to_the_deployment(
    provider_for: Callable[..., AzureOpenAIProvider], tmp_path: Path
) -> None:
    rec = Recorder()
    images = (input_image(tmp_path / "a", b"\x89PNG-first"), input_image(tmp_path / "b", b"\x89PNG-second"))
    job = dataclasses.replace(
        make_job("edits", input_fidelity="high"), images=images, mask=input_image(tmp_path / "m", b"MASK")
    )
    await provider_for(rec).edit(job, upstream_model=DEPLOYMENT)

    request = rec.last
    assert str(request.url) == GENERATIONS.replace("/generations?", "/edits?")
    assert request.headers["api-key"] == API_KEY and "authorization" not in request.headers
    assert request.headers["content-type"].startswith("multipart/form-data")
    content = request.content
    assert b'name="model"' not in content
    assert b'name="prompt"\r\n\r\na red fox' in content
    assert b'name="input_fidelity"\r\n\r\nhigh' in content
    assert (
        content.count(b'name="image[]"') == 2 and b"\x89PNG-first" in content and b"\x89PNG-second" in content
    )
    assert b'name="mask"' in content and b"MASK" in content


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(
        f"event: {name}\ndata: {orjson.dumps(data).decode()}\n\n".encode() for name, data in events
    )


async def test_stream_relays_events(provider_for: Callable[..., AzureOpenAIProvider]) -> None:
    partial = {"type": "image_generation.partial_image", "b64_json": B64, "partial_image_index": 0}
    done = {"type": "image_generation.completed", "b64_json": B64, "usage": {"total_tokens": 3}}
    body = sse(("image_generation.partial_image", partial), ("image_generation.completed", done))
    rec = Recorder(
        lambda _: httpx.Response(
            200, stream=httpx.ByteStream(body), headers={"content-type": "text/event-stream"}
        )
    )
    job = make_job(partial_images=1)
    events = [e async for e in provider_for(rec).stream(job, upstream_model=DEPLOYMENT)]

    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[1].data == done
    assert str(rec.last.url) == GENERATIONS
    assert rec.last.headers["accept"] == "text/event-stream"
    sent = orjson.loads(rec.last.content)
    assert sent["stream"] is True and sent["partial_images"] == 1 and "model" not in sent


async def test_stream_error_status_is_mapped_before_any_event(
    provider_for: Callable[..., AzureOpenAIProvider],
) -> None:
    rec = Recorder(lambda _: json_response(400, content_filter_body()))
    events = provider_for(rec).stream(make_job(), upstream_model=DEPLOYMENT)
    with pytest.raises(UpstreamRejected) as info:
        await anext(events)
    assert info.value.code == "moderation_blocked"


async def test_stream_error_event_is_mapped(provider_for: Callable[..., AzureOpenAIProvider]) -> None:
    error = {
        "error": {"code": "content_filter", "message": "Generated image was filtered by the safety system."}
    }
    body = sse(("error", error))
    rec = Recorder(
        lambda _: httpx.Response(
            200, stream=httpx.ByteStream(body), headers={"content-type": "text/event-stream"}
        )
    )
    with pytest.raises(UpstreamRejected) as info:
        async for _ in provider_for(rec).stream(make_job(), upstream_model=DEPLOYMENT):
            pass
    assert info.value.to_body()["error"]["moderation_details"] == {
        "moderation_stage": "output",
        "categories": [],
    }


async def test_probe_lists_models_with_api_version(provider_for: Callable[..., AzureOpenAIProvider]) -> None:
    rec = Recorder(lambda _: httpx.Response(401))
    assert await provider_for(rec).probe() is True
    assert str(rec.last.url) == f"{ENDPOINT}/openai/models?api-version={VERSION}"
    assert rec.last.headers["api-key"] == API_KEY


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
    provider_for: Callable[..., AzureOpenAIProvider],
    status: int,
    body: dict[str, Any],
    expected: tuple[int, str, str, str | None, str | None, list[str] | None],
) -> None:
    provider = provider_for(Recorder(lambda _: json_response(status, body)))
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model=DEPLOYMENT)
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
    provider_for: Callable[..., AzureOpenAIProvider], status: int, body: Any
) -> None:
    """A missing deployment or route is the gateway's fault: 502, retryable, nothing internal relayed."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    provider = provider_for(Recorder(lambda _: httpx.Response(status, content=content)))
    with pytest.raises(UpstreamError) as info:
        await provider.generate(make_job(), upstream_model=DEPLOYMENT)
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
async def test_429_retry_after(
    provider_for: Callable[..., AzureOpenAIProvider], headers: dict[str, str], retry_after: str | None
) -> None:
    body = {"error": {"code": "429", "message": "Rate limit. Please retry after 12 seconds."}}
    provider = provider_for(Recorder(lambda _: json_response(429, body, headers)))
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model=DEPLOYMENT)
    exc = info.value
    assert exc.status_code == 429 and exc.retryable
    assert exc.retry_after == retry_after
    assert exc.headers.get("retry-after") == retry_after


async def test_secrets_scrubbed(provider_for: Callable[..., AzureOpenAIProvider]) -> None:
    message = (
        f"Call to {GENERATIONS} with key {API_KEY} failed on {HOST}: resource contoso-images, "
        f"deployment {DEPLOYMENT} overloaded"
    )
    body = {"error": {"code": "ServiceUnavailable", "message": message, "hint": f"retry {DEPLOYMENT} later"}}
    provider = provider_for(Recorder(lambda _: json_response(503, body)))
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model=DEPLOYMENT)
    exc = info.value
    assert exc.status_code == 503 and exc.retryable
    rendered = str(exc) + orjson.dumps(exc.to_body()).decode()
    for leaked in (API_KEY, ENDPOINT, HOST, "contoso-images", DEPLOYMENT, "https://"):
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
