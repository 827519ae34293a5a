"""GIF and SVG output for the ``local`` development backend.

GIF: the placeholder rendering animated: each frame draws a marker a step further along the
image, so frames differ (Pillow would merge identical ones) and the result plays visibly; the
delay of every frame is the request's ``frame_duration_ms``, which GIF stores in centiseconds.

SVG: a well-formed document of the asked size (gradient, shapes and the prompt as text, all
escaped), and the ``svg_usage`` an SVG author would report: input tokens from the prompt, output
tokens from the document's length, reasoning tokens by effort (about four characters a token,
as the rest of the backend estimates; no tokenizer runs here).
"""

from __future__ import annotations

import io
import math
import random
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from PIL import Image, ImageDraw

# Reasoning tokens the local "author" reports per effort: a deterministic, plausible ramp.
_REASONING = {"none": 0, "minimal": 16, "low": 64, "medium": 256, "high": 1024, "xhigh": 2048, "max": 4096}
DEFAULT_SVG_AUTHOR = "local-svg"


def encode_gif(base: Image.Image, frames: int, duration_ms: int) -> bytes:
    """An animated GIF of ``frames`` frames, each shown ``duration_ms`` (rounded to 10 ms)."""
    rgb = base.convert("RGB")
    width, height = rgb.size
    radius = max(min(width, height) // 24, 2)
    sequence: list[Image.Image] = []
    for index in range(frames):
        frame = rgb.copy()
        x = radius + (width - 2 * radius) * index // max(frames - 1, 1)
        ImageDraw.Draw(frame).ellipse(
            (x - radius, radius, x + radius, 3 * radius), fill=(255, 255, 255), outline=(0, 0, 0)
        )
        sequence.append(frame.quantize(colors=128, method=Image.Quantize.MEDIANCUT))
    buffer = io.BytesIO()
    sequence[0].save(
        buffer,
        "GIF",
        save_all=True,
        append_images=sequence[1:],
        duration=max(10, round(duration_ms / 10) * 10),
        loop=0,
        optimize=False,
        disposal=1,
    )
    return buffer.getvalue()


def render_svg(prompt: str, rng: random.Random, width: int, height: int, transparent: bool) -> str:
    """A standalone SVG document, ``width`` x ``height`` user units and pixels."""
    start, end = (f"#{rng.randrange(0x1000000):06x}" for _ in range(2))
    shapes: list[str] = []
    span = min(width, height)
    for _ in range(rng.randint(3, 5)):
        r = int(span * rng.uniform(0.08, 0.22))
        cx, cy = rng.randint(r, max(r, width - r)), rng.randint(r, max(r, height - r))
        fill = f"#{rng.randrange(0x1000000):06x}"
        shapes.append(f'<circle cx="{cx}" cy="{cy}" r="{r}" fill="{fill}" stroke="#202020"/>')
    font = max(span // 28, 10)
    text = escape(prompt[:200])
    background = "" if transparent else '<rect width="100%" height="100%" fill="url(#bg)"/>'
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
        f'<defs><linearGradient id="bg" x1="0" y1="0" x2="1" y2="1">'
        f'<stop offset="0" stop-color="{start}"/><stop offset="1" stop-color="{end}"/>'
        f"</linearGradient></defs>{background}{''.join(shapes)}"
        f'<text x="{font}" y="{height - font}" font-family="sans-serif" font-size="{font}" '
        f'fill="#f5f5f5">{text}</text>'
        f"<desc>{escape('local render')}</desc><title>{escape(prompt[:80])}</title>"
        f"<metadata>{quoteattr(prompt[:80])[1:-1]}</metadata></svg>\n"
    )


def svg_usage(prompt: str, document: str, svg: Any) -> dict[str, Any]:
    """What the SVG author used, in the shape of the API's ``svg_usage``."""
    options = svg if isinstance(svg, dict) else {}
    reasoning = options.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    reasoning_tokens = _REASONING.get(str(effort or "medium"), 256)
    input_tokens = math.ceil(len(prompt) / 4) + 85  # the prompt plus the reference image's summary
    output_tokens = math.ceil(len(document) / 4) + reasoning_tokens
    return {
        "model": str(options.get("model") or DEFAULT_SVG_AUTHOR),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "reasoning_tokens": reasoning_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
