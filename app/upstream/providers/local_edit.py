"""Edits for the ``local`` development backend: the prompt's rendering painted into the first image.

Where a mask is given, only its transparent area is repainted (as the API defines masks); without
one, the rendering is blended over the whole image. Inputs were inspected before this runs, so
their size is bounded (the uploads' pixel limit) and decoding them here is safe.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

# Without a mask the whole image is edited; half-and-half keeps the input recognisable.
BLEND = 0.5


def paint_edit(
    base_path: Path,
    mask_path: Path | None,
    overlay: Image.Image,
    *,
    transparent: bool,
    markup_path: Path | None = None,
) -> Image.Image:
    """``overlay`` (already at the output size) painted into the first input image; a markup (a
    transparent PNG of the first image's size) is first laid over that image, as its guide."""
    size = overlay.size
    with Image.open(base_path) as opened:
        base = opened.convert("RGBA")
    if markup_path is not None:
        with Image.open(markup_path) as opened:
            guide = opened.convert("RGBA").resize(base.size, Image.Resampling.NEAREST)
        base = Image.alpha_composite(base, guide)
    base = base.resize(size, Image.Resampling.LANCZOS)
    layer = overlay.convert("RGBA")
    if mask_path is not None:
        with Image.open(mask_path) as opened:
            alpha = opened.convert("RGBA").getchannel("A").resize(size, Image.Resampling.NEAREST)
        # Transparent mask pixels (alpha 0) mark the area to edit: invert alpha into a paste mask.
        edited = Image.composite(layer, base, ImageOps.invert(alpha))
    else:
        edited = Image.blend(base, layer, BLEND)
    return edited if transparent else edited.convert("RGB")


def edit_size(first: tuple[int, int], requested: str, resolved: str) -> str:
    """``auto`` keeps the first image's size when it is a sensible output size."""
    if requested == "auto" and max(first) <= 2048 and min(first) >= 64:
        return f"{first[0]}x{first[1]}"
    return resolved
