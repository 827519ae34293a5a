"""The batch input file's structural checks (app/batches/lines.py), fed in awkward chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson

from app.batches.lines import EDITS, GENERATIONS, parsed_lines, validate_file

GOOD = {"custom_id": "a", "method": "POST", "url": GENERATIONS, "body": {"prompt": "x"}}


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def check(
    data: bytes, size: int = 7, endpoint: str = GENERATIONS
) -> tuple[list[tuple[int | None, str]], int]:
    result = asyncio.run(validate_file(chunked(data, size), endpoint, max_errors=3))
    return [(e["line"], e["code"]) for e in result.errors], result.lines


def test_line_numbers_survive_chunking_blank_lines_and_crlf() -> None:
    lines = [
        orjson.dumps(GOOD),
        b"",
        orjson.dumps({**GOOD, "custom_id": "b"}) + b"\r",
        b"[1, 2]",
        orjson.dumps({**GOOD, "custom_id": "c"}),  # no final newline
    ]
    for size in (1, 5, 64, 10_000):
        assert check(b"\n".join(lines), size) == ([(4, "invalid_json_line")], 3)


def test_each_structural_error_is_named_and_only_the_first_ones_are_kept() -> None:
    lines = [
        orjson.dumps({**GOOD, "custom_id": ""}),
        orjson.dumps({**GOOD, "method": "PUT"}),
        orjson.dumps({**GOOD, "url": EDITS}),
        orjson.dumps({**GOOD, "body": "x"}),
    ]
    errors, valid = check(b"\n".join(lines))
    assert errors == [(1, "invalid_custom_id"), (2, "invalid_method"), (3, "invalid_url")] and valid == 0


def test_an_empty_file_is_an_error_without_a_line() -> None:
    assert check(b"\n \n") == ([(None, "empty_file")], 0)


def test_the_second_read_yields_the_valid_lines_with_their_numbers() -> None:
    data = b"\n".join([orjson.dumps(GOOD), b"", orjson.dumps({**GOOD, "custom_id": "z"})])

    async def collect() -> list[tuple[int, str]]:
        return [(p.line, p.custom_id) async for p in parsed_lines(chunked(data, 3), GENERATIONS)]

    assert asyncio.run(collect()) == [(1, "a"), (3, "z")]
