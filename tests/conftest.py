"""Shared fixtures: settings, a gateway served by uvicorn on loopback, and the fake OpenAI upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.domain.catalog import Catalog
from app.main import create_app
from app.runtime.settings import Settings, build_settings
from bench.books import query
from bench.gateway_process import reserve_port
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import ThreadedServer

ROOT = Path(__file__).resolve().parent.parent
MODELS_FILE = str(ROOT / "app" / "defaults" / "models.yaml")
ADMIN_KEY = "sk-admin-test-0123456789abcdef0123456789"
UPSTREAM_KEY = "sk-upstream-test"
ALL_MODELS = ["gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini", "dall-e-3", "dall-e-2"]


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.from_file(MODELS_FILE)


def make_settings(data_dir: Path, upstreams: list[dict[str, Any]], **extra: Any) -> Settings:
    config: dict[str, Any] = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(data_dir),
        "models_file": MODELS_FILE,
        "database": {"url": f"sqlite+aiosqlite:///{data_dir / 'gateway.db'}"},
        "logging": {"level": "INFO"},
        "upstreams": upstreams,
        # Production backoffs (0.5 s and up) would only slow the suite; the policy is the same.
        "retry": {"initial_delay_s": 0.01, "max_delay_s": 0.05},
    }
    config.update(extra)
    # Images beside the rest of the test's files, not in the checkout's ./data/images (the default).
    config["storage"] = {"path": str(data_dir / "images"), **config.get("storage", {})}
    return build_settings(config)


def fake_upstream_config(fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    """An `openai` upstream pointing at the fake, serving the seed's models, one of them renamed.

    The fake still serves the retired gpt-image-1 and dall-e models, as a compatible server may:
    it does not follow OpenAI's retirements (the lifecycle tests turn that back on).
    """
    config: dict[str, Any] = {
        "name": "fake",
        "kind": "openai",
        "base_url": fake.base_url,
        "api_key": UPSTREAM_KEY,
        "models": [
            "gpt-image-1.5",
            "gpt-image-1",
            {"name": "gpt-image-1-mini", "upstream_model": "gpt-image-1-mini-2025"},
            "dall-e-3",
            "dall-e-2",
        ],
        "timeout_s": 10,
        "follows_retirements": False,
    }
    config.update(extra)
    return config


LOCAL_UPSTREAM: dict[str, Any] = {"name": "local", "kind": "local", "models": ["*"]}


@dataclass
class Gateway:
    """A running gateway plus helpers to call it as an admin and as a tenant."""

    settings: Settings
    server: ThreadedServer
    data_dir: Path
    # Clients handed out for this gateway, closed with it (an unclosed one leaks its socket).
    _clients: list[openai.OpenAI | httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def db_path(self) -> Path:
        return self.data_dir / "gateway.db"

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def create_key(self, **fields: Any) -> tuple[str, str]:
        """A new tenant key: (plaintext key, key id)."""
        response = self.admin("POST", "/admin/keys", json={"name": "test", **fields})
        assert response.status_code == 201, response.text
        body = response.json()
        return body["key"], body["id"]

    def client(self, key: str | None = None, **kwargs: Any) -> openai.OpenAI:
        """The official SDK pointed at this gateway (a new key unless one is given)."""
        if key is None:
            key, _ = self.create_key()
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)
        self._clients.append(client)
        return client

    def closing(self, client: httpx.Client) -> httpx.Client:
        """Close ``client`` when this gateway closes."""
        self._clients.append(client)
        return client

    def ledger(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM ledger_entries ORDER BY id")

    def key_row(self, key_id: str) -> dict[str, Any]:
        (row,) = self.query(f"SELECT * FROM api_keys WHERE id = '{key_id}'")
        return row

    def query(self, sql: str) -> list[dict[str, Any]]:
        return query(self.settings.database.url, sql)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.stop()


def migrate(url: str) -> None:
    from app.db.engine import create_engine
    from app.db.migrate import upgrade_head

    async def run() -> None:
        engine = create_engine(url)
        try:
            await upgrade_head(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())


def start_gateway(settings: Settings, data_dir: Path) -> Gateway:
    server = ThreadedServer(create_app(settings), name="gateway", lifespan="on").start()
    return Gateway(settings=settings, server=server, data_dir=data_dir)


def closed_port() -> int:
    """A loopback port nothing listens on: an upstream there refuses connections (reserved, so that
    another xdist worker's server is not given it meanwhile)."""
    return reserve_port()


@pytest.fixture
def gateway_with(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start gateways with given upstreams and settings for one test; all closed afterwards."""
    started: list[Gateway] = []

    def start(*upstreams: dict[str, Any], **extra: Any) -> Gateway:
        data_dir = tmp_path / f"gw{len(started)}"
        gw = start_gateway(make_settings(data_dir, list(upstreams), **extra), data_dir)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture
def upstream(fake_upstream: FakeOpenAI) -> FakeOpenAI:
    """The shared fake upstream, with its record and fault queue emptied for this test."""
    fake_upstream.clear()
    return fake_upstream


@pytest.fixture(scope="module")
def gateway(fake_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose only upstream is the fake OpenAI server."""
    data_dir = tmp_path_factory.mktemp("gateway")
    gw = start_gateway(make_settings(data_dir, [fake_upstream_config(fake_upstream)]), data_dir)
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def local_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway served only by the built-in `local` renderer."""
    data_dir = tmp_path_factory.mktemp("local-gateway")
    gw = start_gateway(make_settings(data_dir, [LOCAL_UPSTREAM]), data_dir)
    yield gw
    gw.close()
