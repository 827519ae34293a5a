"""What an uploaded image really is: type from the magic bytes, size and alpha from the headers.

Nothing is decoded. Each format's structure is walked with bounded reads, so memory does not
depend on the file size and a decompression bomb is refused from its header alone:

- PNG: IHDR first, every chunk's CRC checked in 64 KiB blocks, up to IEND (truncation is caught);
  alpha from the colour type (grey+alpha, RGBA) or a tRNS chunk before the image data.
- JPEG: marker segments up to the first SOS (size from the SOF), then the end-of-image marker must
  follow. Bytes after it (camera trailers, motion photos) are allowed.
- WebP: the RIFF size must fit in the file and the chunks must tile it; size and alpha from the
  VP8 / VP8L / VP8X header.

These parsers are hand-written because Pillow's lazy ``Image.open`` reads a whole WebP file into
memory, its PNG ``verify()`` holds each chunk whole (one IDAT may be 50 MB), and its bomb check is
a process-global setting that warns rather than raises. The functions are blocking: call them
through ``asyncio.to_thread``.

Errors are ``InvalidRequestError`` (400) with ``param`` set to the part (``image`` or ``mask``):

    code                          when
    invalid_image_format          the bytes are not PNG, JPEG or WebP, or the format is not allowed here
    invalid_image                 empty, truncated or structurally corrupt
    image_too_large               more than ``max_pixels`` pixels or an edge over ``max_edge``
    invalid_mask                  (edit checks) the mask has no alpha channel or not the first image's size
    invalid_markup                (edit checks) the same for the markup (it needs transparent pixels)
    invalid_value                 (edit checks) a non-square image for a square-only model; a mask for a
                                  model without masks
    too_many_images               (edit checks) more images than the model accepts
    missing_required_parameter    (edit checks) no image
    payload_too_large (413)       (edit checks) a file over the model's byte limit or the 4 MB mask (and
                                  markup) limit
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from app.core.errors import InvalidRequestError, PayloadTooLargeError
from app.domain.catalog import EditCaps

ImageFormat = Literal["png", "jpeg", "webp"]
FORMATS: tuple[ImageFormat, ...] = ("png", "jpeg", "webp")
_NAMES: dict[ImageFormat, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP"}

# 50 MP covers the full-resolution output of mainstream cameras; decoding it as RGBA already costs
# 200 MB, which is the most one request may make the local backend allocate. Upstreams downscale
# inputs far below this anyway, so more pixels buy nothing.
DEFAULT_MAX_PIXELS = 50_000_000
# Just above WebP's own 16,383 limit; also the texture limit of common GPUs and browsers.
DEFAULT_MAX_EDGE = 16_384
MASK_MAX_BYTES = 4 * 1024 * 1024

_BLOCK = 64 * 1024
# A real PNG or WebP has at most thousands of chunks; a crafted one of 12-byte chunks would make a
# 50 MB walk take millions of iterations.
_MAX_CHUNKS = 100_000
# Fill bytes before one JPEG marker; encoders write a handful at most.
_MAX_FILL = 64 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> allowed bit depths (PNG spec table 11.1)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_OTHER_TYPES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
)

Guard = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the headers say about one uploaded image."""

    format: ImageFormat
    width: int
    height: int
    has_alpha: bool
    size: int  # bytes


class _Corrupt(Exception):
    """Internal: the reason a file is not a valid image of its format."""


def sniff_format(head: bytes) -> ImageFormat | None:
    """The format from the first 12 bytes, or None."""
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _cut_signature(head: bytes) -> ImageFormat | None:
    """A file too short to hold a whole signature but starting like one (reported as truncated)."""
    if len(head) >= 12:
        return None
    signatures: tuple[tuple[ImageFormat, bytes], ...] = (
        ("png", _PNG_SIGNATURE),
        ("jpeg", b"\xff\xd8\xff"),
        ("webp", b"RIFF"),
    )
    for fmt, magic in signatures:
        if magic.startswith(head[: len(magic)]):
            return fmt
    return None


def _describe(head: bytes) -> str:
    for magic, name in _OTHER_TYPES:
        if head.startswith(magic):
            return f"a {name} file"
    if head[4:8] == b"ftyp":
        return "an ISO media file (HEIC/AVIF/MP4)"
    return "not an image in a supported format"


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _Corrupt("the file is truncated")
    return data


