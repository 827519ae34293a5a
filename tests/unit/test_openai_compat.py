"""OpenAICompatProvider and the upstream error mapping, against real HTTP upstreams on 127.0.0.1.

Upstreams are scripted aiohttp.web servers (``tests.fakes.scripted_http``), or raw TCP servers for
what no well-behaved server sends; a loopback resolver lets the provider use a real-looking host
name, so that scrubbing it from messages is tested too.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from app.core.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from app.domain.catalog import Catalog
from app.domain.jobs import ImageJob, InputImage, TokenUsage
from app.upstream.client import KEEPALIVE_S, client_timeout, env_proxy, new_session, trust_store
from app.upstream.errors import (
    map_aiohttp_errors,
    rejected_from_response,
    sanitize,
    upstream_secrets,
)
from app.upstream.providers.openai_compat import OpenAICompatProvider
from tests.fakes.scripted_http import (
    Answer,
    HangingResolver,
    LoopbackResolver,
    RawUpstream,
    ScriptedUpstream,
    gzip_response,
    json_response,
    sse,
    sse_response,
)

CATALOG = Catalog.from_file(Path(__file__).resolve().parents[2] / "app" / "defaults" / "models.yaml")
# For the pure sanitising tests; providers run on the same host name, at a loopback port.
BASE_URL = "https://upstream.internal.example:8443/v1"
HOST = "upstream.internal.example"
API_KEY = "sk-proj-SECRETsecret0123456789"
SECRETS = upstream_secrets(BASE_URL, API_KEY)
B64 = base64.b64encode(b"\x89PNG fake image bytes").decode()


def make_job(model: str = "gpt-image-1", endpoint: str = "generations", **forward: Any) -> ImageJob:
    caps = CATALOG.get(model)
    assert caps is not None
    body: dict[str, Any] = {"model": model, "prompt": "a red fox", **forward}
    return ImageJob(
        request_id="req_123",
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
        forward=body,
    )


def input_image(path: Path, data: bytes, fmt: str = "png") -> InputImage:
    path.write_bytes(data)
    return InputImage(path=path, filename=None, format=fmt, width=8, height=8, has_alpha=True, size=len(data))


def ok_body(**extra: Any) -> dict[str, Any]:
    return {"created": 1700000000, "data": [{"b64_json": B64}], **extra}


def ok(_: web.Request) -> web.Response:
    return json_response(200, ok_body())


@dataclasses.dataclass
class Harness:
    provider: OpenAICompatProvider
    upstream: ScriptedUpstream
    base_url: str


Build = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


@pytest.fixture
def provider_for(stack: AsyncExitStack) -> Build:
    """A provider on ``http://upstream.internal.example:<port>/v1``, a scripted upstream behind it."""

    async def build(
        answer: Answer = ok,
        *,
        api_key: str | None = API_KEY,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
    ) -> Harness:
        upstream = await stack.enter_async_context(ScriptedUpstream(answer))
        base_url = f"http://{HOST}:{upstream.port}/v1"
        provider = await provider_on(stack, base_url, api_key, timeout_s, connect_timeout_s)
        return Harness(provider, upstream, base_url)

    return build


async def provider_on(
    stack: AsyncExitStack,
    base_url: str,
    api_key: str | None = API_KEY,
    timeout_s: float = 300.0,
    connect_timeout_s: float = 10.0,
    resolver: aiohttp.abc.AbstractResolver | None = None,
) -> OpenAICompatProvider:
    # The session the provider would make itself, with a resolver aiming every name at loopback.
    session = new_session(
        client_timeout(timeout_s, connect_timeout_s),
        max_connections=10,
        resolver=resolver or LoopbackResolver(),
    )
    stack.push_async_callback(session.close)
    return OpenAICompatProvider(
        name="primary",
        base_url=base_url + "/",
        api_key=api_key,
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        session=session,
    )


# --- requests ---------------------------------------------------------------------------------------


