"""Pillow helpers for the test fakes: real, decodable images of a requested size and format.

Rendering is cached per (width, height, format, transparent, variant, noise), so a test suite that asks
for many 1024x1024 (or larger) images pays the encoding cost once.
"""

from __future__ import annotations

import base64
import io
import random
from functools import lru_cache

from PIL import Image, ImageDraw

DEFAULT_SIZE = (1024, 1024)
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


def parse_size(size: object, default: tuple[int, int] = DEFAULT_SIZE) -> tuple[int, int]:
    """`"WxH"` -> (W, H); `None`, `""`, `"auto"` or anything unparsable -> `default`."""
    if not isinstance(size, str) or "x" not in size.lower():
        return default
    width, _, height = size.lower().partition("x")
    try:
        w, h = int(width), int(height)
    except ValueError:
        return default
    return (w, h) if w > 0 and h > 0 else default


def size_str(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@lru_cache(maxsize=128)
def render_image(
    width: int,
    height: int,
    output_format: str = "png",
    transparent: bool = False,
    variant: int = 0,
    noise: bool = False,
) -> bytes:
    """Encode an image. `variant` changes the colours (e.g. per partial image); `noise=True` fills it with
    seeded random pixels so the encoded payload is as big as the size allows (to exercise huge events)."""
    fmt = PIL_FORMATS.get(output_format.lower(), "PNG")
    alpha = transparent and fmt in {"PNG", "WEBP"}
    mode = "RGBA" if alpha else "RGB"
    if noise:
        channels = 4 if alpha else 3
        image = Image.frombytes(
            mode, (width, height), random.Random(variant).randbytes(width * height * channels)
        )
    else:
        colour = ((40 + 70 * variant) % 256, (90 + 50 * variant) % 256, (160 + 30 * variant) % 256)
        image = Image.new(mode, (width, height), (*colour, 0) if alpha else colour)
        draw = ImageDraw.Draw(image)
        box = (
            width // 4,
            height // 4,
            max(width // 4, 3 * width // 4 - 1),
            max(height // 4, 3 * height // 4 - 1),
        )
        draw.rectangle(box, fill=(255, 255, 255, 255) if alpha else (255, 255, 255))
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "JPEG":
        image.save(buf, format="JPEG", quality=85)
    elif fmt == "WEBP":
        image.save(buf, format="WEBP", quality=80, method=0)
    else:
        image.convert("P").save(buf, format=fmt)
    return buf.getvalue()


@lru_cache(maxsize=128)
def render_b64(
    width: int,
    height: int,
    output_format: str = "png",
    transparent: bool = False,
    variant: int = 0,
    noise: bool = False,
) -> str:
    return base64.b64encode(render_image(width, height, output_format, transparent, variant, noise)).decode()


def image_size_of(data: bytes) -> tuple[int, int] | None:
    """The (width, height) of encoded image bytes, or None when Pillow cannot read them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


def decode_b64_image(b64: str) -> Image.Image:
    """Decode a `b64_json` payload into a loaded Pillow image (for assertions in tests)."""
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


@lru_cache(maxsize=32)
def render_gif(width: int, height: int, frames: int, duration_ms: int, variant: int = 0) -> bytes:
    """An animated GIF: `frames` frames of distinct colours, each shown `duration_ms`."""
    images = [
        Image.new("RGB", (width, height), ((40 + 30 * i + variant) % 256, (200 - 10 * i) % 256, 90)).convert(
            "P"
        )
        for i in range(frames)
    ]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def render_svg(width: int, height: int, variant: int = 0) -> bytes:
    """A minimal well-formed SVG document of the given size."""
    colour = f"#{(0x336699 + 0x101010 * variant) & 0xFFFFFF:06x}"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><rect width="{width}" height="{height}" fill="{colour}"/>'
        f'<circle cx="{width // 2}" cy="{height // 2}" r="{min(width, height) // 4}" fill="#ffffff"/></svg>'
    ).encode()
