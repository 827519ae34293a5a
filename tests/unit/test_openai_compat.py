"""OpenAICompatProvider and the upstream error mapping, against httpx.MockTransport upstreams."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from app.images.capabilities import Catalog
from app.images.jobs import ImageJob, TokenUsage
from app.upstream.errors import map_httpx_errors, rejected_from_response, sanitize, upstream_secrets
from app.upstream.providers.openai_compat import OpenAICompatProvider

CATALOG = Catalog.from_file(Path(__file__).resolve().parents[2] / "config" / "models.yaml")
BASE_URL = "https://upstream.internal.example:8443/v1"
HOST = "upstream.internal.example"
API_KEY = "sk-proj-SECRETsecret0123456789"
SECRETS = upstream_secrets(BASE_URL, API_KEY)
B64 = base64.b64encode(b"\x89PNG fake image bytes").decode()

Handler = Callable[[httpx.Request], httpx.Response]


def make_job(model: str = "gpt-image-1", **forward: Any) -> ImageJob:
    caps = CATALOG.get(model)
    assert caps is not None
    body: dict[str, Any] = {"model": model, "prompt": "a red fox", **forward}
    return ImageJob(
        request_id="req_123",
        endpoint="generations",
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
        forward=body,
    )


def ok_body(**extra: Any) -> dict[str, Any]:
    return {"created": 1700000000, "data": [{"b64_json": B64}], **extra}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, content=orjson.dumps(body), headers={"content-type": "application/json", **(headers or {})}
    )


class Recorder:
    """A MockTransport handler that records requests and answers with a scripted response."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    @property
    def last_json(self) -> Any:
        return orjson.loads(self.requests[-1].content)


@pytest.fixture
async def provider_for() -> AsyncIterator[Callable[..., OpenAICompatProvider]]:
    clients: list[httpx.AsyncClient] = []

    def build(handler: Handler, *, api_key: str | None = API_KEY) -> OpenAICompatProvider:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        clients.append(client)
        return OpenAICompatProvider(name="primary", base_url=BASE_URL + "/", api_key=api_key, client=client)

    yield build
    for client in clients:
        await client.aclose()


# --- requests ---------------------------------------------------------------------------------------


async def test_request_url_headers_and_body(provider_for: Callable[..., OpenAICompatProvider]) -> None:
    rec = Recorder(lambda _: json_response(200, ok_body()))
    provider = provider_for(rec)
    job = make_job(
        "gpt-image-1", response_format="url", stream=False, safety_identifier="user-42", complexity=7
    )
    await provider.generate(job, upstream_model="gpt-image-1-2025-04-15")

    request = rec.requests[0]
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/images/generations"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-request-id"] == "req_123"
    body = rec.last_json
    assert body["model"] == "gpt-image-1-2025-04-15"
    assert body["prompt"] == "a red fox"
    assert body["safety_identifier"] == "user-42"
    assert body["complexity"] == 7
    # GPT-Image rejects response_format and always answers base64; stream is the gateway's decision.
    assert "response_format" not in body
    assert "stream" not in body


async def test_dalle_asks_for_base64_and_drops_gateway_only_fields(
    provider_for: Callable[..., OpenAICompatProvider],
) -> None:
    rec = Recorder(lambda _: json_response(200, ok_body()))
    job = make_job("dall-e-3", response_format="url", moderation="low", style="vivid")
    await provider_for(rec).generate(job, upstream_model="dall-e-3")
    body = rec.last_json
    assert body["response_format"] == "b64_json"
    assert body["style"] == "vivid"
    assert "moderation" not in body


async def test_no_authorization_header_without_key(provider_for: Callable[..., OpenAICompatProvider]) -> None:
    for key in ("", None):
        rec = Recorder(lambda _: json_response(200, ok_body()))
        await provider_for(rec, api_key=key).generate(make_job(), upstream_model="gpt-image-1")
        assert "authorization" not in rec.requests[0].headers


# --- successful answers -----------------------------------------------------------------------------