async def test_request_url_headers_and_body(provider_for: Build) -> None:
    h = await provider_for()
    job = make_job(
        "gpt-image-1", response_format="url", stream=False, safety_identifier="user-42", complexity=7
    )
    await h.provider.generate(job, upstream_model="gpt-image-1-2025-04-15")

    request = h.upstream.last
    assert request.method == "POST"
    assert request.url == f"{h.base_url}/images/generations"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert request.headers["x-request-id"] == "req_123"
    body = request.json()
    assert body["model"] == "gpt-image-1-2025-04-15"
    assert body["prompt"] == "a red fox"
    assert body["safety_identifier"] == "user-42"
    assert body["complexity"] == 7
    # GPT-Image rejects response_format and always answers base64; stream is the gateway's decision.
    assert "response_format" not in body
    assert "stream" not in body


async def test_dalle_asks_for_base64_and_drops_gateway_only_fields(provider_for: Build) -> None:
    h = await provider_for()
    job = make_job("dall-e-3", response_format="url", moderation="low", style="vivid")
    await h.provider.generate(job, upstream_model="dall-e-3")
    body = h.upstream.last.json()
    assert body["response_format"] == "b64_json"
    assert body["style"] == "vivid"
    assert "moderation" not in body


async def test_no_authorization_header_without_key(provider_for: Build) -> None:
    for key in ("", None):
        h = await provider_for(api_key=key)
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
        assert "authorization" not in h.upstream.last.headers


async def test_pooled_connection_is_reused(provider_for: Build) -> None:
    h = await provider_for()
    for _ in range(3):
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    assert len({r.peer_port for r in h.upstream.requests}) == 1


async def test_edit_multipart_parts_as_httpx_sent_them(provider_for: Build, tmp_path: Path) -> None:
    h = await provider_for()
    images = (
        input_image(tmp_path / "a", b"\x89PNG-first"),
        input_image(tmp_path / "b", b"\xff\xd8JPEG-second", fmt="jpeg"),
    )
    job = dataclasses.replace(
        make_job("gpt-image-1", "edits", input_fidelity="high", n=2, metadata={"x": 1}),
        images=images,
        mask=input_image(tmp_path / "m", b"MASK"),
    )
    await h.provider.edit(job, upstream_model="gpt-image-1-2025-04-15")

    request = h.upstream.last
    assert request.url == f"{h.base_url}/images/edits"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["accept"] == "application/json"
    assert request.headers["x-request-id"] == "req_123"
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    # A length, not chunks: the size of the spooled files is known.
    assert int(request.headers["content-length"]) == len(request.body)
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    parts = request.body.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n"
    heads = {}
    for part in parts[1:-1]:
        head, _, value = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        heads[head] = value.removesuffix(b"\r\n")
    # Text fields without a Content-Type, as httpx and the SDKs send them; objects as bracketed
    # fields (`metadata[x]`), the SDKs' encoding of `svg[model]`.
    field = b'Content-Disposition: form-data; name="%s"'
    file = b'Content-Type: image/%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"'
    assert heads == {
        field % b"model": b"gpt-image-1-2025-04-15",
        field % b"prompt": b"a red fox",
        field % b"input_fidelity": b"high",
        field % b"n": b"2",
        field % b"metadata[x]": b"1",
        file % (b"png", b"image[]", b"image-0.png"): b"\x89PNG-first",
        file % (b"jpeg", b"image[]", b"image-1.jpg"): b"\xff\xd8JPEG-second",
        file % (b"png", b"mask", b"mask-0.png"): b"MASK",
    }


