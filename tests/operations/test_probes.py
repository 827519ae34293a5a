"""Probes as Kubernetes reads them (SPEC §9, issue 24 acceptance 3), on a real `python -m app serve`.

- `/readyz` never depends on upstreams: with every upstream down (one refuses connections, one
  hangs for ever), it answers 200 while the hung calls are still waiting.
- SIGTERM: `/readyz` turns 503 while the listener still accepts, then the listener closes, and the
  requests that were in flight all complete before the process exits 0.

Nothing here waits on a wall-clock margin: the fake upstream holds every call until the test
releases it, and each step waits for the state it needs (a count, a status, a refused connect).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.gateway_process import GatewayProcess
from bench.traffic import create_key
from tests.conftest import ADMIN_KEY, closed_port
from tests.fakes.openai_upstream import FakeOpenAI
from tests.reliability.harness import gateway_config

IN_FLIGHT = 10
GEN = "/v1/images/generations"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll ``condition``; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def readyz(url: str) -> int:
    return httpx.get(url + "/readyz", timeout=30).status_code


def refused(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=30)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:
        # Accepted just as the listener closed, then reset: closing, not closed yet; ask again.
        return False
    return False


def probe_config(upstream: FakeOpenAI, tmp_path: Path, **server: Any) -> dict[str, Any]:
    config = gateway_config(upstream, tmp_path / "data", f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}")
    # The fake holds calls for as long as the test wants: no gateway timeout may cut them.
    config["upstreams"][0].update(timeout_s=600, priority=1)
    dead = {
        "name": "refusing",
        "kind": "openai",
        "base_url": f"http://127.0.0.1:{closed_port()}/v1",
        "api_key": "k",
        "models": ["gpt-image-1"],
        "follows_retirements": False,
        "priority": 0,
    }
    config["upstreams"].append(dead)
    config["server"] = {"shutdown_grace_s": 120, **server}
    return config


def test_readyz_ignores_down_upstreams_and_sigterm_drains(upstream: FakeOpenAI, tmp_path: Path) -> None:
    # Every image call hangs at the fake until released (the gate's own timeout is far away).
    upstream.hold(until_in_flight=10**6, timeout_s=600)
    gateway = GatewayProcess(probe_config(upstream, tmp_path, drain_delay_s=10), tmp_path).wait_ready()
    try:
        key, _ = create_key(gateway.url, ADMIN_KEY)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=600)
        results: list[Any] = []

        def call() -> None:
            try:
                results.append(client.images.generate(model="gpt-image-1", prompt="a lighthouse"))
            except Exception as exc:  # recorded, asserted below
                results.append(exc)

        threads = [threading.Thread(target=call) for _ in range(IN_FLIGHT)]
        for thread in threads:
            thread.start()
        # All ten are at the hung upstream (the refusing one was tried first and failed over).
        wait_for(lambda: upstream.in_flight == IN_FLIGHT, "ten calls hung at the upstream")

        # Every upstream is down (one refuses, one hangs): the node can still serve, so it is ready.
        ready = httpx.get(gateway.url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.json()["draining"] == "false"
        assert upstream.in_flight == IN_FLIGHT and not any(results)

        gateway.proc.send_signal(signal.SIGTERM)
        # Not ready first, while the listener still answers (readyz() raises if it is closed) ...
        wait_for(lambda: readyz(gateway.url) == 503, "/readyz to turn 503")
        assert httpx.get(gateway.url + "/readyz", timeout=30).json()["draining"] == "true"
        assert httpx.get(gateway.url + "/healthz", timeout=30).status_code == 200
        # ... then, after drain_delay_s, the listener closes with the ten calls still in flight.
        wait_for(lambda: refused(gateway.url), "the listener to close")
        assert upstream.in_flight == IN_FLIGHT and not any(results)

        upstream.release()
        for thread in threads:
            thread.join(120)
        assert len(results) == IN_FLIGHT
        failures = [r for r in results if isinstance(r, Exception)]
        assert not failures, failures
        assert all(len(r.data) == 1 for r in results)
        assert gateway.proc.wait(120) == 0
    finally:
        upstream.release()
        gateway.stop()