async def test_usage_parsed_and_body_relayed_as_is(provider_for: Callable[..., OpenAICompatProvider]) -> None:
    usage = {
        "input_tokens": 50,
        "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
        "output_tokens": 1056,
        "total_tokens": 1106,
    }
    answer = ok_body(usage=usage, size="1024x1024", quality="medium", unknown_field={"x": 1})
    result = await provider_for(Recorder(lambda _: json_response(200, answer))).generate(
        make_job(), upstream_model="gpt-image-1"
    )
    assert result.raw == orjson.dumps(answer)  # what is relayed
    assert result.body == answer
    assert result.body["data"][0]["b64_json"] == B64
    assert result.usage == TokenUsage(text_input=40, image_input=10, text_output=0, image_output=1056)
    assert result.raw_usage == usage
    assert result.image_count == 1


async def test_no_usage(provider_for: Callable[..., OpenAICompatProvider]) -> None:
    result = await provider_for(Recorder(lambda _: json_response(200, ok_body()))).generate(
        make_job("dall-e-2"), upstream_model="dall-e-2"
    )
    assert result.usage is None
    assert result.raw_usage is None


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1, 2]", b'{"created": 1}', b'{"data": {"b64_json": "x"}}', b""],
)
async def test_invalid_success_body_is_upstream_error(
    provider_for: Callable[..., OpenAICompatProvider], content: bytes
) -> None:
    provider = provider_for(Recorder(lambda _: httpx.Response(200, content=content)))
    with pytest.raises(UpstreamError) as info:
        await provider.generate(make_job(), upstream_model="gpt-image-1")
    assert type(info.value) is UpstreamError
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"


# --- error answers ----------------------------------------------------------------------------------


async def test_400_relayed_with_type_param_code_and_moderation_details(
    provider_for: Callable[..., OpenAICompatProvider],
) -> None:
    error = {
        "message": "Your request was rejected by the safety system.",
        "type": "image_generation_user_error",
        "param": None,
        "code": "moderation_blocked",
        "moderation_details": {"moderation_stage": "input", "categories": ["violence"]},
    }
    provider = provider_for(Recorder(lambda _: json_response(400, {"error": error})))
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert exc.status_code == 400
    assert not exc.retryable
    assert exc.to_body() == {"error": error}


async def test_400_with_param(provider_for: Callable[..., OpenAICompatProvider]) -> None:
    error = {"message": "Invalid size.", "type": "invalid_request_error", "param": "size", "code": 400}
    provider = provider_for(Recorder(lambda _: json_response(400, {"error": error})))
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model="gpt-image-1")
    assert (info.value.param, info.value.code, info.value.error_type) == (
        "size",
        "400",
        "invalid_request_error",
    )


async def test_429_keeps_retry_after(provider_for: Callable[..., OpenAICompatProvider]) -> None:
    body = {"error": {"message": "Rate limit reached.", "type": "requests", "code": "rate_limit_exceeded"}}
    provider = provider_for(Recorder(lambda _: json_response(429, body, {"Retry-After": "7"})))
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert exc.status_code == 429
    assert exc.retryable
    assert exc.retry_after == "7"
    assert exc.headers["retry-after"] == "7"
    assert exc.code == "rate_limit_exceeded"


async def test_500_message_sanitised(provider_for: Callable[..., OpenAICompatProvider]) -> None:
    message = (
        f"Internal error calling {BASE_URL}/images/generations on {HOST} with key {API_KEY}; "
        f"see http://10.0.0.5:9000/debug?key={API_KEY}"
    )
    body = {"error": {"message": message, "type": "server_error", "code": None, "trace": f"at {HOST}:8443"}}
    provider = provider_for(Recorder(lambda _: json_response(500, body)))
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert exc.status_code == 500
    assert exc.retryable
    rendered = [str(exc), orjson.dumps(exc.to_body()).decode()]
    for text in rendered:
        for leaked in (API_KEY, BASE_URL, HOST, "10.0.0.5", "SECRET", "https://", "http://"):
            assert leaked not in text
    assert str(exc).startswith("Internal error calling ")