async def test_edit_single_image_dalle_and_stream_fields(provider_for: Build, tmp_path: Path) -> None:
    h = await provider_for()
    job = dataclasses.replace(
        make_job("dall-e-2", "edits", response_format="url", flag=True, **{'odd"na\\me\n': "v"}),
        images=(input_image(tmp_path / "a", b"\x89PNG"),),
    )
    await h.provider.edit(job, upstream_model="dall-e-2")
    body = h.upstream.last.body
    assert b'name="image"; filename="image-0.png"' in body and b"image[]" not in body
    assert b'name="response_format"\r\n\r\nb64_json\r\n' in body
    assert b'name="flag"\r\n\r\ntrue\r\n' in body
    assert b'name="odd%22na\\\\me%0A"\r\n\r\nv\r\n' in body  # escaped the HTML5 way, as httpx did
    assert b'name="stream"' not in body

    h.upstream.answer = sse_response(
        sse(("image_edit.completed", {"type": "image_edit.completed", "b64_json": B64}))
    )
    events = [e async for e in h.provider.stream(job, upstream_model="dall-e-2")]
    assert [e.type for e in events] == ["image_edit.completed"]
    assert b'name="stream"\r\n\r\ntrue\r\n' in h.upstream.last.body
    assert h.upstream.last.headers["accept"] == "text/event-stream"


# --- successful answers -----------------------------------------------------------------------------


async def test_usage_parsed_and_body_relayed_as_is(provider_for: Build) -> None:
    usage = {
        "input_tokens": 50,
        "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
        "output_tokens": 1056,
        "total_tokens": 1106,
    }
    answer = ok_body(usage=usage, size="1024x1024", quality="medium", unknown_field={"x": 1})
    h = await provider_for(lambda _: json_response(200, answer))
    result = await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    assert result.raw == orjson.dumps(answer)  # what is relayed
    assert result.body == answer
    assert result.body["data"][0]["b64_json"] == B64
    assert result.usage == TokenUsage(text_input=40, image_input=10, text_output=0, image_output=1056)
    assert result.raw_usage == usage
    assert result.image_count == 1


async def test_gzip_answer_is_relayed_decoded(provider_for: Build) -> None:
    h = await provider_for(lambda _: gzip_response(ok_body()))
    result = await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    assert "gzip" in h.upstream.last.headers["accept-encoding"]
    assert result.raw == orjson.dumps(ok_body())


async def test_no_usage(provider_for: Build) -> None:
    h = await provider_for()
    result = await h.provider.generate(make_job("dall-e-2"), upstream_model="dall-e-2")
    assert result.usage is None
    assert result.raw_usage is None


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1, 2]", b'{"created": 1}', b'{"data": {"b64_json": "x"}}', b""],
)
async def test_invalid_success_body_is_upstream_error(provider_for: Build, content: bytes) -> None:
    h = await provider_for(lambda _: web.Response(status=200, body=content))
    with pytest.raises(UpstreamError) as info:
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    assert type(info.value) is UpstreamError
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"


# --- streams ----------------------------------------------------------------------------------------

PARTIAL = {"type": "image_generation.partial_image", "b64_json": B64, "partial_image_index": 0}
DONE = {"type": "image_generation.completed", "b64_json": B64, "usage": {"total_tokens": 3}}


async def test_stream_relays_events_split_anywhere(provider_for: Build) -> None:
    whole = b"".join(sse(("image_generation.partial_image", PARTIAL), ("image_generation.completed", DONE)))
    chunks = [whole[i : i + 7] for i in range(0, len(whole), 7)] + [b"data: [DONE]\n\n"]
    h = await provider_for(sse_response(chunks, pause_s=0.001))
    job = make_job(partial_images=1)
    events = [e async for e in h.provider.stream(job, upstream_model="gpt-image-1")]

    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[1].data == DONE
    assert events[1].raw == orjson.dumps(DONE)
    request = h.upstream.last
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["content-type"] == "application/json"
    assert request.json()["stream"] is True


