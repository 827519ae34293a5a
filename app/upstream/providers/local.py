"""The ``local`` upstream: a built-in development backend that draws real images with Pillow.

This is a named, documented backend (SPEC §2), not a fake in disguise. It exists so that
``make run`` plus any OpenAI client works with no account and no network, and so that every test
runs offline against real image bytes. Its output is a deliberate placeholder render: a gradient,
a few shapes and the prompt itself, derived from a hash of the prompt, the ``seed`` parameter and
the image index, so the same request always gives byte-identical images and image i of n differs
from image j.

The drawing is split into pure helpers (``render``, ``encode``) so that edits (painting inside a
mask) and streaming (coarse-to-fine partial images) can reuse them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import math
import random
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from app.core.errors import UpstreamRejected
from app.domain.catalog import parse_size
from app.domain.jobs import ImageJob, ImageResult, ProviderEvent, TokenUsage, event_type
from app.upstream.base import ImageProvider
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.config import KindSettings, ProviderKind, UpstreamSettings, register_kind
from app.upstream.providers.local_edit import edit_size, paint_edit
from app.upstream.providers.local_formats import encode_gif, render_svg, svg_usage

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
RGB = tuple[int, int, int]

ENCODINGS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Formats drawn by local_formats rather than encoded by Pillow from one still.
DRAWN_FORMATS = ("gif", "svg")
DEFAULT_QUALITY = 90
# zlib level 3 is several times faster than the default 6 on gradients and barely larger;
# a development backend should answer fast rather than small.
PNG_COMPRESS_LEVEL = 3


def _rng(prompt: str, seed: int, index: int) -> random.Random:
    """All randomness of one image, from a stable hash (``hash()`` is salted per process)."""
    key = f"{seed}\x00{index}\x00{prompt}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=32).digest(), "big"))


def _colour(rng: random.Random, lo: int = 0, hi: int = 255) -> RGB:
    return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))


def _gradient(width: int, height: int, start: RGB, end: RGB, tilt: float) -> Image.Image:
    """A linear gradient, its direction a mix of vertical and horizontal; cheap at any size."""
    vertical = Image.linear_gradient("L")
    ramp = Image.blend(vertical, vertical.transpose(Image.Transpose.ROTATE_90), tilt)
    mask = ramp.resize((width, height), Image.Resampling.BILINEAR)
    return Image.composite(
        Image.new("RGB", (width, height), end), Image.new("RGB", (width, height), start), mask
    )


@lru_cache(maxsize=32)
def _font(size: int) -> Font:
    """Pillow's bundled font, so rendering needs no font files on the host."""
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: Font, max_width: int, max_lines: int) -> list[str]:
    """The prompt as lines that fit, truncated with an ellipsis rather than overflowing."""
    char_width = max(font.getlength("abcdefghijklmnopqrstuvwxyz") / 26, 1.0)
    columns = max(int(max_width / char_width), 8)
    return textwrap.wrap(text, width=columns, max_lines=max_lines, placeholder=" ...") or [""]


