"""The local development backend draws real, deterministic images and reports catalog usage."""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from app.domain.catalog import Catalog
from app.domain.jobs import ImageJob, ImageResult
from app.upstream.providers.local import LocalProvider, encode, render

CATALOG = Catalog.from_file(Path(__file__).resolve().parents[2] / "app" / "defaults" / "models.yaml")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def make_job(
    *,
    model: str = "gpt-image-1",
    prompt: str = "a red fox in the snow",
    n: int = 1,
    size: str = "1024x1024",
    quality: str = "auto",
    background: str | None = None,
    output_format: str = "png",
    output_compression: int | None = None,
    forward: Mapping[str, Any] | None = None,
) -> ImageJob:
    caps = CATALOG.get(model)
    assert caps is not None
    return ImageJob(
        request_id="req_test",
        endpoint="generations",
        model=model,
        caps=caps,
        prompt=prompt,
        n=n,
        size=size,
        quality=quality,
        background=background,
        output_format=output_format,
        output_compression=output_compression,
        moderation="auto",
        stream=False,
        partial_images=0,
        response_format="b64_json",
        forward=forward or {},
    )


async def run(job: ImageJob) -> ImageResult:
    provider = LocalProvider()
    try:
        return await provider.generate(job, upstream_model=job.model)
    finally:
        await provider.aclose()


def raw_images(result: ImageResult) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in result.body["data"]]


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_provider_has_a_name() -> None:
    assert LocalProvider().name == "local"
    assert LocalProvider("dev").name == "dev"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("size", ["1024x1024", "1536x1024", "1024x1536"])
async def test_renders_exact_size_and_format(fmt: str, size: str) -> None:
    result = await run(make_job(size=size, output_format=fmt))
    [data] = raw_images(result)
    image = decode(data)
    assert image.format == PIL_FORMATS[fmt]
    assert f"{image.width}x{image.height}" == size
    assert result.body["output_format"] == fmt
    assert result.body["size"] == size


async def test_auto_size_renders_the_first_concrete_size() -> None:
    result = await run(make_job(size="auto"))
    [data] = raw_images(result)
    assert decode(data).size == (1024, 1024)
    assert result.body["size"] == "1024x1024"


@pytest.mark.parametrize("fmt", ["png", "webp"])
async def test_transparent_background_has_real_alpha(fmt: str) -> None:
    result = await run(make_job(background="transparent", output_format=fmt))
    image = decode(raw_images(result)[0])
    assert "A" in image.getbands()
    rgba = image.convert("RGBA")
    w, h = rgba.size
    alpha = rgba.getchannel("A")
    for corner in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)]:
        assert alpha.getpixel(corner) == 0
    low, high = alpha.getextrema()
    assert (low, high) == (0, 255)  # content is drawn opaque, not merely translucent
    assert result.body["background"] == "transparent"


async def test_opaque_png_has_no_transparent_pixels() -> None:
    result = await run(make_job(background="opaque"))
    image = decode(raw_images(result)[0])
    assert image.mode == "RGB"
    assert image.convert("RGBA").getchannel("A").getextrema() == (255, 255)
    assert result.body["background"] == "opaque"


async def test_transparent_jpeg_does_not_crash_and_renders_opaque() -> None:
    result = await run(make_job(background="transparent", output_format="jpeg"))
    image = decode(raw_images(result)[0])
    assert image.mode == "RGB"


async def test_n_images_are_distinct() -> None:
    result = await run(make_job(n=3))
    images = raw_images(result)
    assert len(images) == 3
    assert len(set(images)) == 3
    assert result.image_count == 3


async def test_same_inputs_give_identical_bytes() -> None:
    job = make_job(n=2, forward={"seed": 7})
    assert raw_images(await run(job)) == raw_images(await run(job))


async def test_different_prompt_gives_different_image() -> None:
    first = raw_images(await run(make_job(prompt="a red fox")))
    second = raw_images(await run(make_job(prompt="a blue whale")))
    assert first != second


async def test_different_seed_gives_different_image() -> None:
    first = raw_images(await run(make_job(forward={"seed": 1})))
    second = raw_images(await run(make_job(forward={"seed": 2})))
    assert first != second


async def test_non_integer_seed_is_ignored() -> None:
    assert raw_images(await run(make_job(forward={"seed": "x"}))) == raw_images(await run(make_job()))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
async def test_output_compression_sets_quality(fmt: str) -> None:
    small = raw_images(await run(make_job(output_format=fmt, output_compression=10)))[0]
    large = raw_images(await run(make_job(output_format=fmt, output_compression=95)))[0]
    assert len(small) < len(large)


async def test_gpt_image_usage_comes_from_the_catalog() -> None:
    prompt = "a lighthouse on a cliff at dusk, oil painting"  # 45 characters
    result = await run(make_job(prompt=prompt, quality="high", size="1024x1536", n=2))
    usage = result.usage
    assert usage is not None
    assert usage.image_output == 2 * 6240
    assert usage.text_input == math.ceil(len(prompt) / 4) == 12
    assert usage.image_input == 0
    assert usage.text_output == 0
    assert usage.estimated is False
    assert result.raw_usage == usage.to_openai()
    assert result.body["usage"] == usage.to_openai()
    assert result.body["usage"]["output_tokens"] == 12480
    assert result.body["quality"] == "high"


async def test_auto_quality_is_reported_as_medium() -> None:
    result = await run(make_job(quality="auto"))
    assert result.body["quality"] == "medium"
    assert result.usage is not None
    assert result.usage.image_output == 1056


async def test_body_is_images_response_shaped() -> None:
    before = int(time.time())
    result = await run(make_job())
    assert set(result.body) == {"created", "data", "background", "output_format", "quality", "size", "usage"}
    assert before <= result.body["created"] <= int(time.time())
    assert set(result.body["data"][0]) == {"b64_json"}


async def test_dall_e_3_has_no_usage_and_a_revised_prompt() -> None:
    result = await run(make_job(model="dall-e-3", prompt="a cat", quality="standard"))
    assert result.usage is None
    assert result.raw_usage is None
    assert set(result.body) == {"created", "data"}
    [item] = result.body["data"]
    assert item["revised_prompt"] == "a cat"
    assert decode(base64.b64decode(item["b64_json"])).size == (1024, 1024)


async def test_dall_e_2_has_no_usage_and_no_revised_prompt() -> None:
    result = await run(make_job(model="dall-e-2", size="256x256", quality="standard", n=2))
    assert result.usage is None
    assert set(result.body) == {"created", "data"}
    assert all(set(item) == {"b64_json"} for item in result.body["data"])
    assert all(decode(data).size == (256, 256) for data in raw_images(result))


def test_render_is_pure_and_index_dependent() -> None:
    first = render("prompt", 3, 0, 320, 240, False)
    again = render("prompt", 3, 0, 320, 240, False)
    other = render("prompt", 3, 1, 320, 240, False)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    assert first.size == (320, 240)


@pytest.mark.parametrize("size", [(1, 1), (8, 30), (64, 64)])
@pytest.mark.parametrize("transparent", [False, True])
def test_tiny_canvases_do_not_crash(size: tuple[int, int], transparent: bool) -> None:
    image = render("a very long prompt " * 50, 0, 0, *size, transparent)
    assert decode(encode(image, "png", None)).size == size


def test_unicode_and_empty_prompts_render() -> None:
    for prompt in ["", "猫と犬 🐱🐶", "line one\nline two\ttabbed"]:
        assert render(prompt, 0, 0, 256, 256, False).size == (256, 256)
