"""Streaming ``multipart/form-data`` parsing for image edits: file parts go to a spool, never to memory.

The body is fed chunk by chunk to python-multipart's low-level ``MultipartParser`` (the parser
Starlette uses), so memory depends on the chunk and flush sizes, never on the upload size. Parts
are routed by their *name*, not by whether they carry a filename:

- ``image``, ``image[]`` and ``image[<n>]`` are images, ``mask`` is the mask and ``markup`` the
  markup (a transparent PNG that guides the edit): spooled to files named
  by this module (``000-image``) inside a fresh directory under ``spool_root``. The client's filename
  is kept as metadata only (basename, at most 255 characters) and never touches the filesystem.
- everything else is a plain field, kept in memory as text within the field limits.

Errors (raised before the rest of the body is read; the spool directory is removed first):

    code                  status  param          when
    payload_too_large     413     image | mask   a file part passes its byte limit while arriving
                                  | markup
    payload_too_large     413     <field name>   a field passes ``max_field_bytes``, or all fields
                                                 together pass ``max_fields_total_bytes``
    too_many_images       400     image          more image parts than ``max_files``
    invalid_multipart     400     None | mask    not multipart/form-data, no or bad boundary, malformed
                                                 or truncated body, oversized or too many part
                                                 headers, a part without a name, more than
                                                 ``max_fields`` fields, a second mask or markup
    invalid_value         400     <field name>   a field's value is not UTF-8

File writes are buffered up to ``FLUSH_BYTES`` per part and handed to a worker thread once per
incoming chunk at most, so the event loop never blocks on the disk and a body of many tiny parts
costs one thread hop per chunk rather than one per part.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import InvalidRequestError, PayloadTooLargeError
from app.images.intake.inspector import MASK_MAX_BYTES

FLUSH_BYTES = 1024 * 1024
# Each request's spool folder is ``<spool_root>/upload-<random>``; the orphan sweep (sweep.py)
# recognises its folders by this prefix and leaves everything else in the root alone.
SPOOL_PREFIX = "upload-"
_IMAGE_FIELD = re.compile(r"image(?:\[\d{0,4}\])?")

Role = Literal["image", "mask", "markup", "field"]


def field_role(name: str) -> Role:
    """Which kind of part a form name denotes; the SDKs send lists as ``image[]``."""
    if name == "mask":
        return "mask"
    if name == "markup":
        return "markup"
    if _IMAGE_FIELD.fullmatch(name):
        return "image"
    return "field"


@dataclass(frozen=True, slots=True)
class SpooledFile:
    """One file part, complete on disk."""

    field: str
    filename: str | None
    content_type: str | None
    path: Path
    size: int


@dataclass(slots=True)
class UploadForm:
    """A parsed edit form; the caller must ``cleanup()`` it when the request is over."""

    fields: dict[str, list[str]]
    files: list[SpooledFile]
    spool_dir: Path

    def field(self, name: str) -> str | None:
        """The last value sent for ``name``, as form parsers conventionally answer."""
        values = self.fields.get(name)
        return values[-1] if values else None

    def images(self) -> list[SpooledFile]:
        """``image``, ``image[]`` and ``image[n]`` parts, in arrival order."""
        return [f for f in self.files if field_role(f.field) == "image"]

    def mask(self) -> SpooledFile | None:
        """The mask part, if one was sent."""
        return next((f for f in self.files if f.field == "mask"), None)

    def markup(self) -> SpooledFile | None:
        """The markup part, if one was sent."""
        return next((f for f in self.files if f.field == "markup"), None)

    def cleanup(self) -> None:
        """Remove the spool directory; safe to call more than once."""
        shutil.rmtree(self.spool_dir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class UploadLimits:
    """Bounds on one multipart body. Parts total at most ``max_fields + max_files + 2`` (mask, markup)."""

    max_file_bytes: int
    max_files: int
    # The mask's limit; the markup, a PNG of the same kind, shares it.
    max_mask_bytes: int = MASK_MAX_BYTES
    # A 32,000-character prompt is at most 128 KiB of UTF-8; twice that leaves room for any field.
    max_field_bytes: int = 256 * 1024
    max_fields: int = 100
    max_fields_total_bytes: int = 1024 * 1024
    # One header line (Content-Disposition with a long filename fits easily) and headers per part.
    max_header_bytes: int = 8 * 1024
    max_headers_per_part: int = 16


def _malformed(detail: str, *, param: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(
        f"The request body is not valid multipart/form-data: {detail}.", param=param, code="invalid_multipart"
    )


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type, or a 400."""
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise _malformed("the content type must be multipart/form-data")
    boundary = options.get(b"boundary")
    # RFC 2046 allows 1 to 70 characters; python-multipart refuses more than 256.
    if not boundary or len(boundary) > 200:
        raise _malformed("the content type has no usable boundary")
    return boundary


