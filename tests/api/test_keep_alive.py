"""Idle client connections stay open for `server.keep_alive_s` (a real `python -m app serve`)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from bench.gateway_process import GatewayProcess
from tests.conftest import LOCAL_UPSTREAM, MODELS_FILE

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"


def idle_then_closed(url: str, idle_s: float, *, wait_s: float) -> bool:
    """Send one request on a fresh connection, stay idle ``idle_s``, then wait up to ``wait_s`` for
    the server to hang up; True if it did."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(REQUEST)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            answer += conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        time.sleep(idle_s)
        conn.settimeout(wait_s)
        try:
            return conn.recv(1) == b""
        except TimeoutError:
            return False  # still open, nothing to read


def test_the_server_keeps_idle_connections_longer_than_clients_do(tmp_path: Path) -> None:
    base = {
        "data_dir": str(tmp_path / "data"),
        "models_file": MODELS_FILE,
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"},
        "logging": {"level": "WARNING"},
        "upstreams": [LOCAL_UPSTREAM],
    }
    default = GatewayProcess(base, tmp_path).wait_ready()
    short = GatewayProcess({**base, "server": {"keep_alive_s": 1}}, tmp_path).wait_ready()
    try:
        # Past the 1 s of the short one, well within the default's 75 s (and past httpx's own 5 s
        # would take too long for a test: the default's value is checked in settings instead).
        assert idle_then_closed(short.url, 1.0, wait_s=10)
        assert not idle_then_closed(default.url, 2.0, wait_s=0.5)
    finally:
        default.stop()
        short.stop()


def test_the_default_outlasts_httpx_and_the_openai_sdk() -> None:
    from app.runtime.settings import ServerSettings

    assert ServerSettings().keep_alive_s > 5  # httpx's keepalive_expiry
