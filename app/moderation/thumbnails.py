"""Edit inputs made small before an upstream moderation model sees them.

An edit may carry 16 images of up to 50 MB each. Sending them whole to a moderation model would hold
each file (and its base64, a third larger) in memory and upload it, while such models judge images
at well under 1,024 pixels a side. Each file is decoded once, shrunk to ``max_edge`` (JPEG files are
decoded at reduced scale straight away), and sent as PNG; the audit keeps the original's hash,
streamed from disk, so a blocked file can still be matched to what the client sent.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MAX_EDGE = 1024
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Thumbnail:
    data: bytes  # PNG, at most ``max_edge`` a side
    original_sha256: str


def thumbnail(path: Path, *, max_edge: int = MAX_EDGE) -> Thumbnail:
    """Blocking (file reads and decoding): run it off the event loop."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    with Image.open(path) as image:
        # The edit endpoint has already bounded the pixel count (app/images/intake/inspector.py), so the
        # decode below cannot be a bomb; draft() lets JPEG skip most of it.
        image.draft("RGB", (max_edge, max_edge))
        image.thumbnail((max_edge, max_edge))
        small = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGBA")
        out = io.BytesIO()
        small.save(out, format="PNG", compress_level=1)
    return Thumbnail(data=out.getvalue(), original_sha256=digest.hexdigest())
