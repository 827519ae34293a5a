"""Property tests (issue 10): request validation against the catalog, the reservation bound, and the
SSE decoder under any framing.

- Validation: any JSON body (or any multipart text fields) either becomes a job whose every setting
  obeys the model's catalog entry, with the client's fields kept for the upstream, or is refused
  with an ``InvalidRequestError`` carrying a message, a param and a code; never another exception.
- Money: for a valid generation, whatever usage the catalog allows the upstream to report, the charge
  never exceeds the reservation, and amounts survive their decimal text form exactly.
- SSE: what the gateway writes (sse-starlette) decodes back to the same events through the upstream
  decoder whatever the chunking; and streams written with any mix of LF, CRLF and CR line ends,
  comments, ids and multi-line data decode to what the WHATWG algorithm gives.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from app.billing.pricing import request_cost, worst_case_cost
from app.core.errors import InvalidRequestError
from app.domain.catalog import Catalog, ModelCapabilities, parse_size
from app.domain.jobs import ImageJob, TokenUsage
from app.domain.money import format_micros
from app.images.admission.validation import (
    BACKGROUNDS,
    MODERATION_LEVELS,
    PARTIAL_IMAGES_MAX,
    RESPONSE_FORMATS,
    build_job,
    parse_edit_form,
    parse_generate_request,
)
from app.upstream.sse_decode import SSEDecoder, SSEEvent
from tests.conftest import MODELS_FILE

CATALOG = Catalog.from_file(MODELS_FILE)
MODELS = sorted(CATALOG.names())
PROPERTY = settings(
    max_examples=400, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
CHOICES: dict[str, list[Any]] = {
    "model": [*MODELS, "gpt-4o", ""],
    "prompt": ["a lighthouse", "", "  ", "x" * 1001, "x" * 4001, "x" * 32_001, "🌊" * 3],
    "n": [-1, 0, 1, 2, 10, 11],
    "size": [
        "auto",
        "1024x1024",
        "1536x1024",
        "1024x1536",
        "1792x1024",
        "256x256",
        "512x512",
        "640x480",
        "x",
    ],
    "quality": ["low", "medium", "high", "auto", "standard", "hd", ""],
    "background": ["transparent", "opaque", "auto", "clear"],
    "output_format": ["png", "jpeg", "webp", "gif"],
    "output_compression": [-1, 0, 50, 100, 101],
    "moderation": ["low", "auto", "strict"],
    "stream": [True, False],
    "partial_images": [-1, 0, 1, 3, 4],
    "response_format": ["url", "b64_json", "png"],
    "style": ["vivid", None, False],
    "input_fidelity": ["low", "high", "max"],
    "user": ["u1"],
    "seed": [7],  # a field the gateway does not know: forwarded as is
}


def field_value(name: str) -> st.SearchStrategy[Any]:
    return st.sampled_from(CHOICES[name]) | json_values if name != "model" else st.sampled_from(CHOICES[name])


def some_fields(names: list[str], most: int) -> st.SearchStrategy[dict[str, Any]]:
    chosen = st.lists(st.sampled_from(names), max_size=most, unique=True)
    return chosen.flatmap(lambda picked: st.fixed_dictionaries({n: field_value(n) for n in picked}))


OPTIONAL = sorted(set(CHOICES) - {"model", "prompt", "input_fidelity"})
generation_payloads = st.one_of(
    st.builds(
        lambda model, prompt, extra: {"model": model, "prompt": prompt, **extra},
        st.sampled_from(CHOICES["model"]),
        st.sampled_from(CHOICES["prompt"]),
        some_fields(OPTIONAL, 5),
    ),
    some_fields(sorted(CHOICES), 6),
    json_values,
)


def check_refusal(exc: InvalidRequestError) -> None:
    assert exc.status_code == 400 and exc.message and exc.code, exc.to_body()
    # Only a body that is not a JSON object has no parameter to point at.
    assert exc.param or exc.code == "invalid_json", exc.to_body()


def check_job(job: ImageJob, caps: ModelCapabilities, sent: dict[str, Any]) -> None:
    """Every effective setting of ``job`` is one the catalog allows for ``caps``."""
    assert job.model == caps.name
    assert job.prompt.strip() and len(job.prompt) <= caps.max_prompt_chars
    assert 1 <= job.n <= caps.n_max
    dims = parse_size(job.size)
    assert job.size in caps.sizes or (
        caps.free_size is not None and dims is not None and caps.free_size.check(*dims) is None
    )
    assert job.quality in caps.qualities
    assert job.output_format in caps.output_formats
    assert job.background is None or job.background in BACKGROUNDS
    if job.background == "transparent":
        assert caps.transparent_background and job.output_format in ("png", "webp")
    if job.output_compression is not None:
        assert 0 <= job.output_compression <= 100
        assert job.output_format != "png" or job.output_compression == 100
    assert job.moderation in MODERATION_LEVELS
    assert caps.stream or not job.stream
    assert 0 <= job.partial_images <= min(PARTIAL_IMAGES_MAX, caps.max_partial_images)
    assert job.response_format in RESPONSE_FORMATS
    for name in caps.unsupported_fields:
        assert sent.get(name) in (None, False, "false", "False"), name
    # The client's own fields reach the upstream unchanged (unknown ones included).
    body = job.upstream_body("upstream-name")
    assert body["model"] == "upstream-name"
    for name, value in sent.items():
        if name not in ("model", "stream", "response_format", *caps.drop_fields) and value is not None:
            assert body[name] == value, name
    assert not set(caps.drop_fields) & body.keys()


@PROPERTY
@given(payload=generation_payloads, query_format=st.sampled_from([None, "url", "b64_json", "gif"]))
def test_any_generation_body_is_a_valid_job_or_a_clean_400(payload: Any, query_format: str | None) -> None:
    try:
        request = parse_generate_request(payload)
        caps = CATALOG.get(request.model)
        if caps is None:
            return  # the service answers 400 model not found (see the API fuzz)
        job = build_job(request=request, caps=caps, request_id="req_p", query_response_format=query_format)
    except InvalidRequestError as exc:
        check_refusal(exc)
        return
    check_job(job, caps, payload)
    assert job.endpoint == "generations"


EDIT_OPTIONAL = sorted(set(CHOICES) - {"model", "prompt"})
edit_forms = st.one_of(
    st.builds(
        lambda model, extra: {"model": model, "prompt": "a hat", **extra},
        st.sampled_from(CHOICES["model"]),
        some_fields(EDIT_OPTIONAL, 5),
    ),
    some_fields(sorted(CHOICES), 6),
).map(lambda fields: {k: str(v) for k, v in fields.items()}) | st.dictionaries(
    st.text(max_size=12), st.text(max_size=12), max_size=5
)


@PROPERTY
@given(fields=edit_forms)
def test_any_edit_form_is_a_valid_job_or_a_clean_400(fields: dict[str, str]) -> None:
    """Multipart fields arrive as text: numbers and booleans are parsed, the rest is checked as above."""
    try:
        request = parse_edit_form(fields)
        caps = CATALOG.get(request.model)
        if caps is None:
            return
        job = build_job(request=request, caps=caps, request_id="req_p", endpoint="edits")
    except InvalidRequestError as exc:
        check_refusal(exc)
        return
    assert caps.edit is not None and job.endpoint == "edits"
    assert job.input_fidelity is None or job.input_fidelity in caps.input_fidelity
    typed = request.model_dump(exclude_none=True) | (request.model_extra or {})
    check_job(job, caps, {k: v for k, v in typed.items() if k in fields})


# -- money ----------------------------------------------------------------------------------------

valid_generations = st.builds(
    lambda model, prompt, n, size, quality: {
        "model": model,
        "prompt": prompt,
        "n": n,
        "size": size,
        "quality": quality,
    },
    st.sampled_from(MODELS),
    st.text(min_size=1, max_size=200).filter(str.strip),
    st.integers(1, 10),
    st.sampled_from(CHOICES["size"]),
    st.sampled_from(CHOICES["quality"]),
)


def up_to(bound: int) -> st.SearchStrategy[int]:
    """0..bound, with the bound itself (the case that matters for a worst case) drawn often."""
    return st.just(bound) | st.integers(0, bound)


@st.composite
def job_and_usage(draw: st.DrawFn) -> tuple[ImageJob, TokenUsage, int]:
    """A valid generation, and a usage the catalog allows its upstream to report for it."""
    payload = draw(valid_generations)
    caps = CATALOG.get(payload["model"])
    assert caps is not None
    try:
        job = build_job(request=parse_generate_request(payload), caps=caps, request_id="req_m")
    except InvalidRequestError:
        assume(False)
        raise
    images = draw(st.integers(0, job.n))
    # `auto` lets the upstream choose: any quality, any of the model's concrete sizes.
    qualities = list(caps.output_token_estimate) if job.quality == "auto" else [job.quality]
    quality = draw(st.sampled_from(qualities)) if qualities else job.quality
    sizes = [s for s in caps.sizes if s != "auto"] if job.size == "auto" else [job.size]
    rendered = draw(st.sampled_from(sizes))
    per_image = caps.output_tokens_per_image(quality, rendered)
    usage = TokenUsage(
        text_input=draw(up_to(len(job.prompt.encode()))), image_output=draw(up_to(per_image * images))
    )
    return job, usage, images


@PROPERTY
@given(case=job_and_usage())
def test_the_charge_never_exceeds_the_reservation(case: tuple[ImageJob, TokenUsage, int]) -> None:
    job, usage, images = case
    reserved = worst_case_cost(job)
    charged, _ = request_cost(job, usage, images)
    estimated, _ = request_cost(job, None, images)  # an upstream that reports no usage
    assert 0 <= charged <= reserved and 0 <= estimated <= reserved, (job.model, job.size, job.quality)


@PROPERTY
@given(micros=st.integers(-(10**15), 10**15))
def test_amounts_survive_their_decimal_text(micros: int) -> None:
    text = format_micros(micros)
    assert re.fullmatch(r"-?\d+\.\d{6}", text)
    assert Decimal(text) * 1_000_000 == micros


# -- SSE --------------------------------------------------------------------------------------------


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + list(decoder.flush())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
cuts = st.lists(st.integers(0, 10_000), max_size=30)


@PROPERTY
@given(events=st.lists(st.tuples(texts, texts), min_size=1, max_size=6), cuts=cuts)
def test_what_the_gateway_writes_decodes_back(events: list[tuple[str, str]], cuts: list[int]) -> None:
    """sse-starlette (the gateway's writer) → the upstream decoder: same names and data, any chunking.
    Line breaks inside data come back as LF (SSE has no other way to carry them)."""
    wire = b"".join(ServerSentEvent(data=data, event=name).encode() for name, data in events)
    expected = [
        (re.sub(r"[\r\n]", "", name) or "message", re.sub(r"\r\n|\r", "\n", data).encode())
        for name, data in events
    ]
    assert [(e.event, e.data) for e in decode(split(wire, cuts))] == expected


line_ends = st.sampled_from([b"\n", b"\r\n", b"\r"])
no_breaks = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
field_text = st.text(
    st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)), max_size=20
)


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """A stream built line by line, each line ended by LF, CRLF or CR, and the events the WHATWG
    algorithm dispatches for it (blank line = dispatch; ``id`` persists across events)."""
    wire, expected, last_id = b"", [], None
    count = draw(st.integers(1, 5))
    for index in range(count):
        lines: list[bytes] = []
        name = draw(st.none() | field_text)
        data = draw(st.lists(no_breaks, min_size=1, max_size=3))
        if draw(st.booleans()):
            lines.append(b": " + draw(no_breaks))  # a comment (keep-alive)
        if name is not None:
            lines.append(b"event: " + name.encode())
        if draw(st.booleans()):
            last_id = draw(field_text)
            lines.append(b"id:" + last_id.encode())
        lines.extend(b"data: " + d for d in data)
        final = index == count - 1
        ends_blank = not final or draw(st.booleans())  # the last event may lack its blank line
        end = b""
        for line in lines:
            end = draw(line_ends)
            wire += line + end
        if ends_blank:
            # CR then LF is one line end (CRLF), not a line end and a blank line.
            wire += draw(st.sampled_from([b"\r\n", b"\r"]) if end == b"\r" else line_ends)
        expected.append(SSEEvent(event=name or "message", data=b"\n".join(data), id=last_id))
    return wire, expected


@PROPERTY
@given(stream=sse_streams(), cuts=cuts)
def test_any_line_ends_and_chunking_decode_like_the_spec(
    stream: tuple[bytes, list[SSEEvent]], cuts: list[int]
) -> None:
    wire, expected = stream
    assert decode(split(wire, cuts)) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_every_small_chunk_size_of_a_long_stream(size: int) -> None:
    wire = b"".join(
        ServerSentEvent(
            data=f'{{"i": {i}, "b64_json": "{"A" * (i * 37 % 500)}"}}', event="image_generation.partial_image"
        ).encode()
        for i in range(40)
    )
    events = decode([wire[i : i + size] for i in range(0, len(wire), size)])
    assert [e.data for e in events] == [
        f'{{"i": {i}, "b64_json": "{"A" * (i * 37 % 500)}"}}'.encode() for i in range(40)
    ]