async def test_non_json_error_body(provider_for: Callable[..., OpenAICompatProvider]) -> None:
    html = f"<html><body>502 Bad Gateway at {BASE_URL}</body></html>"
    provider = provider_for(Recorder(lambda _: httpx.Response(502, text=html)))
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert exc.status_code == 502
    assert exc.message == "The upstream service returned an error (HTTP 502)."
    assert exc.error_type == "api_error"
    assert exc.code == "upstream_error"  # UpstreamRejected's default when the upstream gives none
    assert HOST not in orjson.dumps(exc.to_body()).decode()


async def test_redirect_is_not_followed_and_becomes_502(
    provider_for: Callable[..., OpenAICompatProvider],
) -> None:
    provider = provider_for(
        Recorder(lambda _: httpx.Response(302, headers={"location": "https://evil.test/"}))
    )
    with pytest.raises(UpstreamRejected) as info:
        await provider.generate(make_job(), upstream_model="gpt-image-1")
    assert info.value.status_code == 502


# --- transport failures -----------------------------------------------------------------------------


def raiser(exc_type: type[httpx.RequestError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(f"failed talking to {request.url} ({HOST})", request=request)

    return handler


@pytest.mark.parametrize(
    ("exc_type", "expected", "status", "code"),
    [
        (httpx.ConnectError, UpstreamUnavailable, 502, "upstream_unavailable"),
        (httpx.RemoteProtocolError, UpstreamUnavailable, 502, "upstream_unavailable"),
        (httpx.ReadError, UpstreamUnavailable, 502, "upstream_unavailable"),
        (httpx.ReadTimeout, UpstreamTimeout, 504, "upstream_timeout"),
        (httpx.ConnectTimeout, UpstreamTimeout, 504, "upstream_timeout"),
        (httpx.DecodingError, UpstreamError, 502, "upstream_error"),
    ],
)
async def test_transport_errors(
    provider_for: Callable[..., OpenAICompatProvider],
    exc_type: type[httpx.RequestError],
    expected: type[UpstreamError],
    status: int,
    code: str,
) -> None:
    provider = provider_for(raiser(exc_type))
    with pytest.raises(UpstreamError) as info:
        await provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert type(exc) is expected
    assert (exc.status_code, exc.code) == (status, code)
    assert isinstance(exc.__cause__, exc_type)
    for text in (str(exc), orjson.dumps(exc.to_body()).decode()):
        assert HOST not in text
        assert "https://" not in text


def test_map_httpx_errors_http_status_error() -> None:
    request = httpx.Request("POST", f"{BASE_URL}/images/generations")
    response = json_response(503, {"error": {"message": f"down at {HOST}", "type": "server_error"}})
    response.request = request
    with pytest.raises(UpstreamRejected) as info, map_httpx_errors(secrets=SECRETS):
        response.raise_for_status()
    assert info.value.status_code == 503
    assert info.value.message == "down at [redacted]"


def test_map_httpx_errors_leaves_other_exceptions() -> None:
    with pytest.raises(KeyError), map_httpx_errors():
        raise KeyError("x")


# --- client lifecycle -------------------------------------------------------------------------------


async def test_aclose_closes_only_its_own_client() -> None:
    own = OpenAICompatProvider(name="a", base_url=BASE_URL, api_key=API_KEY, timeout_s=5, max_connections=3)
    assert own._client.timeout == httpx.Timeout(5, connect=10.0)
    await own.aclose()
    assert own._client.is_closed

    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(200))) as client:
        injected = OpenAICompatProvider(name="b", base_url=BASE_URL, api_key=None, client=client)
        await injected.aclose()
        assert not client.is_closed