def _draw_shapes(draw: ImageDraw.ImageDraw, rng: random.Random, box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    span = min(right - left, bottom - top)
    if span < 16:  # too small for shapes to mean anything (and for Pillow to draw them)
        return
    for _ in range(rng.randint(3, 5)):
        radius = int(span * rng.uniform(0.08, 0.22))
        # max() keeps tiny canvases drawable instead of raising on an empty range.
        cx = rng.randint(left + radius, max(left + radius, right - radius))
        cy = rng.randint(top + radius, max(top + radius, bottom - radius))
        fill, outline = _colour(rng, 40, 230), _colour(rng, 0, 80)
        width = max(span // 160, 1)
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill, outline, width)
        elif kind == 1:
            draw.rounded_rectangle(
                (cx - radius, cy - radius, cx + radius, cy + radius), radius // 4, fill, outline, width
            )
        else:
            draw.regular_polygon((cx, cy, radius), 3, rng.uniform(0, 120), fill, outline, width)


def _draw_caption(
    draw: ImageDraw.ImageDraw, lines: list[str], font: Font, box: tuple[int, int, int, int]
) -> None:
    """The prompt on an opaque dark band, readable over any palette."""
    left, _, right, bottom = box
    line_height = int(font.getbbox("Ag")[3] * 1.3)
    pad = line_height // 2
    band_top = bottom - pad * 2 - line_height * len(lines)
    draw.rectangle((left, band_top, right, bottom), fill=(20, 20, 28))
    for i, line in enumerate(lines):
        draw.text((left + pad, band_top + pad + i * line_height), line, fill=(245, 245, 245), font=font)


def render(prompt: str, seed: int, index: int, width: int, height: int, transparent: bool) -> Image.Image:
    """One placeholder image, a pure function of its arguments.

    With ``transparent`` the picture is a card inset from the edges: everything outside it has
    alpha 0 and everything drawn is fully opaque, so callers can test real alpha.
    """
    rng = _rng(prompt, seed, index)
    start, end = _colour(rng), _colour(rng)
    background = _gradient(width, height, start, end, rng.random())
    if transparent:
        inset = max(min(width, height) // 16, 1)
        box = (inset, inset, width - inset - 1, height - inset - 1)
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        if box[2] >= box[0] and box[3] >= box[1]:
            card = Image.new("L", (width, height), 0)
            ImageDraw.Draw(card).rounded_rectangle(box, radius=inset, fill=255)
            image.paste(background, (0, 0), card)
    else:
        box = (0, 0, width - 1, height - 1)
        image = background
    draw = ImageDraw.Draw(image)
    font = _font(max(min(width, height) // 28, 10))
    margin = max(min(width, height) // 24, 4)
    inner = (box[0] + margin, box[1] + margin, box[2] - margin, box[3] - margin)
    if inner[2] - inner[0] < 16 or inner[3] - inner[1] < 16:
        return image  # no room for content; the background alone is still a valid image
    lines = _wrap(prompt, font, inner[2] - inner[0] - margin, max_lines=3)
    lines.append(f"local render - seed {seed} - image {index + 1}")
    _draw_shapes(draw, rng, (inner[0], inner[1], inner[2], inner[3] - (inner[3] - inner[1]) // 3))
    _draw_caption(draw, lines, font, inner)
    return image


def encode(image: Image.Image, fmt: str, compression: int | None) -> bytes:
    """The image file bytes; ``compression`` (0-100, the API's ``output_compression``) is the
    JPEG/WebP quality, which is what the OpenAI parameter means for lossy formats."""
    kind = ENCODINGS[fmt]
    buffer = io.BytesIO()
    if kind == "PNG":
        image.save(buffer, kind, compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()
    quality = DEFAULT_QUALITY if compression is None else min(max(compression, 0), 100)
    if kind == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    image.save(buffer, kind, quality=quality)
    return buffer.getvalue()


def _seed(job: ImageJob) -> int:
    value = job.forward.get("seed")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _rejected(message: str, param: str) -> UpstreamRejected:
    return UpstreamRejected(
        400, message, error_type="invalid_request_error", param=param, code="invalid_value"
    )


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to draw for a job, checked once."""

    size: str
    dims: tuple[int, int]
    fmt: str
    transparent: bool
    seed: int

    def settings(self, job: ImageJob) -> dict[str, Any]:
        """The image settings every response and event reports."""
        return {
            "background": "transparent" if self.transparent else "opaque",
            "output_format": self.fmt,
            "quality": job.caps.resolve_quality(job.quality),
            "size": self.size,
        }


def _plan(job: ImageJob) -> _Plan:
    size = job.caps.resolve_size(job.size)
    if job.images:
        size = edit_size((job.images[0].width, job.images[0].height), job.size, size)
    dims = parse_size(size)
    if dims is None:
        raise _rejected(f"The local backend cannot render size {size!r}.", "size")
    fmt = job.output_format
    if fmt not in ENCODINGS and fmt not in DRAWN_FORMATS:
        raise _rejected(f"The local backend cannot encode output_format {fmt!r}.", "output_format")
    # JPEG and GIF have no alpha channel; validation rejects those pairs, but render opaque
    # rather than fail.
    transparent = job.background == "transparent" and fmt not in ("jpeg", "gif")
    return _Plan(size=size, dims=dims, fmt=fmt, transparent=transparent, seed=_seed(job))


def _usage(job: ImageJob, images: int, *, with_prompt: bool = True) -> TokenUsage:
    inputs = len(job.images) + (1 if job.mask is not None else 0)
    edit = job.caps.edit
    return TokenUsage(
        # An estimate of the tokenizer (about four characters per token): no tokenizer runs here.
        text_input=math.ceil(len(job.prompt) / 4) if with_prompt else 0,
        # Inputs are counted once per request, with the prompt, from the catalog's table.
        image_input=edit.input_tokens(job.input_fidelity, inputs) if edit and inputs and with_prompt else 0,
        image_output=job.caps.output_tokens_per_image(job.quality, job.size) * images,
        # The local renderer is itself the authority on what it produced, so this is not an estimate.
        estimated=False,
    )


def _partial_b64(image: Image.Image, step: int, steps: int, fmt: str, compression: int | None) -> str:
    """A coarse-to-fine preview: the final image pixelated, less so at each step."""
    factor = 2 ** (steps - step + 2)
    small = image.resize(
        (max(1, image.width // factor), max(1, image.height // factor)), Image.Resampling.BILINEAR
    )
    preview = small.resize(image.size, Image.Resampling.NEAREST)
    return base64.b64encode(encode(preview, fmt, compression)).decode("ascii")


def _draw(job: ImageJob, plan: _Plan, index: int) -> Image.Image:
    """Image ``index`` of a job: a fresh rendering, or for edits one painted into the input."""
    overlay = render(job.prompt, plan.seed, index, plan.dims[0], plan.dims[1], plan.transparent)
    if not job.images:
        return overlay
    mask = job.mask.path if job.mask is not None else None
    markup = job.markup.path if job.markup is not None else None
    return paint_edit(job.images[0].path, mask, overlay, transparent=plan.transparent, markup_path=markup)


def _draw_b64(job: ImageJob, plan: _Plan, index: int) -> str:
    if plan.fmt == "svg":
        document = _svg_document(job, plan, index)
        return base64.b64encode(document.encode("utf-8")).decode("ascii")
    if plan.fmt == "gif":
        frames = job.frame_count or 9
        duration = job.frame_duration_ms or 200
        return base64.b64encode(encode_gif(_draw(job, plan, index), frames, duration)).decode("ascii")
    return _b64(_draw(job, plan, index), plan.fmt, job.output_compression)


def _svg_document(job: ImageJob, plan: _Plan, index: int) -> str:
    return render_svg(job.prompt, _rng(job.prompt, plan.seed, index), *plan.dims, plan.transparent)


def _b64(image: Image.Image, fmt: str, compression: int | None) -> str:
    return base64.b64encode(encode(image, fmt, compression)).decode("ascii")


class LocalProvider:
    """The ``local`` upstream kind: renders in-process, holds no connections."""

    def __init__(self, name: str = "local", *, stream_pace_s: float = 0.0) -> None:
        self.name = name
        # Pause before each streamed event, so a development stream looks like a real one.
        self._pace_s = stream_pace_s

    async def generate(
        self,
        job: ImageJob,
        *,
        upstream_model: str,  # noqa: ARG002
        call: UpstreamCall = DIRECT,  # noqa: ARG002
    ) -> ImageResult:
        # upstream_model and call are ignored: nothing goes over the network, and the renderer
        # draws alike for every model name it serves.
        plan = _plan(job)
        # Rendering is CPU work: off the event loop, one thread per image (Pillow releases the GIL
        # while encoding, so images of one request overlap).
        images = await asyncio.gather(*(asyncio.to_thread(_draw_b64, job, plan, i) for i in range(job.n)))
        created = int(time.time())
        if job.caps.family != "gpt-image":
            # dall-e answers with created and data only, and reports no usage.
            data: list[dict[str, Any]] = [{"b64_json": b64} for b64 in images]
            if job.caps.family == "dall-e-3":
                for item in data:
                    item["revised_prompt"] = job.prompt
            return ImageResult(body={"created": created, "data": data}, usage=None, raw_usage=None)
        usage = _usage(job, job.n)
        body: dict[str, Any] = {
            "created": created,
            "data": [{"b64_json": b64} for b64 in images],
            **plan.settings(job),
            "usage": usage.to_openai(),
        }
        if job.safety_identifier is not None:
            body["safety_identifier"] = job.safety_identifier
        if plan.fmt == "svg":
            # The author's usage is reported apart from the image's, as the API does (SVG is n=1).
            body["svg_usage"] = svg_usage(job.prompt, base64.b64decode(images[0]).decode("utf-8"), job.svg)
        return ImageResult(body=body, usage=usage, raw_usage=usage.to_openai())

    async def edit(self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT) -> ImageResult:
        """Edits draw like generations, painted into the first input image (see ``local_edit``)."""
        return await self.generate(job, upstream_model=upstream_model, call=call)

    async def stream(
        self,
        job: ImageJob,
        *,
        upstream_model: str,  # noqa: ARG002
        call: UpstreamCall = DIRECT,  # noqa: ARG002
    ) -> AsyncIterator[ProviderEvent]:
        """Per image: ``partial_images`` previews, coarse to fine, then the completed image.

        Each completed event carries that image's usage (the prompt's tokens on the first), so
        the events' usages add up to what ``generate`` reports for the same request.
        """
        plan = _plan(job)
        settings = plan.settings(job)
        partial_type = event_type(job.endpoint, "partial_image")
        completed_type = event_type(job.endpoint, "completed")
        for index in range(job.n):
            image = await asyncio.to_thread(_draw, job, plan, index)
            for step in range(job.partial_images):
                await asyncio.sleep(self._pace_s)
                b64 = await asyncio.to_thread(
                    _partial_b64, image, step, job.partial_images, plan.fmt, job.output_compression
                )
                data = {"type": partial_type, "b64_json": b64, "partial_image_index": step, **settings}
                yield ProviderEvent(type=partial_type, data={**data, "created_at": int(time.time())})
            await asyncio.sleep(self._pace_s)
            b64 = await asyncio.to_thread(_b64, image, plan.fmt, job.output_compression)
            usage = _usage(job, 1, with_prompt=index == 0)
            completed: dict[str, Any] = {
                "type": completed_type,
                "b64_json": b64,
                **settings,
                "created_at": int(time.time()),
                "usage": usage.to_openai(),
            }
            if job.safety_identifier is not None:
                completed["safety_identifier"] = job.safety_identifier
            yield ProviderEvent(type=completed_type, data=completed)

    async def probe(self) -> bool:
        """Always ready: nothing outside this process is involved."""
        return True

    async def aclose(self) -> None:
        """Nothing to release: there is no connection pool."""


class LocalSettings(KindSettings):
    """`local`'s own settings. ``stream_pace_s``: a pause before each streamed event, to mimic a
    real upstream's pace. ``fallback_for``: the models it stands in for when a real upstream
    serving them is configured (``"*"``: every model); empty by default, so it never serves a
    placeholder in place of a configured provider that failed or retired the model (SPEC §2). It
    still serves every model that no active real upstream lists."""

    stream_pace_s: float = Field(default=0.0, ge=0, le=60)
    fallback_for: list[str] = Field(default_factory=list)

    def stands_in_for(self, model: str) -> bool:
        return "*" in self.fallback_for or model in self.fallback_for


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return LocalProvider(upstream.name, stream_pace_s=upstream.options_as(LocalSettings).stream_pace_s)


register_kind(
    ProviderKind(
        name="local",
        build=_build,
        serves="all",
        keyless=True,
        stand_in=True,
        default=True,
        settings=LocalSettings,
    )
)
