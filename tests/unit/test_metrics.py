"""Metrics: recorded numbers read back from the exposition text, label bounds, middleware, /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from app.api.errors import install_error_handlers
from app.api.metrics import MetricsMiddleware, build_metrics_router
from app.core.errors import UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from app.telemetry.metrics import Metrics, outcome_of

MODELS = ("gpt-image-1", "dall-e-3")
Labels = frozenset[tuple[str, str]]


def samples(metrics: Metrics, prefix: str = "gateway_") -> dict[tuple[str, Labels], float]:
    body, _ = metrics.render()
    found: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def label_values(metrics: Metrics, label: str) -> set[str]:
    return {v for (_, labels) in samples(metrics) for k, v in labels if k == label}


# -- recording ---------------------------------------------------------------------------------


def test_request_counter_and_histogram() -> None:
    metrics = Metrics(MODELS)
    for seconds in (0.2, 3.0):
        metrics.observe_request(
            route="/v1/images/generations", method="POST", status=200, model="gpt-image-1", seconds=seconds
        )
    metrics.observe_request(route="/v1/models", method="GET", status=401, model=None, seconds=0.01)

    assert (
        value(
            metrics,
            "gateway_requests_total",
            route="/v1/images/generations",
            method="POST",
            status="200",
            model="gpt-image-1",
        )
        == 2
    )
    assert (
        value(metrics, "gateway_requests_total", route="/v1/models", method="GET", status="401", model="none")
        == 1
    )
    route = {"route": "/v1/images/generations", "model": "gpt-image-1"}
    assert value(metrics, "gateway_request_duration_seconds_count", **route) == 2
    assert value(metrics, "gateway_request_duration_seconds_sum", **route) == pytest.approx(3.2)
    assert value(metrics, "gateway_request_duration_seconds_bucket", **route, le="1.0") == 1
    assert value(metrics, "gateway_request_duration_seconds_bucket", **route, le="5.0") == 2


def test_instances_do_not_share_state() -> None:
    first, second = Metrics(MODELS), Metrics(MODELS)
    first.observe_request(route="/v1/models", method="GET", status=200, model=None, seconds=0.1)
    first.set_queue_depth(7)

    assert (
        value(first, "gateway_requests_total", route="/v1/models", method="GET", status="200", model="none")
        == 1
    )
    assert (
        value(second, "gateway_requests_total", route="/v1/models", method="GET", status="200", model="none")
        is None
    )
    assert value(second, "gateway_queue_depth") == 0


def test_model_label_is_a_catalog_name_or_other() -> None:
    metrics = Metrics(MODELS)
    metrics.observe_usage(model="made-up-model", images=1)
    metrics.observe_usage(model=None, images=1)
    metrics.observe_usage(model="dall-e-3", images=1)
    assert label_values(metrics, "model") == {"other", "none", "dall-e-3"}

    metrics.set_models(["made-up-model"])
    metrics.observe_usage(model="made-up-model", images=1)
    assert value(metrics, "gateway_images_total", model="made-up-model") == 1


def test_free_form_labels_refuse_urls_secrets_ids_and_prompts() -> None:
    metrics = Metrics(MODELS)
    bad = [
        "https://api.example.com/v1",
        "sk-gw-3Jq9cX0aVbYkLm2NpQrStUvWxYz0123456789abcd",
        "3f2a1b9c-4d5e-6f70-8192-a3b4c5d6e7f8",
        "draw a cat on the moon",
    ]
    for text in bad:
        metrics.observe_moderation_block(categories=[text], stage="input")
        metrics.observe_upstream_try(upstream=text, model="gpt-image-1", outcome="success", seconds=0.1)
        metrics.observe_request(route=text, method="GET", status=200, model=text, seconds=0.1)
    metrics.observe_request(
        route="/admin/keys/3f2a1b9c-4d5e", method="BREW", status=200, model=None, seconds=0
    )

    rendered = metrics.render()[0].decode()
    for text in bad:
        assert text not in rendered
    assert label_values(metrics, "category") == {"other"}
    assert label_values(metrics, "upstream") == {"other"}
    assert label_values(metrics, "route") == {"other"}
    assert label_values(metrics, "method") == {"GET", "other"}


def test_free_form_labels_are_capped_in_number() -> None:
    metrics = Metrics()
    for i in range(150):
        metrics.observe_moderation_block(categories=f"category-{i}", stage="input")
    categories = label_values(metrics, "category")
    assert len(categories) == 101  # the first 100, then everything else as "other"
    assert value(metrics, "gateway_moderation_blocks_total", category="other", stage="input") == 50


def test_upstream_tries_by_outcome() -> None:
    metrics = Metrics(MODELS)
    with metrics.upstream_try(upstream="openai-eu", model="gpt-image-1"):
        pass
    with pytest.raises(UpstreamTimeout), metrics.upstream_try(upstream="openai-eu", model="gpt-image-1"):
        raise UpstreamTimeout()
    metrics.observe_upstream_try(upstream="openai-eu", model="gpt-image-1", outcome="bogus", seconds=1.0)

    tries = {"upstream": "openai-eu", "model": "gpt-image-1"}
    assert value(metrics, "gateway_upstream_tries_total", **tries, outcome="success") == 1
    assert value(metrics, "gateway_upstream_tries_total", **tries, outcome="timeout") == 1
    assert value(metrics, "gateway_upstream_tries_total", **tries, outcome="other") == 1
    assert value(metrics, "gateway_upstream_try_duration_seconds_count", **tries) == 3


def test_outcome_of_maps_the_error_tree() -> None:
    rejected = UpstreamRejected(429, "slow down", error_type=None, param=None, code=None)
    assert outcome_of(None) == "success"
    assert outcome_of(UpstreamTimeout()) == "timeout"
    assert outcome_of(UpstreamUnavailable()) == "unavailable"
    assert outcome_of(rejected) == "rejected"
    assert outcome_of(ValueError("bug")) == "error"
    assert outcome_of(asyncio.CancelledError()) == "cancelled"


def test_breaker_state_is_one_hot() -> None:
    metrics = Metrics()
    metrics.set_breaker_state(upstream="openai-eu", state="open")
    metrics.set_breaker_state(upstream="openai-eu", state="half_open")
    metrics.set_breaker_state(upstream="openai-eu", state="melted")  # unknown: ignored

    states = {
        dict(labels)["state"]: v
        for (name, labels), v in samples(metrics).items()
        if name == "gateway_upstream_breaker_state"
    }
    assert states == {"closed": 0, "open": 0, "half_open": 1}


def test_usage_tokens_cost_and_images() -> None:
    metrics = Metrics(MODELS)
    metrics.observe_usage(
        model="gpt-image-1",
        text_input=10,
        image_input=20,
        text_output=0,
        image_output=4160,
        cost_micros=42_000,
        images=2,
    )
    metrics.observe_usage(model="gpt-image-1", text_input=5, cost_micros=-1_000, images=1)

    kinds = ("text_input", "image_input", "text_output", "image_output")
    tokens = {kind: value(metrics, "gateway_tokens_total", model="gpt-image-1", kind=kind) for kind in kinds}
    assert tokens == {"text_input": 15, "image_input": 20, "text_output": 0, "image_output": 4160}
    assert value(metrics, "gateway_cost_micros_total", model="gpt-image-1") == 42_000
    assert value(metrics, "gateway_images_total", model="gpt-image-1") == 3


def test_moderation_blocks_once_per_category() -> None:
    metrics = Metrics()
    metrics.observe_moderation_block(categories=("violence/graphic", "self-harm"), stage="input")
    metrics.observe_moderation_block(categories="violence/graphic", stage="output")
    metrics.observe_moderation_block(categories=(), stage="input")

    name = "gateway_moderation_blocks_total"
    assert value(metrics, name, category="violence/graphic", stage="input") == 1
    assert value(metrics, name, category="self-harm", stage="input") == 1
    assert value(metrics, name, category="violence/graphic", stage="output") == 1
    assert value(metrics, name, category="unspecified", stage="input") == 1


async def test_scrape_hooks_refresh_gauges_and_a_failing_hook_is_skipped() -> None:
    metrics = Metrics()
    depth = iter([3, 5])

    async def poll_queue() -> None:
        metrics.set_queue_depth(next(depth))

    def broken() -> None:
        raise RuntimeError("database down")

    metrics.on_scrape(broken)
    metrics.on_scrape(poll_queue)
    metrics.on_scrape(lambda: metrics.set_breaker_state(upstream="local", state="closed"))

    await metrics.refresh()
    assert value(metrics, "gateway_queue_depth") == 3
    assert value(metrics, "gateway_upstream_breaker_state", upstream="local", state="closed") == 1
    await metrics.refresh()
    assert value(metrics, "gateway_queue_depth") == 5


def test_render_negotiates_openmetrics() -> None:
    metrics = Metrics()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# -- middleware and route ----------------------------------------------------------------------


def tiny_app(metrics: Metrics, token: str | None = None) -> FastAPI:
    app = FastAPI()
    app.state.metrics = metrics
    admin = APIRouter(prefix="/admin")

    @admin.get("/keys/{key_id}")
    async def get_key(key_id: str) -> dict[str, str]:
        return {"id": key_id}

    @app.post("/v1/images/generations")
    async def generate(request: Request) -> dict[str, str]:
        request.state.model = (await request.json())["model"]
        return {"ok": "yes"}

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        request.state.model = "dall-e-3"

        async def chunks() -> AsyncIterator[bytes]:
            yield b"first;"
            await asyncio.sleep(0)
            yield b"second"

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("unhandled")

    app.include_router(admin)
    app.include_router(build_metrics_router(token))
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(MODELS, process=False)


@pytest.fixture
async def client(metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(tiny_app(metrics), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as c:
        yield c


def requests_by(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    return {
        (labels["route"], labels["status"], labels["model"]): v
        for (name, frozen), v in samples(metrics).items()
        if name == "gateway_requests_total"
        for labels in [dict(frozen)]
    }


async def test_middleware_counts_by_route_template_status_and_model(
    client: httpx.AsyncClient, metrics: Metrics
) -> None:
    assert (await client.get("/admin/keys/key_3f2a1b9c")).status_code == 200
    assert (await client.get("/admin/keys/key_77aa01")).status_code == 200
    assert (await client.post("/admin/keys/key_77aa01")).status_code == 405
    assert (await client.post("/v1/images/generations", json={"model": "gpt-image-1"})).status_code == 200
    assert (await client.post("/v1/images/generations", json={"model": "no-such"})).status_code == 200
    assert (await client.get("/wp-login.php")).status_code == 404
    assert (await client.get("/boom")).status_code == 500

    counts = requests_by(metrics)
    assert counts == {
        ("/admin/keys/{key_id}", "200", "none"): 2,
        ("/admin/keys/{key_id}", "405", "none"): 1,
        ("/v1/images/generations", "200", "gpt-image-1"): 1,
        ("/v1/images/generations", "200", "other"): 1,
        ("other", "404", "none"): 1,
        ("/boom", "500", "none"): 1,
    }
    assert "key_3f2a1b9c" not in metrics.render()[0].decode()
    assert value(metrics, "gateway_requests_in_flight") == 0


async def test_middleware_relays_streams_and_times_the_whole_stream(
    client: httpx.AsyncClient, metrics: Metrics
) -> None:
    async with client.stream("GET", "/stream") as response:
        chunks = [chunk async for chunk in response.aiter_raw()]
    assert b"".join(chunks) == b"first;second"
    assert requests_by(metrics) == {("/stream", "200", "dall-e-3"): 1}
    assert value(metrics, "gateway_request_duration_seconds_count", route="/stream", model="dall-e-3") == 1


async def test_metrics_route_serves_the_exposition(client: httpx.AsyncClient) -> None:
    await client.get("/admin/keys/k1")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name for f in text_string_to_metric_families(response.text)}
    assert {"gateway_requests", "gateway_upstream_tries", "gateway_queue_depth"} <= families


async def test_metrics_route_with_token_requires_it(metrics: Metrics) -> None:
    transport = httpx.ASGITransport(tiny_app(metrics, token="metrics-token-0123456789"))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as c:
        missing = await c.get("/metrics")
        wrong = await c.get("/metrics", headers={"authorization": "Bearer nope"})
        right = await c.get("/metrics", headers={"authorization": "Bearer metrics-token-0123456789"})
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert "metrics-token" not in wrong.text
    assert right.status_code == 200
    assert "gateway_requests_total" in right.text


async def test_middleware_labels_mounted_routes_with_their_full_template(metrics: Metrics) -> None:
    outer, inner = FastAPI(), FastAPI()

    @inner.get("/x/{name}")
    async def x(name: str) -> dict[str, str]:
        return {"name": name}

    outer.mount("/files", inner)
    outer.add_middleware(MetricsMiddleware, metrics=metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(outer), base_url="http://t") as c:
        assert (await c.get("/files/x/abc123")).status_code == 200
        assert (await c.get("/files/nothing")).status_code == 404
    assert requests_by(metrics) == {("/files/x/{name}", "200", "none"): 1, ("other", "404", "none"): 1}


async def test_middleware_passes_each_chunk_on_before_the_next_is_produced(metrics: Metrics) -> None:
    delivered: list[bytes] = []

    async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        # A buffering middleware would still be holding the first chunk here.
        assert delivered == [b"first"]
        await send({"type": "http.response.body", "body": b"second", "more_body": False})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            delivered.append(message["body"])

    scope: Scope = {"type": "http", "method": "GET", "path": "/raw", "root_path": "", "headers": []}
    await MetricsMiddleware(streaming_app, metrics)(scope, receive, send)
    assert delivered == [b"first", b"second"]
    assert requests_by(metrics) == {("other", "200", "none"): 1}
