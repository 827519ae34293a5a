"""Reading a batch input file: the structural checks OpenAI makes before a batch starts.

The file is read line by line from its chunks (never whole): a line that is not a JSON object,
lacks a string ``custom_id``, repeats one, has a ``method`` other than POST, a ``url`` other than
the batch's endpoint, or no object ``body`` is an error with its 1-based line number. Any such
error fails the whole batch in ``validating``; whether each body is a valid *request* is decided
later, line by line, by the gateway's one admission path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
ENDPOINTS = (GENERATIONS, EDITS)
MAX_CUSTOM_ID = 512


@dataclass(frozen=True, slots=True)
class ParsedLine:
    line: int
    custom_id: str
    body: dict[str, Any]


@dataclass(slots=True)
class Validation:
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    lines: int = 0


def _error(line: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


async def split_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """Numbered lines of a chunked file (blank lines keep their numbers and are skipped)."""
    rest = b""
    number = 0
    async for chunk in chunks:
        rest += chunk
        *complete, rest = rest.split(b"\n")
        for raw in complete:
            number += 1
            if raw.strip():
                yield number, raw
    if rest.strip():
        yield number + 1, rest


def check_line(number: int, raw: bytes, endpoint: str, seen: set[str]) -> ParsedLine | dict[str, Any]:
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(number, "invalid_json_line", "This line is not parseable as valid JSON.")
    if not isinstance(item, dict):
        return _error(number, "invalid_json_line", "This line is not a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return _error(
            number,
            "invalid_custom_id",
            "Each line needs a custom_id string of 1 to 512 characters.",
            "custom_id",
        )
    if custom_id in seen:
        return _error(
            number,
            "duplicate_custom_id",
            f"The custom_id '{custom_id[:64]}' is used by an earlier line; each must be unique.",
            "custom_id",
        )
    if item.get("method") != "POST":
        return _error(number, "invalid_method", "The method must be POST.", "method")
    url = item.get("url")
    if url != endpoint:
        message = (
            f"The url '{str(url)[:64]}' does not match the batch's endpoint '{endpoint}'; a batch "
            "runs one endpoint."
            if isinstance(url, str) and url in ENDPOINTS
            else f"The url must be the batch's endpoint '{endpoint}'."
        )
        return _error(number, "invalid_url", message, "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return _error(number, "invalid_body", "The body must be a JSON object.", "body")
    seen.add(custom_id)
    return ParsedLine(line=number, custom_id=custom_id, body=body)


async def validate_file(chunks: AsyncIterator[bytes], endpoint: str, *, max_errors: int) -> Validation:
    """Check every line; keep the first ``max_errors`` errors (all are counted). Only the custom ids
    are kept in memory (for the duplicate check), never the bodies."""
    result = Validation()
    seen: set[str] = set()
    async for number, raw in split_lines(chunks):
        checked = check_line(number, raw, endpoint, seen)
        if isinstance(checked, ParsedLine):
            result.lines += 1
            continue
        result.error_count += 1
        if len(result.errors) < max_errors:
            result.errors.append(checked)
    if not result.lines and not result.error_count:
        result.errors.append(
            {"code": "empty_file", "line": None, "message": "The input file has no requests.", "param": None}
        )
        result.error_count = 1
    return result


async def parsed_lines(chunks: AsyncIterator[bytes], endpoint: str) -> AsyncIterator[ParsedLine]:
    """The lines of a file that ``validate_file`` found valid, read again from the store."""
    seen: set[str] = set()
    async for number, raw in split_lines(chunks):
        checked = check_line(number, raw, endpoint, seen)
        if isinstance(checked, ParsedLine):
            yield checked
