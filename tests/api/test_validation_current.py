"""Every rule that today's Images API added (openai 3.57's docstrings): one accepted and one
rejected request each, generations as JSON and edits as multipart.

Each rejection must carry the exact status, type, param and code, and must never reach the
upstream; each acceptance must reach it once.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Gateway, fake_upstream_config, make_settings, start_gateway
from tests.fakes.image_files import jpeg, png
from tests.fakes.openai_upstream import FakeOpenAI

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"


def rgba_png(width: int, height: int, *, transparent_box: bool = True) -> bytes:
    """An RGBA PNG: opaque, with a fully transparent box when asked."""
    image = Image.new("RGBA", (width, height), (20, 40, 60, 255))
    if transparent_box:
        image.paste((0, 0, 0, 0), (0, 0, width // 2, height // 2))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


IMAGE = png(320, 240)
MARKUP = rgba_png(320, 240)
MASK = rgba_png(320, 240)


@dataclass(frozen=True)
class Request:
    fields: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def is_edit(self) -> bool:
        return bool(self.files)


def gen(model: str = "gpt-image-2", **fields: Any) -> Request:
    return Request({"model": model, "prompt": "a lighthouse", **fields})


def edit(
    model: str = "gpt-image-2.5-flare", *, files: dict[str, bytes] | None = None, **fields: Any
) -> Request:
    return Request({"model": model, "prompt": "add a boat", **fields}, {"image": IMAGE, **(files or {})})


@dataclass(frozen=True)
class Rule:
    name: str
    accepted: Request
    rejected: Request
    param: str
    code: str
    status: int = 400
    error_type: str = "invalid_request_error"


SVG = {"model": "gpt-5.5", "reasoning": {"effort": "low"}}

RULES = [
    # Free sizes (gpt-image-2 and 2.5; 2.6 by its sibling's rule).
    Rule("free size: divisible by 16", gen(size="1536x864"), gen(size="1530x864"), "size", "invalid_value"),
    Rule("free size: ratio at most 3:1", gen(size="2304x768"), gen(size="2400x768"), "size", "invalid_value"),
    Rule(
        "free size: ratio at least 1:3", gen(size="768x2304"), gen(size="768x2400"), "size", "invalid_value"
    ),
    Rule(
        "free size: at most 3840x2160", gen(size="3840x2160"), gen(size="3840x2176"), "size", "invalid_value"
    ),
    Rule(
        "free size: edge at most 3840", gen(size="2160x3840"), gen(size="3856x1296"), "size", "invalid_value"
    ),
    Rule("free size: pixel bounds", gen(size="1024x640"), gen(size="768x768"), "size", "invalid_value"),
    Rule(
        "free size only where the model has them",
        gen("gpt-image-1.5", size="1536x1024"),
        gen("gpt-image-1.5", size="1536x864"),
        "size",
        "invalid_value",
    ),
    Rule(
        "free size on chatgpt-image-latest",
        gen("chatgpt-image-latest", size="1024x1024"),
        gen("chatgpt-image-latest", size="2048x1152"),
        "size",
        "invalid_value",
    ),
    Rule(
        "free size on edits",
        edit(size="1536x864"),
        edit(size="1536x860"),
        "size",
        "invalid_value",
    ),
    # Qualities of 2.5.
    Rule(
        "xhigh only on 2.5",
        gen("gpt-image-2.5-flare", quality="xhigh"),
        gen("gpt-image-2", quality="xhigh"),
        "quality",
        "invalid_value",
    ),
    Rule(
        "max only on 2.5",
        gen("gpt-image-2.5-sunburst-2026-09-08", quality="max"),
        gen("gpt-image-2.6-flare", quality="max"),
        "quality",
        "invalid_value",
    ),
    Rule(
        "xhigh on 2.5 edits",
        edit("gpt-image-2.5-sunburst", quality="xhigh"),
        edit("gpt-image-1.5", quality="xhigh"),
        "quality",
        "invalid_value",
    ),
    # complexity
    Rule(
        "complexity values", gen(complexity="high"), gen(complexity="extreme"), "complexity", "invalid_value"
    ),
    Rule(
        "complexity not on dall-e",
        gen("dall-e-3", complexity=None),
        gen("dall-e-3", complexity="low"),
        "complexity",
        "unsupported_parameter",
    ),
    # GIF
    Rule(
        "gif only where the model has it",
        gen("gpt-image-2", output_format="gif"),
        gen("gpt-image-1.5", output_format="gif"),
        "output_format",
        "invalid_value",
    ),
    Rule(
        "gif without stream",
        gen(output_format="gif", stream=False),
        gen(output_format="gif", stream=True),
        "stream",
        "invalid_value",
    ),
    Rule(
        "gif without partial_images",
        gen(output_format="gif", partial_images=0),
        gen(output_format="gif", partial_images=2),
        "partial_images",
        "invalid_value",
    ),
    Rule(
        "gif without output_compression",
        gen(output_format="gif"),
        gen(output_format="gif", output_compression=50),
        "output_compression",
        "invalid_value",
    ),
    Rule(
        "gif without mask",
        edit(output_format="gif"),
        edit(output_format="gif", files={"mask": MASK}),
        "mask",
        "invalid_value",
    ),
    Rule(
        "frame_count at most 16",
        gen(output_format="gif", frame_count=16),
        gen(output_format="gif", frame_count=17),
        "frame_count",
        "integer_above_max_value",
    ),
    Rule(
        "frame_count at least 2",
        gen(output_format="gif", frame_count=2),
        gen(output_format="gif", frame_count=1),
        "frame_count",
        "integer_below_min_value",
    ),
    Rule(
        "frame_count only with gif",
        gen(output_format="gif", frame_count=3),
        gen(output_format="png", frame_count=3),
        "frame_count",
        "invalid_value",
    ),
    Rule(
        "frame_duration_ms only with gif",
        gen(output_format="gif", frame_duration_ms=100),
        gen(output_format="webp", frame_duration_ms=100),
        "frame_duration_ms",
        "invalid_value",
    ),
    Rule(
        "frame_duration_ms positive",
        gen(output_format="gif", frame_duration_ms=1_000_000),
        gen(output_format="gif", frame_duration_ms=0),
        "frame_duration_ms",
        "integer_below_min_value",
    ),
    Rule(
        "gif within the model's GIF size limit",
        gen(output_format="gif", size="1536x1024"),
        gen(output_format="gif", size="2048x1152"),
        "size",
        "invalid_value",
    ),
    Rule(
        "gif on edits without stream",
        edit(output_format="gif"),
        edit(output_format="gif", stream="true"),
        "stream",
        "invalid_value",
    ),
    # SVG
    Rule(
        "svg needs n=1",
        gen(output_format="svg", n=1),
        gen(output_format="svg", n=2),
        "n",
        "invalid_value",
    ),
    Rule(
        "svg without stream",
        gen(output_format="svg", svg=SVG),
        gen(output_format="svg", svg=SVG, stream=True),
        "stream",
        "invalid_value",
    ),
    Rule(
        "svg without partial_images",
        gen(output_format="svg"),
        gen(output_format="svg", partial_images=1),
        "partial_images",
        "invalid_value",
    ),
    Rule(
        "svg without output_compression",
        gen(output_format="svg"),
        gen(output_format="svg", output_compression=80),
        "output_compression",
        "invalid_value",
    ),
    Rule(
        "svg object only with svg output",
        gen(output_format="svg", svg=SVG),
        gen(output_format="png", svg=SVG),
        "svg",
        "invalid_value",
    ),
    Rule(
        "svg reasoning effort values",
        gen(output_format="svg", svg={"model": "gpt-5.5", "reasoning": {"effort": "xhigh"}}),
        gen(output_format="svg", svg={"model": "gpt-5.5", "reasoning": {"effort": "huge"}}),
        "svg.reasoning.effort",
        "invalid_value",
    ),
    Rule(
        # Any author name (the SDK types it as a string), bounded by the ledger's column.
        "svg author any name up to 100 characters",
        gen(output_format="svg", svg={"model": "gpt-0-unknown"}),
        gen(output_format="svg", svg={"model": "a" * 101}),
        "svg.model",
        "invalid_value",
    ),
    Rule(
        "svg on edits needs n=1 (multipart fields)",
        edit(output_format="svg", **{"svg[model]": "gpt-5.5", "svg[reasoning][effort]": "low"}),
        edit(output_format="svg", n="3"),
        "n",
        "invalid_value",
    ),
    Rule(
        "svg[reasoning][effort] on edits",
        edit(output_format="svg", **{"svg[reasoning][effort]": "none"}),
        edit(output_format="svg", **{"svg[reasoning][effort]": "loads"}),
        "svg.reasoning.effort",
        "invalid_value",
    ),
    # markup
    Rule(
        "markup not with mask",
        edit(files={"markup": MARKUP}),
        edit(files={"markup": MARKUP, "mask": MASK}),
        "markup",
        "invalid_value",
    ),
    Rule(
        "markup of the first image's size",
        edit(files={"markup": MARKUP}),
        edit(files={"markup": rgba_png(240, 320)}),
        "markup",
        "invalid_markup",
    ),
    Rule(
        "markup with transparent pixels",
        edit(files={"markup": MARKUP}),
        edit(files={"markup": png(320, 240)}),
        "markup",
        "invalid_markup",
    ),
    Rule(
        "markup a PNG",
        edit(files={"markup": MARKUP}),
        edit(files={"markup": jpeg(320, 240)}),
        "markup",
        "invalid_image_format",
    ),
    Rule(
        "markup only where the model supports it",
        edit("gpt-image-2.5-sunburst", files={"markup": MARKUP}),
        edit("gpt-image-2", files={"markup": MARKUP}),
        "markup",
        "unsupported_parameter",
    ),
    # input_fidelity, style
    Rule(
        "input_fidelity refused on gpt-image-2",
        edit("gpt-image-1.5", input_fidelity="high"),
        edit("gpt-image-2", input_fidelity="high"),
        "input_fidelity",
        "unsupported_parameter",
    ),
    Rule(
        "input_fidelity refused on a gpt-image-2 snapshot",
        edit("gpt-image-1-mini", input_fidelity="low"),
        edit("gpt-image-2-2026-04-21", input_fidelity="low"),
        "input_fidelity",
        "unsupported_parameter",
    ),
    Rule(
        "style is for dall-e only",
        gen("dall-e-3", style="natural"),
        gen("gpt-image-2.5-flare", style="vivid"),
        "style",
        "unsupported_parameter",
    ),
]


@pytest.fixture(scope="module")
def every_model(fake_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("validation-current")
    gw = start_gateway(make_settings(data_dir, [fake_upstream_config(fake_upstream, models=["*"])]), data_dir)
    yield gw
    gw.close()


def send(gw: Gateway, key: str, request: Request) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    fields = {k: v for k, v in request.fields.items() if v is not None}
    if not request.is_edit:
        return httpx.post(gw.url + GEN, json=fields, headers=headers, timeout=60)
    data = {k: str(v) for k, v in fields.items()}
    files = [
        (name, (f"{name}.bin", content, "application/octet-stream"))
        for name, content in request.files.items()
    ]
    return httpx.post(gw.url + EDIT, data=data, files=files, headers=headers, timeout=60)


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_rule(every_model: Gateway, upstream: FakeOpenAI, rule: Rule) -> None:
    key, _ = every_model.create_key(name="validation-current")

    rejected = send(every_model, key, rule.rejected)
    assert rejected.status_code == rule.status, rejected.text
    error = rejected.json()["error"]
    assert error["type"] == rule.error_type
    assert error["param"] == rule.param
    assert error["code"] == rule.code
    assert error["message"]
    assert upstream.count() == 0, "a rejected request reached the upstream"

    accepted = send(every_model, key, rule.accepted)
    assert accepted.status_code == 200, accepted.text
    assert upstream.count() == 1


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ("1530x864", "divisible by 16"),
        ("2400x768", "aspect ratio"),
        ("3840x2176", "maximum resolution is 3840x2160"),
        ("768x768", "at least 655360 pixels"),
    ],
)
def test_each_free_size_rule_says_which_rule(
    every_model: Gateway, upstream: FakeOpenAI, size: str, words: str
) -> None:
    key, _ = every_model.create_key(name="free-size-messages")
    response = send(every_model, key, gen(size=size))
    assert response.status_code == 400
    assert words in response.json()["error"]["message"]
    assert upstream.count() == 0
