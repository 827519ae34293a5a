"""Today's Images API (openai 3.57) through the gateway: every catalog model, free sizes, GIF and
SVG output, and the new fields, with the official SDK against the fake upstream and `local`.

Acceptance 1 (every model generates and edits, results decode at the asked size; GIF frames and
delay) and 3 (new fields and an unknown one arrive unchanged; `markup` arrives byte-identical).
"""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from app.domain.catalog import Catalog
from tests.conftest import (
    MODELS_FILE,
    Gateway,
    fake_upstream_config,
    make_settings,
    start_gateway,
)
from tests.fakes.image_files import png
from tests.fakes.openai_upstream import FakeOpenAI

CATALOG = Catalog.from_file(MODELS_FILE)
# The OpenAI models (the SDK's `ImageModel`) and their snapshots; other providers' models have
# their own tests and upstream kinds.
MODELS = [name for name in CATALOG.names() if (caps := CATALOG.get(name)) and caps.provider is None]
SVG_NS = "{http://www.w3.org/2000/svg}"


def size_for(model: str) -> str:
    """A size each model takes: a free size where the catalog allows one, else a listed one."""
    caps = CATALOG.get(model)
    assert caps is not None
    if caps.free_size is not None:
        return "1536x864"
    return {"dall-e-3": "1792x1024", "dall-e-2": "512x512"}.get(model, "1024x1536")


