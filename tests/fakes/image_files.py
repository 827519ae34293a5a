"""Image files for upload tests: real encodings from Pillow, and hand-built broken or hostile ones.

Hand-built PNGs (pixel bombs, padded files) are assembled chunk by chunk with valid CRCs, so the
only thing wrong with them is the property under test.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png(width: int = 64, height: int = 48, *, mode: str = "RGB") -> bytes:
    """A PNG in any Pillow mode ("RGB", "RGBA", "L", "LA", "P", "1")."""
    colour: object = {"RGB": (10, 120, 200), "RGBA": (10, 120, 200, 128), "LA": (90, 128)}.get(mode, 90)
    return encode(Image.new(mode, (width, height), colour), "PNG")  # type: ignore[arg-type]


def palette_png_with_transparency(width: int = 32, height: int = 32) -> bytes:
    """A palette PNG whose colour 0 is transparent: alpha via a tRNS chunk, not via the colour type."""
    image = Image.new("P", (width, height), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 - 2) * 3)
    return encode(image, "PNG", transparency=0)


def rgb_png_with_trns(width: int = 16, height: int = 16) -> bytes:
    """A truecolour PNG with a tRNS colour key."""
    return encode(Image.new("RGB", (width, height), (1, 2, 3)), "PNG", transparency=(1, 2, 3))


def jpeg(width: int = 64, height: int = 48, *, progressive: bool = False) -> bytes:
    return encode(
        Image.new("RGB", (width, height), (200, 30, 30)), "JPEG", quality=80, progressive=progressive
    )


def webp(width: int = 64, height: int = 48, *, alpha: bool = False, lossless: bool = False) -> bytes:
    """Lossy without alpha is a simple "VP8 " file; lossless is "VP8L"; lossy with alpha is "VP8X"."""
    mode = "RGBA" if alpha else "RGB"
    image = Image.new(mode, (width, height), (30, 200, 30, 100) if alpha else (30, 200, 30))
    return encode(image, "WEBP", lossless=lossless, quality=80)


def gif(width: int = 16, height: int = 16) -> bytes:
    return encode(Image.new("P", (width, height), 1), "GIF")


def mask(width: int = 64, height: int = 48, *, alpha: bool = True) -> bytes:
    """A mask PNG: transparent where the edit goes (RGBA), or a plain RGB image when ``alpha=False``."""
    if not alpha:
        return png(width, height, mode="RGB")
    image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, width // 2, height // 2))
    return encode(image, "PNG")


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` fraction of a file, as an interrupted upload leaves it."""
    return data[: max(1, int(len(data) * keep))]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose header declares a huge 1-bit greyscale image.

    The IDAT holds a little deflate data, as a bomb would before its zeros; whoever checks the
    header refuses it, whoever decodes it allocates width*height/8 bytes per pass.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is patched to declare another size."""
    data = bytearray(jpeg(16, 16))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def padded_png(total_bytes: int, width: int = 8, height: int = 8) -> bytes:
    """A valid PNG grown to about ``total_bytes`` by private ancillary chunks (which decoders skip)."""
    base = png(width, height)
    head, tail = base[:-12], base[-12:]  # the IEND chunk is the last 12 bytes
    pad = b""
    missing = total_bytes - len(base)
    block = b"\x00" * (1024 * 1024)
    while missing > 12:
        size = min(len(block), missing - 12)
        pad += png_chunk(b"prVt", block[:size])
        missing -= size + 12
    return head + pad + tail


def big_bytes(size: int, fill: int = 0x41) -> bytes:
    """Arbitrary content of a given size (not an image), for byte-limit tests."""
    return bytes([fill]) * size


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