async def test_stream_not_cut_by_total_time_only_by_silence(provider_for: Build) -> None:
    """The read timeout bounds the wait for each chunk, never the whole stream (httpx's semantics).

    The upstream sends an event every 20 ms (1/75 of the read timeout, so a loaded CI box cannot
    stretch a gap to the bound) until the stream has run longer than the timeout itself."""
    timeout_s = 1.5
    partial, done = sse(("image_generation.partial_image", PARTIAL), ("image_generation.completed", DONE))
    sent: list[float] = []

    async def paced(request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        sent.append(loop.time())
        while loop.time() - sent[0] <= timeout_s * 1.3:
            await response.write(partial)
            sent.append(loop.time())
            await asyncio.sleep(0.02)
        await response.write(done)
        await response.write_eof()
        return response

    h = await provider_for(paced, timeout_s=timeout_s)
    events = [e async for e in h.provider.stream(make_job(), upstream_model="gpt-image-1")]
    assert len(events) == len(sent)  # every partial, then the completed event
    assert events[-1].type == "image_generation.completed"
    assert sent[-1] - sent[0] > timeout_s  # the stream outlived the read timeout

    # A stall that never ends is cut by the same bound (the first event is not: it came at once).
    chunks = sse(("image_generation.partial_image", PARTIAL))
    h = await provider_for(sse_response(chunks, then_hang=True), timeout_s=timeout_s)
    stream = h.provider.stream(make_job(), upstream_model="gpt-image-1")
    assert (await anext(stream)).type == "image_generation.partial_image"
    with pytest.raises(UpstreamTimeout):
        await anext(stream)


async def test_stream_json_answer_becomes_completed_events(provider_for: Build) -> None:
    h = await provider_for(lambda _: json_response(200, ok_body(usage={"total_tokens": 5})))
    events = [e async for e in h.provider.stream(make_job(), upstream_model="gpt-image-1")]
    assert [e.type for e in events] == ["image_generation.completed"]


async def test_stream_error_status_raised_before_any_event(provider_for: Build) -> None:
    error = {"message": "Rate limit reached.", "type": "requests", "code": "rate_limit_exceeded"}
    h = await provider_for(lambda _: json_response(429, {"error": error}, {"retry-after": "3"}))
    with pytest.raises(UpstreamRejected) as info:
        await anext(h.provider.stream(make_job(), upstream_model="gpt-image-1"))
    assert (info.value.status_code, info.value.retry_after, info.value.code) == (
        429,
        "3",
        "rate_limit_exceeded",
    )


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (b'event: error\ndata: {"error": {"message": "boom", "code": "server_error"}}\n\n', UpstreamRejected),
        (b"data: {not json\n\n", UpstreamError),
        (b"data: [1]\n\n", UpstreamError),
    ],
)
async def test_stream_bad_events(provider_for: Build, chunk: bytes, expected: type[UpstreamError]) -> None:
    h = await provider_for(sse_response([chunk]))
    with pytest.raises(expected) as info:
        async for _ in h.provider.stream(make_job(), upstream_model="gpt-image-1"):
            pass
    assert info.value.status_code == 502


async def test_leaving_a_stream_early_closes_the_connection(provider_for: Build) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(("image_generation.partial_image", PARTIAL))[0])
        while True:  # aiohttp.web notices a client gone only when writing
            await asyncio.sleep(0.01)
            await response.write(b": still working\n\n")

    h = await provider_for(endless)
    stream = h.provider.stream(make_job(), upstream_model="gpt-image-1")
    assert (await anext(stream)).type == "image_generation.partial_image"
    await stream.aclose()
    for _ in range(1000):
        if h.upstream.client_gone:
            break
        await asyncio.sleep(0.01)
    assert h.upstream.client_gone == ["/v1/images/generations"]
    # The broken connection did not go back to the pool: the next call gets a fresh one.
    h.upstream.answer = ok
    await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    assert h.upstream.requests[0].peer_port != h.upstream.requests[1].peer_port


async def test_stream_cut_mid_way_is_unavailable(stack: AsyncExitStack) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    event = sse(("image_generation.partial_image", PARTIAL))[0]
    raw = await stack.enter_async_context(RawUpstream(head + b"%x\r\n%s\r\n" % (len(event), event)))
    provider = await provider_on(stack, f"http://{HOST}:{raw.port}/v1")
    stream = provider.stream(make_job(), upstream_model="gpt-image-1")
    assert (await anext(stream)).type == "image_generation.partial_image"
    with pytest.raises(UpstreamUnavailable):
        await anext(stream)


# --- error answers ----------------------------------------------------------------------------------