@pytest.fixture(scope="module")
def every_model(fake_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose one upstream is the fake, serving the whole catalog under its own names."""
    data_dir = tmp_path_factory.mktemp("every-model")
    upstream = fake_upstream_config(fake_upstream, models=["*"])
    gw = start_gateway(make_settings(data_dir, [upstream]), data_dir)
    yield gw
    gw.close()


@pytest.fixture(params=["fake", "local"])
def backend(request: pytest.FixtureRequest, upstream: FakeOpenAI) -> Gateway:
    name = "every_model" if request.param == "fake" else "local_gateway"
    gateway: Gateway = request.getfixturevalue(name)
    return gateway


def image_of(item: Any) -> Image.Image:
    """The image of one `data[]` entry: base64, or downloaded from the gateway's signed link."""
    if item.b64_json:
        data = base64.b64decode(item.b64_json)
    else:
        assert item.url, "neither b64_json nor url"
        response = httpx.get(item.url, timeout=30)
        assert response.status_code == 200, response.text
        data = response.content
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("model", MODELS)
def test_every_model_generates_at_the_asked_size(backend: Gateway, model: str) -> None:
    size = size_for(model)
    result = backend.client().images.generate(model=model, prompt="a harbour at noon", size=size)
    assert result.data and len(result.data) == 1
    image = image_of(result.data[0])
    assert f"{image.width}x{image.height}" == size
    if model.startswith("dall-e"):
        assert result.data[0].url and result.data[0].b64_json is None  # OpenAI's default for dall-e
    else:
        assert result.data[0].b64_json and result.size == size and result.usage is not None


@pytest.mark.parametrize("model", [m for m in MODELS if (c := CATALOG.get(m)) and c.edit])
def test_every_model_edits_at_the_asked_size(backend: Gateway, model: str) -> None:
    size = "512x512" if model == "dall-e-2" else size_for(model)
    source = png(512, 512) if model == "dall-e-2" else png(300, 200)
    result = backend.client().images.edit(
        model=model,
        image=("in.png", source, "image/png"),
        prompt="make it autumn",
        size=size,  # type: ignore[arg-type]
    )
    assert result.data
    image = image_of(result.data[0])
    assert f"{image.width}x{image.height}" == size


GIF_MODELS = [m for m in MODELS if (c := CATALOG.get(m)) and "gif" in c.output_formats]
SVG_MODELS = [m for m in MODELS if (c := CATALOG.get(m)) and "svg" in c.output_formats]


@pytest.mark.parametrize("model", ["gpt-image-2", "gpt-image-2.5-flare", "gpt-image-2.6-sunburst"])
def test_gif_has_the_asked_frames_and_delay(backend: Gateway, model: str) -> None:
    assert model in GIF_MODELS
    result = backend.client().images.generate(
        model=model,
        prompt="a bouncing ball",
        size="1024x640",
        output_format="gif",
        frame_count=5,
        frame_duration_ms=120,
    )
    assert result.data and result.output_format == "gif"
    image = image_of(result.data[0])
    assert image.format == "GIF" and image.size == (1024, 640)
    assert getattr(image, "n_frames", 1) == 5
    for index in range(5):
        image.seek(index)
        assert image.info["duration"] == 120


def test_gif_defaults_to_nine_frames(backend: Gateway) -> None:
    result = backend.client().images.generate(
        model="gpt-image-2.5-sunburst", prompt="a flag in the wind", size="1024x1024", output_format="gif"
    )
    assert result.data
    image = image_of(result.data[0])
    assert getattr(image, "n_frames", 1) == 9 and image.info["duration"] == 200


@pytest.mark.parametrize("model", ["gpt-image-2", "gpt-image-2.5-sunburst"])
def test_svg_is_a_well_formed_document_of_the_asked_size(backend: Gateway, model: str) -> None:
    assert model in SVG_MODELS
    result = backend.client().images.generate(
        model=model,
        prompt="a <minimal> logo & wordmark",
        size="1536x1024",
        output_format="svg",
        svg={"model": "gpt-5.5-mini", "reasoning": {"effort": "low"}},
    )
    assert result.data and result.output_format == "svg"
    document = base64.b64decode(result.data[0].b64_json or "")
    root = ET.fromstring(document)
    assert root.tag == f"{SVG_NS}svg"
    assert (root.get("width"), root.get("height")) == ("1536", "1024")
    assert result.svg_usage is not None
    assert result.svg_usage.model == "gpt-5.5-mini"
    assert result.svg_usage.output_tokens > 0 and result.svg_usage.total_tokens > 0


def test_new_fields_and_unknown_ones_arrive_unchanged(every_model: Gateway, upstream: FakeOpenAI) -> None:
    client = every_model.client()
    client.images.generate(
        model="gpt-image-2.5-flare",
        prompt="a poster",
        size="1536x864",
        quality="xhigh",
        complexity="high",
        output_format="gif",
        frame_count=4,
        frame_duration_ms=250,
        safety_identifier="hashed-user-1",
        user="legacy-user",
        extra_body={"future_knob": {"nested": [1, 2]}},
    )
    sent = upstream.last.json
    assert sent is not None
    assert {k: sent[k] for k in ("complexity", "frame_count", "frame_duration_ms", "quality", "size")} == {
        "complexity": "high",
        "frame_count": 4,
        "frame_duration_ms": 250,
        "quality": "xhigh",
        "size": "1536x864",
    }
    assert sent["safety_identifier"] == "hashed-user-1" and sent["user"] == "legacy-user"
    assert sent["future_knob"] == {"nested": [1, 2]}
    assert "response_format" not in sent  # OpenAI refuses it for GPT image models

    result = client.images.generate(
        model="gpt-image-2",
        prompt="an icon",
        output_format="svg",
        svg={"model": "gpt-5.1", "reasoning": {"effort": "high"}, "future": "x"},  # type: ignore[typeddict-unknown-key]
        safety_identifier="hashed-user-2",
    )
    sent = upstream.last.json
    assert sent["svg"] == {"model": "gpt-5.1", "reasoning": {"effort": "high"}, "future": "x"}
    # Relayed from the upstream: the effective identifier and the SVG author's usage.
    assert result.safety_identifier == "hashed-user-2"
    assert result.svg_usage is not None and result.svg_usage.model == "gpt-5.1"


def test_edit_fields_and_markup_arrive_unchanged(every_model: Gateway, upstream: FakeOpenAI) -> None:
    source = png(320, 240)
    markup = Image.new("RGBA", (320, 240), (0, 0, 0, 0))
    markup.paste((255, 0, 0, 255), (40, 40, 120, 120))
    markup_bytes = io.BytesIO()
    markup.save(markup_bytes, "PNG")
    markup_data = markup_bytes.getvalue()

    every_model.client().images.edit(
        model="gpt-image-2.5-sunburst",
        image=("photo.png", source, "image/png"),
        markup=("markup.png", markup_data, "image/png"),
        prompt="turn the red box into a window",
        complexity="medium",
        output_format="svg",
        svg={"model": "gpt-5-mini", "reasoning": {"effort": "minimal"}},
        safety_identifier="hashed-user-3",
        extra_body={"future_field": "kept"},
    )
    recorded = upstream.last
    assert recorded.path == "/v1/images/edits"
    (sent_markup,) = recorded.files_for("markup")
    assert sent_markup.data == markup_data and sent_markup.filename  # a file part, byte for byte
    assert [f.data for f in recorded.files_for("image")] == [source]
    assert recorded.form["svg[model]"] == ["gpt-5-mini"]
    assert recorded.form["svg[reasoning][effort]"] == ["minimal"]
    assert recorded.form["complexity"] == ["medium"]
    assert recorded.form["safety_identifier"] == ["hashed-user-3"]
    assert recorded.form["future_field"] == ["kept"]
    assert "response_format" not in recorded.form


def test_markup_edit_through_local(local_gateway: Gateway) -> None:
    markup = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    markup.paste((0, 255, 0, 255), (0, 0, 64, 64))
    out = io.BytesIO()
    markup.save(out, "PNG")
    result = local_gateway.client().images.edit(
        model="gpt-image-2.5-flare",
        image=("a.png", png(256, 256), "image/png"),
        markup=("m.png", out.getvalue(), "image/png"),
        prompt="a door",
        size="1024x1024",
    )
    assert result.data and image_of(result.data[0]).size == (1024, 1024)


def test_models_list_shows_aliases_and_lifecycle(every_model: Gateway) -> None:
    client: openai.OpenAI = every_model.client()
    listed = {m.id: m.model_dump() for m in client.models.list()}
    for name in MODELS:
        assert name in listed
    assert listed["gpt-image-2-2026-04-21"]["alias_of"] == "gpt-image-2"
    assert listed["gpt-image-2.5-flare-2026-09-08"]["alias_of"] == "gpt-image-2.5-flare"
    assert listed["gpt-image-1"]["state"] == "retired"
    assert listed["gpt-image-1"]["retired_at"] == "2026-10-23"
    assert listed["gpt-image-1"]["replacement"] == "gpt-image-2.5-sunburst"
    assert listed["dall-e-3"]["retired_at"] == "2026-05-12"
    assert listed["gpt-image-2"]["state"] == "active"


def test_a_dated_snapshot_is_sent_under_its_own_name(every_model: Gateway, upstream: FakeOpenAI) -> None:
    every_model.client().images.generate(model="gpt-image-2-2026-04-21", prompt="a map", size="2048x1152")
    assert upstream.last.json["model"] == "gpt-image-2-2026-04-21"
    rows = every_model.ledger()
    assert rows[-1]["model"] == "gpt-image-2-2026-04-21"
