"""The shipped config/gateway.yaml, started as an operator would (issue 23, acceptance 1 and 3).

- It listens on loopback only: the admin API and the console are not on the network on a first
  run (the child's listening sockets are read from /proc).
- With no provider key, `local` serves, and says so in `x-gateway-upstream`.
- With an OpenAI key set and OpenAI failing, the client gets a 5xx, is charged nothing, and is
  never handed a placeholder from `local`; a model OpenAI has retired is OpenAI's 404, not `local`.

Only the data directory (`GATEWAY_DATA_DIR`), the port and, for the failing case, the retry
backoff are set from outside; everything else is the file as shipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bench.gateway_process import ROOT, GatewayProcess
from tests.conftest import UPSTREAM_KEY, query
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.openai_wire import Fault

SHIPPED = ROOT / "config" / "gateway.yaml"
ADMIN_KEY = "adm-shipped-config-test-0123456789abcdef"
PROVIDER_KEYS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GEMINI_API_KEY", "BFL_API_KEY", "STABILITY_API_KEY")


def _start(tmp_path: Path, **env: str) -> GatewayProcess:
    """`python -m app serve --config config/gateway.yaml --port P`: no --host."""
    assert not any(name in os.environ for name in PROVIDER_KEYS)  # the fixture below cleared them
    settings_env = {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_ADMIN_KEY": ADMIN_KEY, **env}
    return GatewayProcess(None, tmp_path, env=settings_env, host=None, config_path=SHIPPED).wait_ready()


@pytest.fixture
def no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child inherits the runner's environment: no provider key of the runner's gets in."""
    for name in PROVIDER_KEYS:
        monkeypatch.delenv(name, raising=False)


def _key(gw: GatewayProcess) -> tuple[str, str]:
    created = httpx.post(
        gw.url + "/admin/keys", json={"name": "shipped"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert created.status_code == 201, created.text
    return created.json()["key"], created.json()["id"]


def _db(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'gateway.db'}"


@pytest.fixture
def failing_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        fake.always_fail = Fault.status(500, "the upstream is down", path="/v1/images/generations")
        yield fake


def test_shipped_config_listens_on_loopback_and_local_serves_without_a_key(
    tmp_path: Path, no_provider_keys: None
) -> None:
    gw = _start(tmp_path)
    try:
        listening = gw.listening()
        assert listening, "the child listens on nothing"
        assert {address for address, _ in listening} == {"127.0.0.1"}, listening
        assert {port for _, port in listening} == {gw.port}
        # The banner agrees, and its example uses a current model.
        banner = gw.logs()
        assert f"Image gateway listening on http://127.0.0.1:{gw.port}  (" in banner
        assert '"model": "gpt-image-2"' in banner and "every interface" not in banner
        key, key_id = _key(gw)
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
            raw = client.images.with_raw_response.generate(
                model="gpt-image-2", prompt="a lighthouse", size="1024x1024", quality="low"
            )
        assert raw.http_response.headers["x-gateway-upstream"] == "local"
        assert raw.parse().data[0].b64_json
        (row,) = query(_db(tmp_path), "SELECT upstream, status, cost_micros FROM ledger_entries")
        assert (row["upstream"], row["status"]) == ("local", "succeeded") and row["cost_micros"] > 0
    finally:
        gw.stop()


def test_the_banner_says_when_it_listens_on_every_interface(tmp_path: Path) -> None:
    from app.__main__ import _banner
    from app.runtime.settings import build_settings

    settings = build_settings({"data_dir": str(tmp_path)})
    assert "listening on every interface (0.0.0.0:8080), reachable at http://127.0.0.1:8080" in _banner(
        settings, "0.0.0.0", 8080
    )
    assert "listening on http://127.0.0.1:8080  (" in _banner(settings, settings.server.host, 8080)


def test_shipped_config_with_openai_failing_answers_5xx_and_charges_nothing(
    tmp_path: Path, failing_openai: FakeOpenAI, no_provider_keys: None
) -> None:
    gw = _start(
        tmp_path,
        OPENAI_API_KEY=UPSTREAM_KEY,
        OPENAI_BASE_URL=failing_openai.base_url,
        GATEWAY_RETRY__INITIAL_DELAY_S="0.01",
        GATEWAY_RETRY__MAX_DELAY_S="0.05",
    )
    try:
        key, key_id = _key(gw)
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                client.images.generate(model="gpt-image-1.5", prompt="a lighthouse", size="1024x1024")
            # OpenAI retired gpt-image-1: its 404, not a placeholder from `local`.
            with pytest.raises(openai.NotFoundError) as retired:
                client.images.generate(model="gpt-image-1", prompt="a lighthouse", size="1024x1024")
        assert caught.value.status_code >= 500
        assert caught.value.response.headers["x-gateway-upstream"] == "openai"
        assert retired.value.code == "model_not_found"
        assert retired.value.response.headers["x-should-retry"] == "false"
        # The failing upstream was really called, and `local` never was.
        assert failing_openai.count("/v1/images/generations") >= 1
        rows = query(_db(tmp_path), "SELECT upstream, status, cost_micros FROM ledger_entries")
        assert rows and all(r["upstream"] == "openai" and r["cost_micros"] == 0 for r in rows), rows
        assert all(r["status"] != "succeeded" for r in rows)
        (owner,) = query(
            _db(tmp_path), f"SELECT spent_micros, reserved_micros FROM api_keys WHERE id = '{key_id}'"
        )
        assert (owner["spent_micros"], owner["reserved_micros"]) == (0, 0)
    finally:
        gw.stop()