async def test_400_relayed_with_type_param_code_and_moderation_details(provider_for: Build) -> None:
    error = {
        "message": "Your request was rejected by the safety system.",
        "type": "image_generation_user_error",
        "param": None,
        "code": "moderation_blocked",
        "moderation_details": {"moderation_stage": "input", "categories": ["violence"]},
    }
    h = await provider_for(lambda _: json_response(400, {"error": error}))
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert exc.status_code == 400
    assert not exc.retryable
    assert exc.to_body() == {"error": error}


async def test_400_with_param(provider_for: Build) -> None:
    error = {"message": "Invalid size.", "type": "invalid_request_error", "param": "size", "code": 400}
    h = await provider_for(lambda _: json_response(400, {"error": error}))
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    assert (info.value.param, info.value.code, info.value.error_type) == (
        "size",
        "400",
        "invalid_request_error",
    )


async def test_429_keeps_retry_after(provider_for: Build) -> None:
    body = {"error": {"message": "Rate limit reached.", "type": "requests", "code": "rate_limit_exceeded"}}
    h = await provider_for(lambda _: json_response(429, body, {"Retry-After": "7"}))
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert exc.status_code == 429
    assert exc.retryable
    assert exc.retry_after == "7"
    assert exc.headers["retry-after"] == "7"
    assert exc.code == "rate_limit_exceeded"


async def test_500_message_sanitised(provider_for: Build) -> None:
    def answer(request: web.Request) -> web.Response:
        base = f"http://{request.host}/v1"
        message = (
            f"Internal error calling {base}/images/generations on {HOST} with key {API_KEY}; "
            f"see http://10.0.0.5:9000/debug?key={API_KEY} or {request.host}/v1"
        )
        body = {
            "error": {"message": message, "type": "server_error", "code": None, "trace": f"at {HOST}:8443"}
        }
        return json_response(500, body)

    h = await provider_for(answer)
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert exc.status_code == 500
    assert exc.retryable
    rendered = [str(exc), orjson.dumps(exc.to_body()).decode()]
    for text in rendered:
        for leaked in (API_KEY, h.base_url, HOST, "10.0.0.5", "SECRET", "https://", "http://"):
            assert leaked not in text
    assert str(exc).startswith("Internal error calling ")


async def test_non_json_error_body(provider_for: Build) -> None:
    h = await provider_for(
        lambda request: web.Response(
            status=502, text=f"<html>502 Bad Gateway at http://{request.host}</html>"
        )
    )
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    exc = info.value
    assert exc.status_code == 502
    assert exc.message == "The upstream service returned an error (HTTP 502)."
    assert exc.error_type == "api_error"
    assert exc.code == "upstream_error"  # UpstreamRejected's default when the upstream gives none
    assert HOST not in orjson.dumps(exc.to_body()).decode()


async def test_redirect_is_not_followed_and_becomes_502(provider_for: Build) -> None:
    h = await provider_for(lambda _: web.Response(status=302, headers={"location": "/v1/elsewhere"}))
    with pytest.raises(UpstreamRejected) as info:
        await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    assert info.value.status_code == 502
    assert [r.path for r in h.upstream.requests] == ["/v1/images/generations"]


# --- transport failures -----------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listen queue is full: connecting there waits (the SYN is dropped) until timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def expect(
    provider: OpenAICompatProvider, expected: type[UpstreamError], status: int, code: str
) -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(provider.generate(make_job(), upstream_model="gpt-image-1"), 10)
    exc = info.value
    assert type(exc) is expected
    assert (exc.status_code, exc.code) == (status, code)
    assert isinstance(exc.__cause__, aiohttp.ClientError | TimeoutError)
    for text in (str(exc), orjson.dumps(exc.to_body()).decode()):
        assert HOST not in text
        assert "http://" not in text and "https://" not in text
    return exc


