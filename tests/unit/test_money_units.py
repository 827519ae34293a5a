"""Issue 15, the pure parts: usage parsing, reservation bounds, JPEG fill bytes, the scrubber."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest

from app.billing.pricing import PARTIAL_IMAGE_OUTPUT_TOKENS, token_cost, worst_case_cost, worst_case_usage
from app.core.errors import InvalidRequestError
from app.domain.catalog import Catalog
from app.domain.jobs import ImageJob, ImageResult, TokenUsage, completed_events, split_usage
from app.images.intake.inspector import _read_jpeg, inspect_image
from app.upstream.errors import sanitize
from tests.conftest import MODELS_FILE

CATALOG = Catalog.from_file(MODELS_FILE)


def job(**changes: object) -> ImageJob:
    caps = CATALOG.get("gpt-image-1")
    assert caps is not None
    base = ImageJob(
        request_id="req_1",
        endpoint="generations",
        model="gpt-image-1",
        caps=caps,
        prompt="q",
        n=1,
        size="1024x1024",
        quality="low",
        background=None,
        output_format="png",
        output_compression=None,
        moderation="auto",
        stream=False,
        partial_images=0,
        response_format="b64_json",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# -- defect 4 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # Only a reasoning count in the output details: all output is image tokens.
        (
            {"input_tokens": 10, "output_tokens": 900, "output_tokens_details": {"reasoning_tokens": 0}},
            (10, 0, 0, 900),
        ),
        # Input details without text_tokens: text is the total minus the image tokens.
        (
            {"input_tokens": 60, "input_tokens_details": {"image_tokens": 20}, "output_tokens": 5},
            (40, 20, 0, 5),
        ),
        # Output details with text only: image is the rest.
        (
            {"input_tokens": 1, "output_tokens": 300, "output_tokens_details": {"text_tokens": 100}},
            (1, 0, 100, 200),
        ),
        # Details adding up to less than the total: the rest is charged as the dearer image output.
        (
            {
                "input_tokens": 1,
                "output_tokens": 300,
                "output_tokens_details": {"text_tokens": 0, "image_tokens": 0},
            },
            (1, 0, 0, 300),
        ),
        # Complete details are taken as they are.
        (
            {
                "input_tokens": 30,
                "input_tokens_details": {"text_tokens": 10, "image_tokens": 20},
                "output_tokens": 300,
                "output_tokens_details": {"text_tokens": 100, "image_tokens": 200},
            },
            (10, 20, 100, 200),
        ),
        # An absurd count is clamped to what the ledger's columns hold, not a failed write.
        ({"input_tokens": 0, "output_tokens": 10**30}, (0, 0, 0, 2**31 - 1)),
    ],
)
def test_missing_usage_details_fall_back_to_the_total_minus_the_known_parts(
    usage: dict[str, object], expected: tuple[int, int, int, int]
) -> None:
    parsed = TokenUsage.from_openai(usage)
    assert (parsed.text_input, parsed.image_input, parsed.text_output, parsed.image_output) == expected


# -- defect 10 -----------------------------------------------------------------------------------------


def test_usage_split_across_events_adds_up_exactly() -> None:
    usage = {
        "input_tokens": 11,
        "input_tokens_details": {"text_tokens": 11, "image_tokens": 0},
        "output_tokens": 817,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 817},
        "total_tokens": 828,
    }
    shares = split_usage(usage, 3)
    assert [s["output_tokens"] for s in shares] == [273, 272, 272]
    assert sum(s["total_tokens"] for s in shares) == 828
    body = {"created": 1, "data": [{"b64_json": "AA=="}] * 3, "usage": usage}
    events = completed_events(job(n=3, stream=True), ImageResult(body=body, raw_usage=usage))
    assert all("usage" in e.data for e in events)
    summed = sum((e.usage or TokenUsage() for e in events), TokenUsage())
    assert summed == TokenUsage.from_openai(usage)


# -- defect 1: reservations bound what the upstream can bill --------------------------------------


def test_reservations_cover_partial_images_free_sizes_inputs_and_the_margin() -> None:
    plain = worst_case_usage(job())
    assert plain.image_output == 272
    streamed = worst_case_usage(job(stream=True, partial_images=3))
    assert streamed.image_output == 272 + 3 * PARTIAL_IMAGE_OUTPUT_TOKENS
    # A size off the table is scaled by its pixels from 1024x1024.
    assert worst_case_usage(job(size="2048x2048")).image_output == 4 * 272
    # Quality auto: the dearest quality.
    assert worst_case_usage(job(quality="auto")).image_output == 4160
    base = worst_case_cost(job())
    assert base == token_cost(job().caps, plain)
    assert worst_case_cost(job(), margin_ppm=250_000) == base + -(-base * 250_000 // 1_000_000)


# -- defect 7 ------------------------------------------------------------------------------------------


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)


def test_jpeg_fill_bytes_are_skipped_in_blocks_and_bounded() -> None:
    data = b"\xff\xd8" + b"\xff" * 2_000_000
    reader = CountingReader(data)
    with pytest.raises(Exception, match="fill bytes|truncated"):
        _read_jpeg(reader, len(data), lambda w, h: None)
    # One byte a time would be two million reads; blocks make it a handful.
    assert reader.reads < 100


def test_a_fake_jpeg_of_fill_bytes_is_a_400(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_bytes(b"\xff\xd8" + b"\xff" * 5_000_000)
    with pytest.raises(InvalidRequestError) as raised:
        inspect_image(path)
    assert raised.value.code == "invalid_image"


def test_real_jpegs_with_some_fill_bytes_still_pass(tmp_path: Path) -> None:
    from tests.fakes import image_files

    data = image_files.jpeg(40, 30)
    # Add fill bytes before the second marker (legal: any number of 0xFF may precede a marker).
    padded = data[:2] + b"\xff" * 1000 + data[2:]
    path = tmp_path / "padded.jpg"
    path.write_bytes(padded)
    info = inspect_image(path)
    assert (info.width, info.height, info.format) == (40, 30, "jpeg")


# -- defect 9 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fragment", ["sk-upstr***3456", "sk-...3456", "sk-proj-****", "sk-ab", "sk-abcdefgh1234567890"]
)
def test_masked_and_short_key_fragments_are_scrubbed(fragment: str) -> None:
    cleaned = sanitize(f"Incorrect API key provided: {fragment}. Try again.", secrets=())
    assert fragment not in cleaned and "sk-***" in cleaned


def test_words_containing_sk_are_left_alone() -> None:
    assert sanitize("task-1 hit disk-full", secrets=()) == "task-1 hit disk-full"
