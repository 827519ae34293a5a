"""The ImagesResponse skeleton: what it reads must always equal a full parse of the body."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.upstream.skeleton import skeleton, summarize

B64 = base64.b64encode(bytes(range(256)) * 40).decode()  # has both "+" and "/"
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"text_tokens": 10, "image_tokens": 2},
    "output_tokens": 4160,
    "total_tokens": 4172,
}


def expected(raw: bytes) -> tuple[int, dict[str, Any] | None]:
    """What the gateway read before the skeleton: a full parse."""
    body = orjson.loads(raw)
    assert isinstance(body, dict) and isinstance(body.get("data"), list)
    usage = body.get("usage")
    return len(body["data"]), usage if isinstance(usage, dict) else None


def blanked(value: Any) -> Any:
    """``value`` with every ``b64_json`` string emptied, at any depth: what the skeleton parses to."""
    if isinstance(value, dict):
        return {k: "" if k == "b64_json" and isinstance(v, str) else blanked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [blanked(v) for v in value]
    return value


# --- examples ---------------------------------------------------------------------------------------


def test_images_are_emptied_and_the_rest_kept() -> None:
    body = {"created": 1, "data": [{"b64_json": B64}, {"b64_json": B64, "revised_prompt": 'ünï "q"'}]}
    raw = orjson.dumps({**body, "usage": USAGE})
    light = skeleton(raw)
    assert light is not None and len(light) < 300
    assert orjson.loads(light) == blanked({**body, "usage": USAGE})
    summary = summarize(raw)
    assert (summary.count, summary.usage, summary.body) == (2, USAGE, None)


def test_a_body_without_images_is_not_copied() -> None:
    raw = orjson.dumps({"created": 1, "data": [{"url": "https://x/y.png"}]})
    assert skeleton(raw) is raw


def test_pretty_printed_bodies() -> None:
    raw = json.dumps({"usage": USAGE, "data": [{"b64_json": B64}] * 3}, indent=4).encode()
    light = skeleton(raw)
    assert light is not None and b'"b64_json": ""' in light
    assert (summarize(raw).count, summarize(raw).usage) == (3, USAGE)


def test_escaped_slashes_in_an_image_are_emptied_with_it() -> None:
    raw = json.dumps({"data": [{"b64_json": B64}], "usage": USAGE}).replace("/", "\\/").encode()
    assert b"\\/" in raw
    light = skeleton(raw)
    assert light is not None and b'"b64_json": ""' in light
    summary = summarize(raw)
    assert (summary.count, summary.usage, summary.body) == (1, USAGE, None)


@pytest.mark.parametrize(
    "value",
    [
        'AAAA\\"',  # an escaped quote: the string goes on after it
        "AAAA\\\\",  # an escaped backslash right before the closing quote
    ],
)
def test_a_backslash_before_the_first_quote_takes_the_full_parse(value: str) -> None:
    raw = ('{"data": [{"b64_json": "' + value + '"}], "usage": ' + json.dumps(USAGE) + "}").encode()
    assert skeleton(raw) is None
    summary = summarize(raw)
    assert (summary.count, summary.usage) == (1, USAGE)
    assert summary.body is not None and summary.body["data"][0]["b64_json"] == json.loads(f'"{value}"')


@pytest.mark.parametrize(
    "text",
    [
        "b64_json",  # a value, not a key
        '"b64_json": "AAAA',  # escaped quotes: the text of a key inside a string
        '\\"b64_json',
        'ends with "b64_json',
    ],
)
def test_the_key_written_inside_other_strings_is_left_alone(text: str) -> None:
    body = {"data": [{"revised_prompt": text, "b64_json": B64}], "usage": USAGE, text: text}
    raw = orjson.dumps(body)
    light = skeleton(raw)
    assert light is not None and orjson.loads(light) == blanked(body)
    assert (summarize(raw).count, summarize(raw).usage) == (1, USAGE)


def test_an_image_key_inside_usage_takes_the_full_parse() -> None:
    usage = {**USAGE, "extra": {"b64_json": "not an image"}}
    summary = summarize(orjson.dumps({"data": [], "usage": usage}))
    assert summary.usage == usage and summary.body is not None


def test_non_string_image_values_are_kept() -> None:
    raw = b'{"data": [{"b64_json": null}, {"b64_json" : 5}], "usage": {}}'
    assert skeleton(raw) == raw
    assert (summarize(raw).count, summarize(raw).usage) == (2, {})


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"data": {}}',
        b'{"created": 1}',
        b'{"data": [{"b64_json": "AAAA',  # cut inside an image
        b'{"data": [{"b64_json": "AAAA"}]',  # cut after it
        b'{"data": [{"b64_json": "AA"AA"}]}',
        b'{"data": [{"b64_json": "AAAA"}]} trailing',
    ],
)
def test_anything_else_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        summarize(raw)


# --- properties -------------------------------------------------------------------------------------

TRICKY = st.sampled_from(["b64_json", '"b64_json"', '"b64_json": "', "\\", "/", '\\"b64_json', "\u2028é😀"])
TEXT = st.one_of(st.text(max_size=12), TRICKY)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
IMAGE = st.binary(max_size=300).map(lambda data: base64.b64encode(data).decode())
ITEM = st.fixed_dictionaries(
    {}, optional={"b64_json": IMAGE, "revised_prompt": TEXT, "url": TEXT, "b64": TEXT}
).flatmap(lambda item: st.dictionaries(TEXT, JSON, max_size=2).map(lambda extra: {**extra, **item}))
USAGES = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"input_tokens": st.integers(0, 10**6), "output_tokens": st.integers(0, 10**6)},
        optional={"input_tokens_details": st.dictionaries(TEXT, st.integers(0, 99), max_size=2)},
    ),
    JSON,
)


@st.composite
def images_responses(draw: st.DrawFn) -> dict[str, Any]:
    """ImagesResponse-shaped dicts with their keys in any order."""
    pairs = [("data", draw(st.lists(ITEM, max_size=4)))]
    usage = draw(USAGES)
    if usage is not None:
        pairs.append(("usage", usage))
    extra = draw(st.dictionaries(TEXT.filter(lambda k: k not in ("data", "usage")), JSON, max_size=3))
    pairs += list(extra.items())
    return dict(draw(st.permutations(pairs)))


def encodings(body: dict[str, Any]) -> list[bytes]:
    return [
        orjson.dumps(body),
        json.dumps(body, indent=2).encode(),  # \uXXXX escapes
        json.dumps(body, ensure_ascii=False, separators=(" ,\n", " :\t")).encode(),
        # `\/` is a legal escape in any string, and JSON has no "/" outside strings.
        json.dumps(body).replace("/", "\\/").encode(),
    ]


@settings(max_examples=300, deadline=None)
@given(images_responses())
def test_summary_equals_a_full_parse(body: dict[str, Any]) -> None:
    for raw in encodings(body):
        summary = summarize(raw)
        assert (summary.count, summary.usage) == expected(raw)
        light = skeleton(raw)
        if light is not None:
            assert orjson.loads(light) == blanked(orjson.loads(raw))
        elif _ends_escaped(raw):
            continue  # a backslash before some image's closing quote: the full parse's case
        else:
            raise AssertionError("only a backslash before a closing quote takes the full parse")


def _ends_escaped(raw: bytes) -> bool:
    """Whether some ``"b64_json"`` string value's first quote after its opening follows a backslash."""
    at = 0
    while (key := raw.find(b'"b64_json"', at)) >= 0:
        at = key + 1
        rest = raw[key + len(b'"b64_json"') :].lstrip(b" \t\r\n")
        if not rest.startswith(b":"):
            continue
        rest = rest[1:].lstrip(b" \t\r\n")
        if rest.startswith(b'"') and rest[1:].split(b'"', 1)[0].endswith(b"\\"):
            return True
    return False


@settings(max_examples=200, deadline=None)
@given(images_responses(), st.data())
def test_broken_bodies_are_refused_exactly_when_a_full_parse_refuses_them(
    body: dict[str, Any], data: st.DataObject
) -> None:
    raw = orjson.dumps(body)
    cut = data.draw(st.integers(0, len(raw)))
    broken = raw[:cut] + data.draw(st.sampled_from([b"", b'"', b"}", b"\\", b'"b64_json":"A"']))
    try:
        want: tuple[int, dict[str, Any] | None] | None = expected(broken)
    except (ValueError, AssertionError):
        want = None
    try:
        summary = summarize(broken)
        got: tuple[int, dict[str, Any] | None] | None = (summary.count, summary.usage)
    except ValueError:
        got = None
    assert got == want