@pytest.mark.parametrize(
    "reply",
    [
        None,  # dropped without an answer (httpx: RemoteProtocolError)
        b"HTTP/1.1 2x0 WHAT\r\n\r\n",  # a status line that does not parse
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",  # nor a header
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{}",  # a body cut short (httpx: ReadError)
    ],
)
async def test_broken_answers_are_unavailable(stack: AsyncExitStack, reply: bytes | None) -> None:
    raw = await stack.enter_async_context(RawUpstream(reply))
    provider = await provider_on(stack, f"http://{HOST}:{raw.port}/v1")
    await expect(provider, UpstreamUnavailable, 502, "upstream_unavailable")


async def test_connection_refused_is_unavailable(stack: AsyncExitStack) -> None:
    provider = await provider_on(stack, f"http://{HOST}:{closed_port()}/v1")
    exc = await expect(provider, UpstreamUnavailable, 502, "upstream_unavailable")
    assert isinstance(exc.__cause__, aiohttp.ClientConnectorError)


@pytest.mark.parametrize("base_url", ["ftp://upstream.internal.example/v1", "http:///v1"])
async def test_unusable_url_is_unavailable(stack: AsyncExitStack, base_url: str) -> None:
    provider = await provider_on(stack, base_url)
    await expect(provider, UpstreamUnavailable, 502, "upstream_unavailable")


async def test_undecodable_body_is_upstream_error(stack: AsyncExitStack) -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 8\r\n\r\nnot gzip"
    raw = await stack.enter_async_context(RawUpstream(reply, hang=True))
    provider = await provider_on(stack, f"http://{HOST}:{raw.port}/v1")
    await expect(provider, UpstreamError, 502, "upstream_error")


async def test_read_timeout(stack: AsyncExitStack) -> None:
    raw = await stack.enter_async_context(RawUpstream(None, hang=True))
    provider = await provider_on(stack, f"http://{HOST}:{raw.port}/v1", timeout_s=0.2)
    await expect(provider, UpstreamTimeout, 504, "upstream_timeout")


async def test_connect_timeout(stack: AsyncExitStack, full_backlog: int) -> None:
    provider = await provider_on(
        stack, f"http://{HOST}:{full_backlog}/v1", timeout_s=30, connect_timeout_s=0.2
    )
    started = asyncio.get_running_loop().time()
    exc = await expect(provider, UpstreamTimeout, 504, "upstream_timeout")
    assert asyncio.get_running_loop().time() - started < 5  # connect_timeout_s, not timeout_s
    assert isinstance(exc.__cause__, aiohttp.ConnectionTimeoutError)


async def test_name_resolution_counts_against_the_pool_and_connect_bound(stack: AsyncExitStack) -> None:
    provider = await provider_on(
        stack, f"http://{HOST}:1/v1", timeout_s=0.2, connect_timeout_s=0.2, resolver=HangingResolver()
    )
    await expect(provider, UpstreamTimeout, 504, "upstream_timeout")


async def test_stalled_upload_times_out(stack: AsyncExitStack, tmp_path: Path) -> None:
    """aiohttp has no write timeout: without the form's own bound this would wait for ever."""
    raw = await stack.enter_async_context(RawUpstream(None, hang=True, read_body=False))
    provider = await provider_on(stack, f"http://{HOST}:{raw.port}/v1", timeout_s=0.3)
    big = input_image(tmp_path / "big", b"\x89PNG" + b"\0" * (64 << 20))
    job = dataclasses.replace(make_job("gpt-image-1", "edits"), images=(big,))
    with pytest.raises(UpstreamTimeout) as info:
        await asyncio.wait_for(provider.edit(job, upstream_model="gpt-image-1"), 20)
    assert isinstance(info.value.__cause__, TimeoutError)


def test_map_aiohttp_errors_status_error() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    info = aiohttp.RequestInfo(URL(f"{BASE_URL}/images/generations"), "POST", CIMultiDictProxy(CIMultiDict()))
    error = aiohttp.ClientResponseError(
        info,
        (),
        status=503,
        message=f"down at {HOST}",
        headers=CIMultiDictProxy(CIMultiDict({"Retry-After": "4"})),
    )
    with pytest.raises(UpstreamRejected) as caught, map_aiohttp_errors(secrets=SECRETS):
        raise error
    assert (caught.value.status_code, caught.value.retry_after) == (503, "4")
    assert HOST not in str(caught.value)


