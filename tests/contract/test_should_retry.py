"""`x-should-retry: false` on every error a retry cannot fix (issue 23 item 13).

openai-python retries 408, 409, 429 and 5xx unless the answer says `x-should-retry: false`. An
exhausted quota is a 429 that waiting does not fix: the SDK must send it once, not three times.
The requests are counted as the SDK sends them (an httpx event hook on its own client).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway


@pytest.fixture
def sent() -> list[str]:
    return []


def counting_client(gw: Gateway, key: str, sent: list[str]) -> openai.OpenAI:
    def count(request: httpx.Request) -> None:
        sent.append(request.url.path)

    http = httpx.Client(event_hooks={"request": [count]}, timeout=30)
    # The SDK's own default retries (2), and no waiting between them worth the name.
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, http_client=http, max_retries=2)


def test_insufficient_quota_is_requested_exactly_once(local_gateway: Gateway, sent: list[str]) -> None:
    key, _ = local_gateway.create_key(name="broke", quota="0.000001")
    with counting_client(local_gateway, key, sent) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(model="gpt-image-2", prompt="a lighthouse", size="1024x1024")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert sent == ["/v1/images/generations"]


def _status(gw: Gateway, key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, gw.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs
    )


def test_client_errors_a_retry_cannot_fix_say_so(local_gateway: Gateway) -> None:
    key, _ = local_gateway.create_key(name="errors", models=["gpt-image-1.5"])
    cases = {
        "validation 400": _status(
            local_gateway,
            key,
            "POST",
            "/v1/images/generations",
            json={"model": "gpt-image-1.5", "n": 99, "prompt": "x"},
        ),
        "moderation 400": _status(
            local_gateway,
            key,
            "POST",
            "/v1/images/generations",
            json={"model": "gpt-image-1.5", "prompt": "how to build a pipe bomb at home, step by step"},
        ),
        "401": _status(local_gateway, "sk-not-a-key", "POST", "/v1/images/generations", json={}),
        "403": _status(
            local_gateway, key, "POST", "/v1/images/generations", json={"model": "gpt-image-2", "prompt": "x"}
        ),
        "404": _status(local_gateway, key, "GET", "/v1/tasks/task_nope"),
        "unknown route 404": _status(local_gateway, key, "GET", "/v1/nothing-here"),
    }
    for name, response in cases.items():
        assert 400 <= response.status_code < 500 and response.status_code not in (408, 409, 429), name
        assert response.headers.get("x-should-retry") == "false", (name, response.status_code, response.text)
    assert cases["moderation 400"].json()["error"]["code"] == "moderation_blocked"
    assert (cases["401"].status_code, cases["403"].status_code, cases["404"].status_code) == (401, 403, 404)


def test_a_rate_limit_stays_retryable(gateway_with: Any) -> None:
    """A per-minute limit is what retrying (after retry-after) is for: no `x-should-retry: false`."""
    gw = gateway_with({"name": "local", "kind": "local", "models": ["*"]})
    key, _ = gw.create_key(name="rpm", rpm=1)
    body = {"model": "gpt-image-2", "prompt": "x", "size": "1024x1024", "quality": "low"}
    assert _status(gw, key, "POST", "/v1/images/generations", json=body).status_code == 200
    limited = _status(gw, key, "POST", "/v1/images/generations", json=body)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert "x-should-retry" not in limited.headers
