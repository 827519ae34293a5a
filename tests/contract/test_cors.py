"""Issue 23 item 12: CORS lets the official SDKs call the gateway from a browser.

The request headers are the ones the Node SDK really sends (``tests/node/headers.mjs`` run
against a recording server), so a new ``x-stainless-*`` header in an SDK release is covered. On
9a64885 the preflight allowed four request headers and answered 400 "Disallowed CORS headers",
and ``Sunset``, ``Deprecation`` and ``x-gateway-model`` were not exposed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import LOCAL_UPSTREAM, Gateway

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
ORIGIN = "http://127.0.0.1:5173"
# What every client may act on (README: CORS).
EXPOSED = {
    "x-request-id",
    "x-gateway-cost",
    "x-gateway-model",
    "x-gateway-upstream",
    "sunset",
    "deprecation",
    "retry-after",
    "x-should-retry",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-images",
}


def _sdk_headers() -> set[str]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").exists():
        if os.environ.get("CI"):
            pytest.fail("node and tests/node/node_modules are required in CI (make test installs them)")
        pytest.skip("node or the npm openai package is missing; run make test")
    seen: set[str] = set()

    class Record(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.update(name.lower() for name in self.headers)
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = b'{"error": {"message": "recorded", "type": "invalid_request_error"}}'
            self.send_response(400)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [node, str(NODE_DIR / "headers.mjs"), f"http://127.0.0.1:{server.server_port}/v1"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=NODE_DIR,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    return seen


@pytest.fixture(scope="module")
def sdk_headers() -> set[str]:
    return _sdk_headers()


@pytest.fixture
def gw(gateway_with: Callable[..., Gateway]) -> Iterator[Gateway]:
    yield gateway_with(LOCAL_UPSTREAM, server={"cors_origins": [ORIGIN]})


def test_the_sdk_sends_what_the_issue_names(sdk_headers: set[str]) -> None:
    # A sanity check on the recording: the families a browser must be allowed to send.
    assert {
        "x-stainless-lang",
        "x-stainless-os",
        "x-stainless-retry-count",
        "x-stainless-timeout",
    } <= sdk_headers
    assert {"openai-organization", "openai-project", "authorization", "content-type"} <= sdk_headers


def test_a_preflight_with_the_node_sdks_headers_is_allowed(gw: Gateway, sdk_headers: set[str]) -> None:
    # Every header a browser would ask about: the SDK's, minus the ones fetch never preflights.
    simple = {
        "host",
        "connection",
        "content-length",
        "accept-encoding",
        "user-agent",
        "accept",
        "accept-language",
    }
    # Plus what a client adds itself (an Idempotency-Key, a beta flag, its own request id).
    extra = {"idempotency-key", "openai-beta", "x-request-id", "x-stainless-helper-method"}
    asked = sorted((sdk_headers - simple) | extra)
    for path in ["/v1/images/generations", "/v1/images/edits", "/v1/tasks/task_x"]:
        response = httpx.options(
            gw.url + path,
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": ", ".join(asked),
            },
        )
        assert response.status_code == 200, response.text
        allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
        assert set(asked) <= allowed, set(asked) - allowed
        assert response.headers["access-control-allow-origin"] == ORIGIN


def test_another_origin_is_still_refused(gw: Gateway) -> None:
    response = httpx.options(
        gw.url + "/v1/images/generations",
        headers={
            "origin": "http://evil.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, x-stainless-os",
        },
    )
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


def test_every_header_a_client_acts_on_is_exposed(gw: Gateway) -> None:
    key, _ = gw.create_key()
    response = httpx.get(gw.url + "/v1/models", headers={"origin": ORIGIN, "authorization": f"Bearer {key}"})
    assert response.status_code == 200
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert exposed >= EXPOSED, EXPOSED - exposed
