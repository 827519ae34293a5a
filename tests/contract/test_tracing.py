"""OpenTelemetry tracing (issue 17): with tracing on, a generation through the official SDK gives one
request span and one span per upstream try, with the GenAI attributes and the gateway's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.main import create_app
from app.telemetry.tracing import Tracing, TracingSettings
from tests.conftest import UPSTREAM_KEY, Gateway, closed_port, fake_upstream_config, make_settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import ThreadedServer


@pytest.fixture
def traced(tmp_path: Path, upstream: FakeOpenAI) -> Iterator[tuple[Gateway, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_settings(TracingSettings(enabled=True), processor=SimpleSpanProcessor(exporter))
    settings = make_settings(
        tmp_path,
        [
            # Tried first and refused at connect: one failed try span before the good one.
            {
                "name": "dead",
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{closed_port()}/v1",
                "api_key": "k",
                "follows_retirements": False,
            },
            fake_upstream_config(upstream, name="good", priority=1),
        ],
        retry={"max_retries_per_upstream": 0, "initial_delay_s": 0.01, "max_delay_s": 0.05},
    )
    server = ThreadedServer(create_app(settings, tracing=tracing), name="gateway", lifespan="on").start()
    gateway = Gateway(settings=settings, server=server, data_dir=tmp_path)
    try:
        yield gateway, exporter
    finally:
        gateway.close()


def attributes(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_a_generation_gives_a_request_span_and_upstream_try_spans(
    traced: tuple[Gateway, InMemorySpanExporter],
) -> None:
    gateway, exporter = traced
    key, key_id = gateway.create_key()
    image = gateway.client(key).images.generate(model="gpt-image-1.5", prompt="a lighthouse", quality="low")
    assert image.usage is not None
    (row,) = gateway.ledger()
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.parent is None]
    tries = sorted((s for s in spans if s.parent is not None), key=lambda s: attributes(s)["gateway.attempt"])
    assert request.name == "image_generation gpt-image-1.5"
    got = attributes(request)
    assert got["gen_ai.operation.name"] == "image_generation"
    assert got["gen_ai.request.model"] == "gpt-image-1.5"
    assert got["gen_ai.usage.input_tokens"] == image.usage.input_tokens
    assert got["gen_ai.usage.output_tokens"] == image.usage.output_tokens
    assert got["gateway.key_id"] == key_id
    assert got["gateway.upstream"] == "good"
    assert got["gateway.cost_micros"] == row["cost_micros"]
    assert [attributes(s)["gateway.upstream"] for s in tries] == ["dead", "good"]
    assert all(s.parent is not None and s.parent.span_id == request.context.span_id for s in tries)
    assert attributes(tries[0])["error.type"] == "UpstreamUnavailable"
    # The key, the upstream's key and the admin key appear in no span.
    text = repr([(s.name, attributes(s)) for s in spans])
    assert key not in text and UPSTREAM_KEY not in text and "sk-admin" not in text