def _read_png(fh: BinaryIO, size: int, guard: Guard) -> tuple[int, int, bool]:
    fh.seek(len(_PNG_SIGNATURE))
    length, kind = struct.unpack(">I4s", _read_exact(fh, 8))
    if kind != b"IHDR" or length != 13:
        raise _Corrupt("the IHDR chunk must come first")
    ihdr = _read_exact(fh, 13)
    if zlib.crc32(ihdr, zlib.crc32(kind)) != struct.unpack(">I", _read_exact(fh, 4))[0]:
        raise _Corrupt("the IHDR chunk fails its checksum")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", ihdr)
    if not (0 < width < 2**31 and 0 < height < 2**31) or depth not in _PNG_DEPTHS.get(colour, ()):
        raise _Corrupt("the IHDR chunk is invalid")
    if compression or filtering or interlace > 1:
        raise _Corrupt("the IHDR chunk is invalid")
    guard(width, height)
    alpha = colour in (4, 6)
    seen_data = False
    for _ in range(_MAX_CHUNKS):
        length, kind = struct.unpack(">I4s", _read_exact(fh, 8))
        if length >= 2**31 or not kind.isalpha():
            raise _Corrupt("a chunk header is invalid")
        if fh.tell() + length + 4 > size:
            raise _Corrupt("the file is truncated")
        crc = zlib.crc32(kind)
        remaining = length
        while remaining:
            block = _read_exact(fh, min(_BLOCK, remaining))
            crc = zlib.crc32(block, crc)
            remaining -= len(block)
        if crc != struct.unpack(">I", _read_exact(fh, 4))[0]:
            raise _Corrupt(f"the {kind.decode('ascii')} chunk fails its checksum")
        if kind == b"tRNS" and not seen_data:
            alpha = True
        elif kind == b"IDAT":
            seen_data = True
        elif kind == b"IEND":
            if not seen_data:
                raise _Corrupt("there is no image data")
            return width, height, alpha
    raise _Corrupt("too many chunks")


def _read_jpeg(fh: BinaryIO, size: int, guard: Guard) -> tuple[int, int, bool]:
    fh.seek(2)
    dimensions: tuple[int, int] | None = None
    for _ in range(_MAX_CHUNKS):
        if _read_exact(fh, 1) != b"\xff":
            raise _Corrupt("a marker is missing")
        marker = _marker_after_fill(fh)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # standalone markers carry no length
        if marker in (0xD8, 0xD9):
            raise _Corrupt("the image data is missing")
        (length,) = struct.unpack(">H", _read_exact(fh, 2))
        if length < 2 or fh.tell() + length - 2 > size:
            raise _Corrupt("the file is truncated")
        if marker in _JPEG_SOF:
            if length < 8:
                raise _Corrupt("the frame header is invalid")
            height, width = struct.unpack(">xHH", _read_exact(fh, 5))
            if not width or not height:
                raise _Corrupt("the frame header declares no size")
            guard(width, height)
            dimensions = (width, height)
            fh.seek(length - 7, 1)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            if dimensions is None:
                raise _Corrupt("the frame header is missing")
            fh.seek(length - 2, 1)
            _find_eoi(fh)
            return dimensions[0], dimensions[1], False
        else:
            fh.seek(length - 2, 1)
    raise _Corrupt("too many segments")


def _marker_after_fill(fh: BinaryIO) -> int:
    """The marker byte after a marker's ``FF``, skipping fill bytes (more ``FF``s).

    The standard allows any number of fill bytes, so a crafted file can be little else: they are
    skipped in growing blocks (C-speed ``lstrip``, a few calls however many there are), and more
    than ``_MAX_FILL`` of them is refused. One byte at a time, 50 MB of them cost seconds of CPU
    under the GIL, which stalls the event loop even from a worker thread.
    """
    skipped, size = 0, 16
    while True:
        block = fh.read(size)
        if not block:
            raise _Corrupt("the file is truncated")
        rest = block.lstrip(b"\xff")
        if rest:
            fh.seek(1 - len(rest), 1)  # just after the marker byte
            return rest[0]
        skipped += len(block)
        if skipped > _MAX_FILL:
            raise _Corrupt("a marker has too many fill bytes")
        size = min(size * 4, _BLOCK)