# --- sanitize and rejected_from_response ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("plain message", "plain message"),
        (f"Incorrect API key provided: {API_KEY}.", "Incorrect API key provided: sk-***."),
        ("key sk-abc_DEF-12345678 and sk-short", "key sk-*** and sk-short"),
        (f"POST {BASE_URL}/images/generations failed", "POST [redacted-url] failed"),
        ("see http://localhost:8000/x?y=1 now", "see [redacted-url] now"),
        (f"host {HOST} and {HOST.upper()} down", "host [redacted] and [redacted] down"),
        (f"base {BASE_URL.removeprefix('https://')}/x", "base [redacted]/x"),
    ],
)
def test_sanitize(message: str, expected: str) -> None:
    assert sanitize(message, secrets=SECRETS) == expected


def test_upstream_secrets() -> None:
    assert upstream_secrets("http://localhost:8000/v1/", None) == (
        "http://localhost:8000/v1/",
        "http://localhost:8000/v1",
        "localhost:8000/v1/",
        "localhost:8000/v1",
        "localhost:8000",
        "localhost",
    )
    assert upstream_secrets("https://api.openai.com/v1", "")[-1] == "api.openai.com"


def test_sanitize_custom_key_and_empty_secrets() -> None:
    assert (
        sanitize("azure key 0123abcd rejected", secrets=("0123abcd", "", ""))
        == "azure key [redacted] rejected"
    )
    assert sanitize("nothing", secrets=("",)) == "nothing"


def test_rejected_azure_shape_and_int_code() -> None:
    body = orjson.dumps(
        {"error": {"code": "DeploymentNotFound", "message": "The deployment does not exist."}}
    )
    exc = rejected_from_response(404, body, {}, secrets=SECRETS)
    assert (exc.status_code, exc.code, exc.param) == (404, "DeploymentNotFound", None)
    assert exc.error_type == "invalid_request_error"
    assert exc.message == "The deployment does not exist."

    exc = rejected_from_response(429, b'{"error": {"message": "slow", "code": 429}}', {}, secrets=())
    assert exc.code == "429"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": "model overloaded"}', "model overloaded"),
        (b'{"message": "bad prompt", "code": "x"}', "bad prompt"),
        (b'{"detail": "nope"}', "The upstream service returned an error (HTTP 400)."),
        (b'{"error": {"message": ""}}', "The upstream service returned an error (HTTP 400)."),
        (b'{"error": {"message": 42}}', "42"),
        (b"\xff\xfe", "The upstream service returned an error (HTTP 400)."),
    ],
)
def test_rejected_tolerates_odd_bodies(body: bytes, message: str) -> None:
    assert rejected_from_response(400, body, {}, secrets=()).message == message


@pytest.mark.parametrize(("status", "expected"), [(200, 502), (302, 502), (600, 502), (418, 418), (503, 503)])
def test_rejected_status_clamped(status: int, expected: int) -> None:
    assert rejected_from_response(status, b"", {}, secrets=()).status_code == expected


def test_rejected_retry_after_variants() -> None:
    assert rejected_from_response(429, b"", {"retry-after": "3"}, secrets=()).retry_after == "3"
    assert rejected_from_response(429, b"", {"Retry-After-Ms": "1500"}, secrets=()).retry_after == "2"
    assert rejected_from_response(429, b"", {"retry-after-ms": "soon"}, secrets=()).retry_after is None
    assert rejected_from_response(429, b"", {}, secrets=()).retry_after is None


def test_rejected_details_sanitised_recursively() -> None:
    body = orjson.dumps(
        {"error": {"message": "m", "inner": {"url": f"{BASE_URL}/x", "list": [API_KEY, 1, None]}}}
    )
    exc = rejected_from_response(400, body, {}, secrets=SECRETS)
    assert exc.details == {"inner": {"url": "[redacted-url]", "list": ["sk-***", 1, None]}}
    assert exc.to_body()["error"]["inner"]["url"] == "[redacted-url]"


def test_rejected_long_message_truncated() -> None:
    body = orjson.dumps({"error": {"message": "x" * 10_000}})
    assert len(rejected_from_response(500, body, {}, secrets=()).message) == 2000
