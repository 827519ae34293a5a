"""The native adapters mark a call answered as soon as the upstream says 2xx, before its body.

From that moment the upstream has done (and billed) the work, so the request path stops letting a
client's disconnect cancel the call (``UpstreamCall.on_answer``): the call is settled and billed. Without the
mark, a client leaving while a large image body arrives would cut a call the operator pays for.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from app.core.errors import UpstreamRejected
from app.upstream.call import UpstreamCall
from app.upstream.providers.stability import StabilityProvider
from tests.fakes.scripted_http import ScriptedUpstream

BODY = b'{"image": "' + b"A" * 200_000 + b'", "finish_reason": "SUCCESS", "seed": 7}'


async def test_a_2xx_is_marked_answered_before_its_body_arrives() -> None:
    release = asyncio.Event()

    async def slow_body(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(status=200, headers={"content-type": "application/json"})
        answer.content_length = len(BODY)
        await answer.prepare(request)
        await answer.write(BODY[:1000])
        await release.wait()
        await answer.write(BODY[1000:])
        await answer.write_eof()
        return answer

    async with ScriptedUpstream(slow_body) as upstream:
        provider = StabilityProvider(name="s", base_url=f"http://127.0.0.1:{upstream.port}", api_key="k")
        answered = asyncio.Event()
        try:
            call = asyncio.ensure_future(
                provider._send(
                    "POST",
                    f"http://127.0.0.1:{upstream.port}/x",
                    request_id="r",
                    call=UpstreamCall(on_answer=answered.set),
                    json_body={},
                )
            )
            await asyncio.wait_for(answered.wait(), timeout=10)
            assert not call.done()  # the body is still on its way
            release.set()
            raw, _ = await call
            assert raw == BODY
        finally:
            release.set()
            await provider.aclose()


async def test_an_error_answer_is_not_marked_answered() -> None:
    async with ScriptedUpstream(lambda _: web.json_response({"errors": ["no"]}, status=500)) as upstream:
        provider = StabilityProvider(name="s", base_url=f"http://127.0.0.1:{upstream.port}", api_key="k")
        answered = asyncio.Event()
        try:
            with pytest.raises(UpstreamRejected):
                await provider._send(
                    "POST",
                    f"http://127.0.0.1:{upstream.port}/x",
                    request_id="r",
                    call=UpstreamCall(on_answer=answered.set),
                    json_body={},
                )
            assert not answered.is_set()
        finally:
            await provider.aclose()


def upstream_url(upstream: ScriptedUpstream) -> str:
    return f"http://127.0.0.1:{upstream.port}/x"
