"""The tracing facade: spans, their parentage and attributes, and silence when disabled."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.domain.jobs import TokenUsage
from app.telemetry.tracing import Tracing, TracingSettings


def tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    made = Tracing.from_settings(TracingSettings(enabled=True), processor=SimpleSpanProcessor(exporter))
    return made, exporter


def test_a_request_span_parents_its_upstream_tries() -> None:
    made, exporter = tracing()
    request = made.start_request(
        operation="generations", model="gpt-image-1.5", key_id="k1", request_id="r1", mode="sync"
    )
    with (
        pytest.raises(TimeoutError),
        made.upstream_try(parent=request, upstream="a", model="gpt-image-1.5", attempt=1),
    ):
        raise TimeoutError
    with made.upstream_try(parent=request, upstream="b", model="gpt-image-1.5", attempt=2) as attempt:
        attempt.outcome(status_code=200)
    request.settled(upstream="b", usage=TokenUsage(10, 0, 0, 272), cost_micros=8_754, status="succeeded")
    request.end()
    request.end()  # idempotent
    first, second, root = exporter.get_finished_spans()
    assert root.name == "image_generation gpt-image-1.5"
    assert root.attributes is not None and first.attributes is not None and second.attributes is not None
    assert root.attributes["gen_ai.operation.name"] == "image_generation"
    assert root.attributes["gen_ai.request.model"] == "gpt-image-1.5"
    assert root.attributes["gen_ai.usage.input_tokens"] == 10
    assert root.attributes["gen_ai.usage.output_tokens"] == 272
    assert root.attributes["gateway.key_id"] == "k1"
    assert root.attributes["gateway.upstream"] == "b"
    assert root.attributes["gateway.cost_micros"] == 8_754
    for child in (first, second):
        assert child.parent is not None and child.parent.span_id == root.context.span_id
    assert first.attributes["error.type"] == "TimeoutError"
    assert second.attributes["http.response.status_code"] == 200
    assert [s.attributes["gateway.attempt"] for s in (first, second)] == [1, 2]


async def test_concurrent_requests_keep_their_own_tries() -> None:
    made, exporter = tracing()

    async def one(model: str) -> None:
        request = made.start_request(operation="edits", model=model, key_id="k", request_id=None, mode="sync")
        await asyncio.sleep(0)
        with made.upstream_try(parent=request, upstream="u", model=model, attempt=1):
            await asyncio.sleep(0)
        request.end()

    await asyncio.gather(asyncio.create_task(one("m1")), asyncio.create_task(one("m2")))
    spans = exporter.get_finished_spans()
    roots = {s.context.span_id: s for s in spans if s.parent is None}
    for child in (s for s in spans if s.parent is not None):
        assert child.attributes is not None
        root = roots[child.parent.span_id]  # type: ignore[union-attr]
        assert root.attributes is not None
        assert root.attributes["gen_ai.request.model"] == child.attributes["gen_ai.request.model"]
    assert len(roots) == 2


def test_disabled_tracing_records_nothing_and_costs_nothing() -> None:
    made = Tracing.from_settings(TracingSettings())
    assert not made.enabled
    request = made.start_request(operation="generations", model="m", key_id="k", request_id=None, mode="sync")
    with made.upstream_try(parent=request, upstream="u", model="m", attempt=1) as attempt:
        attempt.outcome(status_code=500, error_type="UpstreamRejected")
    request.settled(upstream="u", usage=None, cost_micros=0, status="failed")
    request.end()
    made.shutdown()
