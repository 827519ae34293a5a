"""Security properties of issue 10 that are not covered elsewhere: keyed hashes, CORS, headers,
stalled bodies."""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.security import secrets_equal
from tests.conftest import LOCAL_UPSTREAM, Gateway, make_settings, start_gateway


@pytest.fixture
def gateway_with(tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def start(**extra: Any) -> Gateway:
        data_dir = tmp_path / f"gw{len(started)}"
        gw = start_gateway(make_settings(data_dir, [LOCAL_UPSTREAM], **extra), data_dir)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


def test_keys_are_stored_as_keyed_hashes(gateway_with: Any) -> None:
    gw = gateway_with()
    key, key_id = gw.create_key(name="hashed")
    stored = gw.key_row(key_id)["key_hash"]
    pepper_file = gw.data_dir / "key_pepper"
    assert pepper_file.stat().st_mode & 0o777 == 0o600
    pepper = pepper_file.read_text().strip().encode()
    assert stored == hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
    # Without the pepper, the database alone does not identify the key.
    assert stored != hashlib.sha256(key.encode()).hexdigest()


def test_a_configured_pepper_is_used_and_keys_follow_it(gateway_with: Any) -> None:
    pepper = "p" * 40
    gw = gateway_with(security={"key_pepper": pepper})
    key, key_id = gw.create_key(name="peppered")
    assert (
        gw.key_row(key_id)["key_hash"] == hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
    )
    assert not (gw.data_dir / "key_pepper").exists()


def test_secret_comparison_is_constant_time_by_construction() -> None:
    # hmac.compare_digest underneath: equal only for equal inputs, whatever the common prefix.
    assert secrets_equal("sk-admin-abc", "sk-admin-abc")
    assert not secrets_equal("sk-admin-abc", "sk-admin-abd")
    assert not secrets_equal("sk-admin-abc", "sk-admin-ab")


def test_cors_is_closed_by_default_and_opens_per_origin(gateway_with: Any) -> None:
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    closed = gateway_with()
    answer = httpx.options(closed.url + "/v1/images/generations", headers=preflight)
    assert "access-control-allow-origin" not in answer.headers
    assert (
        "access-control-allow-origin"
        not in httpx.get(closed.url + "/healthz", headers={"Origin": "https://evil.example"}).headers
    )

    opened = gateway_with(server={"cors_origins": ["https://app.example"]})
    allowed = httpx.options(
        opened.url + "/v1/images/generations", headers={**preflight, "Origin": "https://app.example"}
    )
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    refused = httpx.options(opened.url + "/v1/images/generations", headers=preflight)
    assert "access-control-allow-origin" not in refused.headers


def test_security_headers_on_every_answer(gateway_with: Any) -> None:
    gw = gateway_with()
    for response in (
        httpx.get(gw.url + "/healthz"),
        httpx.get(gw.url + "/v1/models"),
        httpx.post(gw.url + "/v1/images/generations", json={}),
        httpx.get(gw.url + "/nowhere"),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-request-id"].startswith("req_")


def test_a_stalled_body_is_answered_408(gateway_with: Any) -> None:
    gw = gateway_with(server={"body_read_timeout_s": 0.5})
    key, _ = gw.create_key()
    host, port = gw.url.removeprefix("http://").split(":")
    for content_type, partial in (
        ("application/json", b'{"model": "gpt-image-1", "pro'),
        (
            "multipart/form-data; boundary=XYZ",
            b'--XYZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG',
        ),
    ):
        path = "/v1/images/generations" if content_type.startswith("application") else "/v1/images/edits"
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                (
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
                ).encode()
                + partial
            )
            started = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - started < 10
    assert not list((gw.data_dir / "spool").iterdir())