class _FilePart:
    __slots__ = ("buffer", "content_type", "done", "field", "filename", "handle", "limit", "path", "size")

    def __init__(
        self, field: str, filename: str | None, content_type: str | None, path: Path, limit: int
    ) -> None:
        self.field = field
        self.filename = filename
        self.content_type = content_type
        self.path = path
        self.limit = limit
        self.size = 0
        self.buffer = bytearray()
        self.handle: BinaryIO | None = None
        self.done = False

    def write_out(self) -> None:
        """Runs in a worker thread while the loop awaits it, so nothing else touches the part."""
        if self.handle is None:
            self.handle = self.path.open("xb")
        if self.buffer:
            self.handle.write(self.buffer)
            self.buffer.clear()
        if self.done:
            self.handle.close()
            self.handle = None

    def spooled(self) -> SpooledFile:
        return SpooledFile(self.field, self.filename, self.content_type, self.path, self.size)


class _Spooler:
    """Parser callbacks: route each part, enforce the limits, queue file bytes for the thread."""

    def __init__(self, boundary: bytes, spool_dir: Path, limits: UploadLimits) -> None:
        self.limits = limits
        self.spool_dir = spool_dir
        self.fields: dict[str, list[str]] = {}
        self.files: list[_FilePart] = []
        self.finished = False
        self.dirty: list[_FilePart] = []
        self._headers: dict[bytes, bytes] = {}
        self._name = bytearray()
        self._value = bytearray()
        self._file: _FilePart | None = None
        self._field: tuple[str, bytearray] | None = None
        self._field_count = 0
        self._field_bytes = 0
        self._images = 0
        self.parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._name.extend(memoryview(data)[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(memoryview(data)[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=limits.max_headers_per_part,
            max_header_size=limits.max_header_bytes,
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError as exc:  # includes MultipartParseError
            raise _malformed(str(exc).rstrip(".").lower() or "parse error") from None

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._name).strip().lower()] = bytes(self._value).strip(b" \t")
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        raw_name = options.get(b"name")
        if disposition != b"form-data" or not raw_name:
            raise _malformed("every part needs a Content-Disposition: form-data header with a name")
        name = raw_name.decode("utf-8", "replace")
        role = field_role(name)
        if role == "field":
            self._field_count += 1
            if self._field_count > self.limits.max_fields:
                raise _malformed(f"more than {self.limits.max_fields} form fields")
            self._field = (name, bytearray())
            return
        if role in ("mask", "markup"):
            if any(f.field == role for f in self.files):
                raise _malformed(f"only one {role} may be sent", param=role)
            limit = self.limits.max_mask_bytes
        else:
            self._images += 1
            if self._images > self.limits.max_files:
                raise InvalidRequestError(
                    f"Too many images: at most {self.limits.max_files} may be sent.",
                    param="image",
                    code="too_many_images",
                )
            limit = self.limits.max_file_bytes
        content_type = self._headers.get(b"content-type")
        part = _FilePart(
            field=name,
            filename=_safe_filename(options.get(b"filename")),
            content_type=content_type.decode("latin-1")[:255] if content_type else None,
            # Our own name, never the client's: path characters in the request cannot matter.
            path=self.spool_dir / f"{len(self.files):03d}-{role}",
            limit=limit,
        )
        self.files.append(part)
        self._file = part

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        length = end - start
        if self._file is not None:
            part = self._file
            if part.size + length > part.limit:
                param = field_role(part.field)
                raise PayloadTooLargeError(
                    f"The {param} file is too large: at most {part.limit} bytes are allowed.", param=param
                )
            part.size += length
            before = len(part.buffer)
            part.buffer.extend(memoryview(data)[start:end])
            if before < FLUSH_BYTES <= len(part.buffer):
                self.dirty.append(part)
        elif self._field is not None:
            name, value = self._field
            self._field_bytes += length
            if len(value) + length > self.limits.max_field_bytes:
                raise PayloadTooLargeError(
                    f"The field '{name}' is too large: at most {self.limits.max_field_bytes} bytes.",
                    param=name,
                )
            if self._field_bytes > self.limits.max_fields_total_bytes:
                raise PayloadTooLargeError(
                    f"The form fields are too large: at most {self.limits.max_fields_total_bytes} bytes "
                    "in total.",
                    param=name,
                )
            value.extend(memoryview(data)[start:end])

    def _part_end(self) -> None:
        if self._file is not None:
            self._file.done = True
            if self._file not in self.dirty:
                self.dirty.append(self._file)
            self._file = None
        elif self._field is not None:
            name, value = self._field
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequestError(
                    f"The field '{name}' is not valid UTF-8 text.", param=name, code="invalid_value"
                ) from None
            self.fields.setdefault(name, []).append(text)
            self._field = None

    def _end(self) -> None:
        self.finished = True

    async def flush(self) -> None:
        """Write queued buffers (and close finished parts) off the event loop."""
        if not self.dirty:
            return
        parts, self.dirty = self.dirty, []

        def write_all() -> None:
            for part in parts:
                part.write_out()

        await _in_thread(write_all)

    def abort(self) -> None:
        for part in self.files:
            if part.handle is not None:
                part.handle.close()


def _safe_filename(raw: bytes | None) -> str | None:
    """The client's filename as metadata: its last path component, bounded."""
    if raw is None:
        return None
    name = PurePosixPath(raw.decode("utf-8", "replace").replace("\\", "/")).name
    return name[:255] or None


async def _in_thread(fn: Callable[[], None]) -> None:
    """Blocking file I/O in a worker thread.

    A thread cannot be interrupted, so on cancellation (the client went away) we wait for it to
    return before re-raising: the cleanup that follows must not race a write into the spool.
    """
    future = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved so asyncio does not log it; the cancellation wins
        raise


async def parse_multipart(
    chunks: AsyncIterator[bytes], *, content_type: str, spool_root: Path, limits: UploadLimits
) -> UploadForm:
    """Parse a multipart body as it arrives; file parts land in a fresh directory under ``spool_root``.

    Stops reading at the closing boundary or at the first error. On any exception, client
    disconnects and cancellation included, the spool directory is gone before the exception leaves.
    """
    boundary = multipart_boundary(content_type)
    spool_root.mkdir(parents=True, exist_ok=True)
    spool_dir = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX, dir=spool_root))
    spooler: _Spooler | None = None
    try:
        spooler = _Spooler(boundary, spool_dir, limits)
        async for chunk in chunks:
            if chunk:
                spooler.feed(chunk)
                await spooler.flush()
            if spooler.finished:
                break
        if not spooler.finished:
            raise _malformed("the body ended before the closing boundary")
        return UploadForm(
            fields=spooler.fields, files=[p.spooled() for p in spooler.files], spool_dir=spool_dir
        )
    except BaseException:
        if spooler is not None:
            spooler.abort()
        shutil.rmtree(spool_dir, ignore_errors=True)
        raise