def _find_eoi(fh: BinaryIO) -> None:
    """Scan for FFD9: inside entropy-coded data 0xFF is always stuffed, so the first one is the end."""
    carry = b""
    while block := fh.read(_BLOCK):
        if b"\xff\xd9" in carry + block[:1] or b"\xff\xd9" in block:
            return
        carry = block[-1:]
    raise _Corrupt("the file is truncated (no end-of-image marker)")


def _read_webp(fh: BinaryIO, size: int, guard: Guard) -> tuple[int, int, bool]:
    fh.seek(4)
    (riff_size,) = struct.unpack("<I", _read_exact(fh, 4))
    end = riff_size + 8
    if end > size:
        raise _Corrupt(f"the file is truncated (the RIFF header declares {end} bytes, the file has {size})")
    pos, header, has_image = 12, None, False
    for _ in range(_MAX_CHUNKS):
        if pos + 8 > end:
            break
        fh.seek(pos)
        kind, length = struct.unpack("<4sI", _read_exact(fh, 8))
        if pos + 8 + length > end:
            raise _Corrupt("the file is truncated")
        if header is None:
            header = _webp_header(kind, _read_exact(fh, min(length, 30)))
            guard(header[0], header[1])
        has_image = has_image or kind in (b"VP8 ", b"VP8L", b"ANMF")
        pos += 8 + length + (length & 1)
    else:
        raise _Corrupt("too many chunks")
    # The last odd-sized chunk may miss its padding byte; anything else must tile the RIFF exactly.
    if header is None or not has_image or pos not in (end, end + 1):
        raise _Corrupt("the chunks do not add up to an image")
    return header


def _webp_header(kind: bytes, data: bytes) -> tuple[int, int, bool]:
    if kind == b"VP8X" and len(data) >= 10:
        width = 1 + int.from_bytes(data[4:7], "little")
        height = 1 + int.from_bytes(data[7:10], "little")
        return width, height, bool(data[0] & 0x10)
    if kind == b"VP8L" and len(data) >= 5 and data[0] == 0x2F:
        bits = int.from_bytes(data[1:5], "little")
        if bits >> 29:
            raise _Corrupt("unknown lossless version")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)
    if kind == b"VP8 " and len(data) >= 10 and data[3:6] == b"\x9d\x01\x2a":
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[6:10]))
        if width and height:
            return width, height, False
    raise _Corrupt("the image header is invalid")


_READERS: dict[ImageFormat, Callable[[BinaryIO, int, Guard], tuple[int, int, bool]]] = {
    "png": _read_png,
    "jpeg": _read_jpeg,
    "webp": _read_webp,
}


def inspect_image(
    path: Path,
    *,
    param: str = "image",
    allowed: Sequence[str] = FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_edge: int = DEFAULT_MAX_EDGE,
) -> ImageInfo:
    """Type, size and alpha of an image file, after cheap integrity checks; 400 when unusable."""
    accepted = ", ".join(allowed)

    def guard(width: int, height: int) -> None:
        if width * height > max_pixels or max(width, height) > max_edge:
            raise InvalidRequestError(
                f"The {param} is {width}x{height} pixels; at most {max_pixels} pixels and "
                f"{max_edge} pixels per edge are accepted.",
                param=param,
                code="image_too_large",
            )

    with path.open("rb") as fh:
        head = fh.read(16)
        if not head:
            raise InvalidRequestError(f"The {param} file is empty.", param=param, code="invalid_image")
        fmt = sniff_format(head) or _cut_signature(head)
        if fmt is None or fmt not in allowed:
            found = f"a {_NAMES[fmt]} image" if fmt else _describe(head)
            raise InvalidRequestError(
                f"The {param} file is {found}; accepted formats: {accepted}.",
                param=param,
                code="invalid_image_format",
            )
        size = path.stat().st_size
        try:
            width, height, alpha = _READERS[fmt](fh, size, guard)
        except (_Corrupt, struct.error) as exc:
            reason = str(exc) if isinstance(exc, _Corrupt) else "the file is truncated"
            raise InvalidRequestError(
                f"The {param} file is not a valid {_NAMES[fmt]} image: {reason}.",
                param=param,
                code="invalid_image",
            ) from None
    return ImageInfo(format=fmt, width=width, height=height, has_alpha=alpha, size=size)


