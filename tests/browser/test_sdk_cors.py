"""Issue 23 item 12 (Acceptance 4): the official JS SDK runs in Chromium, from a page on another
origin than the gateway, with ``dangerouslyAllowBrowser``: generate, stream and edit.

The page (``tests/browser/sdk_page/``) loads the SDK's own ESM build from
``tests/node/node_modules/openai`` through an import map, served by a static server on another
127.0.0.1 port. On 9a64885 the first call failed: the preflight refused the SDK's ``x-stainless-*``
and ``openai-project`` headers (400 "Disallowed CORS headers"), and the browser read no
``x-gateway-cost``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, make_settings, start_gateway

HERE = Path(__file__).resolve().parent
PAGE_DIR = HERE / "sdk_page"
SDK_DIR = HERE.parent / "node" / "node_modules" / "openai"
LOCAL: dict[str, Any] = {"name": "local", "kind": "local", "models": ["*"]}


class PageHandler(SimpleHTTPRequestHandler):
    """The test page, and the SDK package under /openai/."""

    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
    }

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0]
        if clean.startswith("/openai/"):
            return str(SDK_DIR / clean.removeprefix("/openai/"))
        return str(PAGE_DIR / (clean.lstrip("/") or "index.html"))

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    if not (SDK_DIR / "index.mjs").exists():
        if os.environ.get("CI"):
            pytest.fail("tests/node/node_modules is required in CI (make test installs it)")
        pytest.skip("the npm openai package is missing; run make test")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(PageHandler, directory=str(PAGE_DIR)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def cors_gateway(page_origin: str, tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(make_settings(tmp_path, [LOCAL], server={"cors_origins": [page_origin]}), tmp_path)
    yield gw
    gw.close()


def test_the_js_sdk_generates_streams_and_edits_from_another_origin(
    new_page: Callable[..., Any], page_origin: str, cors_gateway: Gateway
) -> None:
    key, key_id = cors_gateway.create_key(name="browser")
    page = new_page()
    page.goto(page_origin + "/index.html")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    result = page.evaluate("([base, key]) => window.runSdk(base, key)", [cors_gateway.url + "/v1", key])
    assert result["generated"]["images"] == 1 and result["generated"]["b64"] > 100
    # Exposed response headers are readable from the page.
    assert result["generated"]["cost"] and result["generated"]["requestId"].startswith("req_")
    assert result["streamed"][-1] == "image_generation.completed"
    assert "image_generation.partial_image" in result["streamed"]
    assert result["edited"]["images"] == 1 and result["edited"]["cost"]
    assert result["refused"]["status"] == 400 and result["refused"]["code"] == "empty_string"
    assert page.console_errors == []
    rows = [r for r in cors_gateway.ledger() if r["key_id"] == key_id]
    assert len(rows) == 3 and all(r["status"] == "succeeded" for r in rows)
