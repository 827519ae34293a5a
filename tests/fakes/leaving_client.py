"""A client that hangs up at the moment the test chooses, not when a timer it races runs out.

    post_then_hang_up(gw.url, GEN, body, headers, when=lambda: upstream.wait_for_count(1))

sends the request on a raw connection, blocks until ``when()`` returns true (the upstream has the
request, the gateway is settling, ...), then closes the connection without reading the answer.
A short client timeout did the same only if the gateway got that far in time, which a loaded CI
box does not promise.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import orjson


def post_then_hang_up(
    base_url: str, path: str, body: dict[str, Any], headers: dict[str, str], *, when: Callable[[], object]
) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    payload = orjson.dumps(body)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head.append(f"Content-Length: {len(payload)}")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        assert when(), "the moment to hang up never came"
        sock.setblocking(False)
        try:
            early = sock.recv(1)
        except BlockingIOError:
            early = b""
        assert not early, "the answer came before the moment to hang up"
