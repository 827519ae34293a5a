"""``POST /v1/files``' body: a multipart form whose ``file`` part is spooled to disk as it arrives.

Memory depends on the chunk size only, never the file's: the ``file`` part is written to a
temporary file under the upload spool (swept like edit spools if the process dies), counting bytes
and lines as it goes, and refused with 413 at ``files.max_bytes`` or ``files.max_lines`` before the
rest of the body is read. Other parts are small fields (``purpose``, ``expires_after[...]``).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import InvalidRequestError, PayloadTooLargeError
from app.images.intake.spool import SPOOL_PREFIX, multipart_boundary

MAX_FIELD_BYTES = 4096
MAX_FIELDS = 20


@dataclass(slots=True)
class UploadedFile:
    """The spooled upload: its fields, its file, and the file's size and line count."""

    fields: dict[str, str]
    spool_dir: Path
    path: Path
    filename: str
    bytes: int = 0
    lines: int = 0
    ends_with_newline: bool = True

    def cleanup(self) -> None:
        shutil.rmtree(self.spool_dir, ignore_errors=True)


def _malformed(detail: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The request body is not valid multipart/form-data: {detail}.", code="invalid_multipart"
    )


@dataclass(slots=True)
class _Parser:
    upload: UploadedFile
    max_bytes: int
    max_lines: int
    handle: BinaryIO
    pending: list[bytes] = field(default_factory=list)
    finished: bool = False
    seen_file: bool = False
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _hname: bytearray = field(default_factory=bytearray)
    _hvalue: bytearray = field(default_factory=bytearray)
    _field: tuple[str, bytearray] | None = None
    _in_file: bool = False

    def parser(self, boundary: bytes) -> MultipartParser:
        return MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._begin,
                "on_header_field": lambda d, s, e: self._hname.extend(memoryview(d)[s:e]),
                "on_header_value": lambda d, s, e: self._hvalue.extend(memoryview(d)[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=16,
            max_header_size=8192,
        )

    def _begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._hname).strip().lower()] = bytes(self._hvalue).strip(b" \t")
        self._hname.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        raw = options.get(b"name")
        if disposition != b"form-data" or not raw:
            raise _malformed("every part needs a Content-Disposition: form-data header with a name")
        name = raw.decode("utf-8", "replace")
        if name == "file":
            if self.seen_file:
                raise _malformed("only one file may be sent")
            self.seen_file = True
            self._in_file = True
            filename = options.get(b"filename")
            text = filename.decode("utf-8", "replace") if filename else "upload.jsonl"
            # The basename only, as metadata: it never names anything on disk.
            self.upload.filename = text.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload.jsonl"
            return
        if len(self.upload.fields) >= MAX_FIELDS:
            raise _malformed(f"more than {MAX_FIELDS} form fields")
        self._field = (name, bytearray())

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            piece = bytes(memoryview(data)[start:end])
            upload = self.upload
            upload.bytes += len(piece)
            if upload.bytes > self.max_bytes:
                raise PayloadTooLargeError(
                    f"The file is larger than the limit of {self.max_bytes} bytes.", param="file"
                )
            if piece:
                upload.lines += piece.count(b"\n")
                upload.ends_with_newline = piece.endswith(b"\n")
            # Lines bound a JSONL batch file, not an image (the SDK sends `purpose` first).
            if upload.lines > self.max_lines and upload.fields.get("purpose", "batch") == "batch":
                raise PayloadTooLargeError(
                    f"The file has more than the limit of {self.max_lines} lines.", param="file"
                )
            self.pending.append(piece)
            return
        if self._field is not None:
            value = self._field[1]
            value.extend(memoryview(data)[start:end])
            if len(value) > MAX_FIELD_BYTES:
                raise PayloadTooLargeError(
                    f"The field '{self._field[0]}' is too large.", param=self._field[0]
                )

    def _part_end(self) -> None:
        if self._field is not None:
            name, value = self._field
            try:
                self.upload.fields[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequestError(
                    f"The field '{name}' is not UTF-8.", param=name, code="invalid_value"
                ) from None
        self._field = None
        self._in_file = False

    def _end(self) -> None:
        self.finished = True

    def flush(self) -> None:
        if self.pending:
            self.handle.write(b"".join(self.pending))
            self.pending.clear()


async def receive_file(
    chunks: AsyncIterator[bytes], *, content_type: str, spool_root: Path, max_bytes: int, max_lines: int
) -> UploadedFile:
    """Spool the upload; on any error (or cancellation) nothing is left behind."""
    boundary = multipart_boundary(content_type)
    await asyncio.to_thread(spool_root.mkdir, parents=True, exist_ok=True)
    spool_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=SPOOL_PREFIX, dir=spool_root))
    upload = UploadedFile(fields={}, spool_dir=spool_dir, path=spool_dir / "file", filename="upload.jsonl")
    try:
        handle = await asyncio.to_thread(upload.path.open, "wb")
        try:
            state = _Parser(upload=upload, max_bytes=max_bytes, max_lines=max_lines, handle=handle)
            parser = state.parser(boundary)
            async for chunk in chunks:
                if chunk:
                    try:
                        parser.write(chunk)
                    except FormParserError as exc:
                        raise _malformed(str(exc).rstrip(".").lower() or "parse error") from None
                    await asyncio.to_thread(state.flush)
                if state.finished:
                    break
        finally:
            await asyncio.to_thread(handle.close)
        if not state.finished:
            raise _malformed("the body ended before the closing boundary")
        if not state.seen_file:
            raise InvalidRequestError(
                "A 'file' part is required.", param="file", code="missing_required_parameter"
            )
        if upload.bytes and not upload.ends_with_newline:
            upload.lines += 1  # the last line needs no newline
            if upload.lines > max_lines and upload.fields.get("purpose", "batch") == "batch":
                raise PayloadTooLargeError(
                    f"The file has more than the limit of {max_lines} lines.", param="file"
                )
        return upload
    except BaseException:
        await asyncio.to_thread(upload.cleanup)
        raise
