"""Read what the gateway needs from an upstream ImagesResponse without decoding its images.

A non-streaming answer is relayed as the bytes the upstream sent. The gateway still has to check
that it is an ImagesResponse (an object with a ``data`` list), count its images and read its
``usage`` for billing; parsing the whole body for that would turn every multi-megabyte
``b64_json`` value into a Python string, only to drop it again. Instead the body is parsed as a
*skeleton*: a copy in which every ``"b64_json": "<base64>"`` value is emptied. It has the same
structure as the body, so it is valid JSON exactly when the body is (the base64 itself aside: see
``skeleton``), and it holds the same usage and item count.

Whenever the shortcut cannot be proved right, the whole body is parsed instead, which always is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

_KEY = b'"b64_json"'
_WHITESPACE = frozenset(b" \t\r\n")  # JSON's own, nothing more
_BACKSLASH = 0x5C
_COLON = 0x3A
_QUOTE = 0x22


@dataclass(frozen=True, slots=True)
class ImagesSummary:
    """The parts of an ImagesResponse that the request path uses.

    ``body`` is the full parse when the fallback had to make one, so that nobody makes it twice.
    """

    count: int
    usage: dict[str, Any] | None
    body: dict[str, Any] | None = None


def summarize(raw: bytes) -> ImagesSummary:
    """Validate ``raw`` as an ImagesResponse and read its image count and non-empty ``usage``.

    Raises ``ValueError`` (``orjson.JSONDecodeError`` is one) when it is not JSON, or not an object
    with a ``data`` list.
    """
    light = skeleton(raw)
    if light is not None:
        body = _images_response(orjson.loads(light))
        usage = body.get("usage")
        # An emptied value inside `usage` would change what is billed and stored: parse it all.
        if not _mentions_key(usage):
            return ImagesSummary(count=len(body["data"]), usage=usage if isinstance(usage, dict) else None)
    body = _images_response(orjson.loads(raw))
    usage = body.get("usage")
    return ImagesSummary(count=len(body["data"]), usage=usage if isinstance(usage, dict) else None, body=body)


def skeleton(raw: bytes) -> bytes | None:
    """``raw`` with every ``b64_json`` string value emptied, or None where that is not safe.

    Why the copy parses exactly like the original: in valid JSON, ``"b64_json"`` followed by a
    colon is a key, unless its first quote is escaped (a backslash before it), and then it is the
    end of some other string: such matches are left alone. The value's closing quote is the first
    ``"`` after its opening one when no backslash stands right before that ``"`` (then it cannot be
    escaped); else None, and the caller parses the whole body. Escapes inside the value (``\\/``,
    legal though base64 never needs it) are emptied with it. Other bytes of the value are not
    inspected, because that would cost as much as parsing it: like any proxy, the gateway passes
    base64 through unchecked. (Looking for a backslash anywhere in the value, as this once did,
    was a second pass over the megabytes: ~0.07 ms of CPU per 3.5 MB answer, ``python -m bench.ab --large``.)

    Returns ``raw`` itself (no copy) when there is nothing to empty.
    """
    pieces: list[bytes] = []
    kept = 0  # where the part of `raw` not yet copied starts
    search = 0
    while (key := raw.find(_KEY, search)) >= 0:
        search = key + len(_KEY)
        if key and raw[key - 1] == _BACKSLASH:
            continue
        colon = _skip_whitespace(raw, search)
        if colon >= len(raw) or raw[colon] != _COLON:
            continue  # a value that happens to read "b64_json"
        opening = _skip_whitespace(raw, colon + 1)
        if opening >= len(raw) or raw[opening] != _QUOTE:
            continue  # null or some other small value
        closing = raw.find(b'"', opening + 1)
        if closing < 0 or raw[closing - 1] == _BACKSLASH:
            return None
        pieces.append(raw[kept : opening + 1])
        kept, search = closing, closing + 1
    if not pieces:
        return raw
    pieces.append(raw[kept:])
    return b"".join(pieces)


def _skip_whitespace(raw: bytes, at: int) -> int:
    while at < len(raw) and raw[at] in _WHITESPACE:
        at += 1
    return at


def _images_response(parsed: Any) -> dict[str, Any]:
    if not isinstance(parsed, dict) or not isinstance(parsed.get("data"), list):
        raise ValueError("not an ImagesResponse: an object with a data list")
    return parsed


def _mentions_key(value: Any) -> bool:
    """Whether a (small) parsed value has a ``b64_json`` key at any depth."""
    if isinstance(value, dict):
        return "b64_json" in value or any(_mentions_key(v) for v in value.values())
    if isinstance(value, list):
        return any(_mentions_key(v) for v in value)
    return False