@dataclass(frozen=True, slots=True)
class EditInputs:
    """The inspected images, mask and markup of an edit request."""

    images: tuple[ImageInfo, ...]
    mask: ImageInfo | None
    markup: ImageInfo | None = None


def inspect_edit_inputs(
    images: Sequence[Path],
    mask: Path | None,
    *,
    caps: EditCaps,
    markup: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_edge: int = DEFAULT_MAX_EDGE,
) -> EditInputs:
    """Apply a model's edit rules (SPEC §1.2) to spooled files: count, bytes, type, shape, mask."""
    if not images:
        raise InvalidRequestError("An image is required.", param="image", code="missing_required_parameter")
    if len(images) > caps.max_images:
        raise InvalidRequestError(
            f"Too many images: this model accepts at most {caps.max_images}.",
            param="image",
            code="too_many_images",
        )
    total = sum(path.stat().st_size for path in images)
    if caps.max_total_bytes is not None and total > caps.max_total_bytes:
        raise PayloadTooLargeError(
            f"The images are too large together: this model accepts at most {caps.max_total_bytes} "
            "bytes of images per request.",
            param="image",
        )
    infos: list[ImageInfo] = []
    for path in images:
        if path.stat().st_size > caps.max_image_bytes:
            raise PayloadTooLargeError(
                f"An image is too large: this model accepts at most {caps.max_image_bytes} bytes per image.",
                param="image",
            )
        info = inspect_image(
            path, param="image", allowed=caps.formats, max_pixels=max_pixels, max_edge=max_edge
        )
        if caps.square_only and info.width != info.height:
            raise InvalidRequestError(
                f"The image must be square; it is {info.width}x{info.height}.",
                param="image",
                code="invalid_value",
            )
        infos.append(info)
    mask_info = markup_info = None
    if mask is not None:
        if not caps.mask:
            raise InvalidRequestError(
                "This model does not accept a mask.", param="mask", code="invalid_value"
            )
        mask_info = _inspect_overlay(mask, infos[0], role="mask", max_pixels=max_pixels, max_edge=max_edge)
    elif caps.needs_area and not infos[0].has_alpha:
        raise InvalidRequestError(
            "This model edits the area a mask marks: send a mask, or an image whose transparent "
            "pixels mark the area to edit.",
            param="mask",
            code="invalid_value",
        )
    if markup is not None:
        markup_info = _inspect_overlay(
            markup, infos[0], role="markup", max_pixels=max_pixels, max_edge=max_edge
        )
    return EditInputs(images=tuple(infos), mask=mask_info, markup=markup_info)


def _inspect_overlay(
    path: Path, first: ImageInfo, *, role: Literal["mask", "markup"], max_pixels: int, max_edge: int
) -> ImageInfo:
    """A mask or a markup: a PNG of at most 4 MB, with alpha, the first image's size.

    Both are judged from the PNG header: an image without an alpha channel or a ``tRNS`` chunk has
    no transparent pixel. (An alpha channel that is opaque everywhere would need the pixels
    decoded; the upstream judges that.) A markup must match the first image "after orientation":
    EXIF orientation is not parsed, so a JPEG or WebP first image's swapped dimensions pass too.
    """
    if path.stat().st_size > MASK_MAX_BYTES:
        raise PayloadTooLargeError(
            f"The {role} is too large: at most {MASK_MAX_BYTES} bytes are accepted.", param=role
        )
    info = inspect_image(path, param=role, allowed=("png",), max_pixels=max_pixels, max_edge=max_edge)
    code = f"invalid_{role}"
    if not info.has_alpha:
        reason = (
            "an alpha channel (transparent areas mark what to edit)"
            if role == "mask"
            else "transparent pixels (an alpha channel), overlaid on the first image to guide the edit"
        )
        raise InvalidRequestError(f"The {role} must have {reason}.", param=role, code=code)
    sizes = {(first.width, first.height)}
    if role == "markup" and first.format != "png":
        sizes.add((first.height, first.width))
    if (info.width, info.height) not in sizes:
        raise InvalidRequestError(
            f"The {role} is {info.width}x{info.height} but the image is {first.width}x{first.height}; "
            "they must be the same size.",
            param=role,
            code=code,
        )
    return info