def test_map_aiohttp_errors_leaves_other_exceptions() -> None:
    with pytest.raises(KeyError), map_aiohttp_errors():
        raise KeyError("x")


# --- probe ------------------------------------------------------------------------------------------


async def test_probe_any_answer_counts(provider_for: Build, stack: AsyncExitStack) -> None:
    h = await provider_for(lambda _: web.Response(status=401))
    assert await h.provider.probe() is True
    assert h.upstream.last.method == "GET"
    assert h.upstream.last.url == f"{h.base_url}/models"
    assert h.upstream.last.headers["authorization"] == f"Bearer {API_KEY}"
    assert h.upstream.last.headers["x-request-id"] == "probe"

    refused = await provider_on(stack, f"http://{HOST}:{closed_port()}/v1")
    assert await refused.probe() is False


# --- client lifecycle and configuration -------------------------------------------------------------


def test_client_timeout_mirrors_httpx() -> None:
    timeout = client_timeout(300, 10)
    # No total: streams run while events come; each read waits up to timeout_s (httpx read=300).
    assert (timeout.total, timeout.sock_read) == (None, 300)
    # Connecting: 10 s per attempt; the pool wait (httpx pool=300) plus connecting bounded together.
    assert (timeout.sock_connect, timeout.connect) == (10, 310)


def test_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("https://api.openai.com/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    monkeypatch.setenv("ALL_PROXY", "http://all.corp:8080")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal.example")
    assert env_proxy("https://api.openai.com/v1") == "http://proxy.corp:3128"
    assert env_proxy("http://api.example/v1") == "http://all.corp:8080"
    assert env_proxy(f"https://{HOST}/v1") is None
    assert env_proxy("http://localhost:8000/v1") is None


async def test_own_session_made_lazily_configured_and_closed(tmp_path: Path) -> None:
    async with ScriptedUpstream(ok) as upstream:
        provider = OpenAICompatProvider(
            name="a",
            base_url=f"http://127.0.0.1:{upstream.port}/v1",
            api_key=API_KEY,
            timeout_s=5,
            max_connections=3,
        )
        assert provider._transport._http.made is None  # built outside any loop is fine: made on first use
        await provider.generate(make_job(), upstream_model="gpt-image-1")
        session = provider._transport._http.made
        assert session is not None
        assert session.timeout == client_timeout(5, 10.0)
        assert session.auto_decompress
        connector = session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        assert connector.limit == 3
        assert connector._keepalive_timeout == KEEPALIVE_S
        assert connector._ssl is trust_store()  # httpx's CAs (certifi), not the system store
        await provider.aclose()
        assert session.closed
        with pytest.raises(RuntimeError):
            await provider.generate(make_job(), upstream_model="gpt-image-1")

        async with aiohttp.ClientSession() as shared:
            injected = OpenAICompatProvider(
                name="b", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key=None, session=shared
            )
            await injected.generate(make_job(), upstream_model="gpt-image-1")
            await injected.aclose()
            assert not shared.closed


async def test_cookies_set_by_the_upstream_are_sent_back(provider_for: Build) -> None:
    def answer(request: web.Request) -> web.Response:
        response = json_response(200, ok_body())
        response.set_cookie("__cf_bm", "affinity")
        return response

    h = await provider_for(answer)
    await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    await h.provider.generate(make_job(), upstream_model="gpt-image-1")
    assert "cookie" not in h.upstream.requests[0].headers
    assert h.upstream.requests[1].headers["cookie"] == "__cf_bm=affinity"


# --- sanitize and rejected_from_response ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("plain message", "plain message"),
        (f"Incorrect API key provided: {API_KEY}.", "Incorrect API key provided: sk-***."),
        # A short or masked fragment still identifies a key (issue 15): it goes too.
        ("key sk-abc_DEF-12345678 and sk-short", "key sk-*** and sk-***"),
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
