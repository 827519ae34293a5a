"""The shared upstream transport: the signing hook, the answered signal's condition, byte limits,
and scrubbed transport errors, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import aiohttp
import pytest

from app.core.errors import UpstreamError, UpstreamUnavailable
from app.upstream.call import DIRECT
from app.upstream.transport import Transport
from tests.fakes.scripted_http import ScriptedUpstream, json_response


async def test_the_signing_hook_sees_the_final_request_and_adds_its_headers() -> None:
    seen: list[tuple[str, str, dict[str, str], bytes | None]] = []

    async def sign(
        method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> Mapping[str, str]:
        seen.append((method, url, dict(headers), body))
        digest = hashlib.sha256(body or b"").hexdigest()
        return {"authorization": f"SIG {method} {digest}", "x-amz-content-sha256": digest}

    async with ScriptedUpstream(lambda _: json_response(200, {"ok": True})) as upstream:
        url = f"http://127.0.0.1:{upstream.port}/v1/run"
        transport = Transport(name="t", base_url=f"http://127.0.0.1:{upstream.port}", api_key=None, sign=sign)
        try:
            answer = await transport.call(
                "POST", url, headers={"content-type": "application/json"}, call=DIRECT, data=b"{}"
            )
        finally:
            await transport.aclose()
    assert answer.ok and answer.body == b'{"ok":true}'
    (method, signed_url, headers, body) = seen[0]
    assert (method, signed_url, body, headers["content-type"]) == ("POST", url, b"{}", "application/json")
    sent = upstream.last.headers
    assert sent["authorization"] == f"SIG POST {hashlib.sha256(b'{}').hexdigest()}"
    assert sent["x-amz-content-sha256"] == hashlib.sha256(b"{}").hexdigest()


async def test_a_signing_transport_refuses_a_streamed_body_before_sending() -> None:
    async def sign(
        method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> Mapping[str, str]:
        return {}

    async with ScriptedUpstream(lambda _: json_response(200, {})) as upstream:
        transport = Transport(name="t", base_url=f"http://127.0.0.1:{upstream.port}", api_key=None, sign=sign)
        try:
            with pytest.raises(UpstreamError):
                await transport.call(
                    "POST",
                    f"http://127.0.0.1:{upstream.port}/x",
                    headers={},
                    call=DIRECT,
                    data=aiohttp.FormData({"a": "b"}),
                )
        finally:
            await transport.aclose()
    assert upstream.requests == []


async def test_error_statuses_are_handed_back_and_oversized_bodies_refused() -> None:
    async with ScriptedUpstream(
        lambda r: json_response(422 if r.path == "/bad" else 200, {"x": "y" * 100})
    ) as up:
        base = f"http://127.0.0.1:{up.port}"
        transport = Transport(name="t", base_url=base, api_key="k-secret")
        try:
            bad = await transport.call("GET", base + "/bad", headers={}, call=DIRECT)
            assert (bad.status, bad.ok) == (422, False)
            with pytest.raises(UpstreamError):
                await transport.call("GET", base + "/big", headers={}, call=DIRECT, max_bytes=10)
        finally:
            await transport.aclose()


async def test_transport_failures_are_gateway_errors_with_nothing_identifying() -> None:
    transport = Transport(name="t", base_url="http://127.0.0.1:9", api_key="k-secret")
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await transport.call("GET", "http://127.0.0.1:9/v1", headers={}, call=DIRECT)
    finally:
        await transport.aclose()
    assert "127.0.0.1" not in str(caught.value) and "k-secret" not in str(caught.value)
    assert {"k-secret", "http://127.0.0.1:9", "127.0.0.1:9"} <= set(transport.secrets)
