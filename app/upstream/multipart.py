"""The multipart body of an edit, built from the spooled files for one upstream attempt.

Files go to aiohttp as open file objects, which it reads in 64 KiB chunks while sending, so memory
stays flat whatever the upload size; each attempt (a retry, a failover) reopens them from the
spool, which is what makes edits replayable.

The parts are written byte for byte as httpx wrote them before (and as the OpenAI SDKs still do):
text fields carry no ``Content-Type``, and names and filenames are escaped the HTML5 way rather
than with aiohttp's RFC 2231 ``name*=`` form, which not every upstream parses.

aiohttp has no write timeout, and its read timeout only starts once the body is sent, so an
upstream that stops reading mid-upload would hold the call for ever; ``StallBoundForm`` bounds each
write as httpx's write timeout did.
"""

from __future__ import annotations

import asyncio
import re
from contextlib import ExitStack
from typing import Any

from aiohttp import MultipartWriter, hdrs, payload
from aiohttp.abc import AbstractStreamWriter

from app.domain.jobs import ImageJob, InputImage

# What an HTML5 form (and httpx) escapes in a Content-Disposition parameter: the quote, the
# backslash and control characters other than ESC; CR and LF especially, which would end the header.
_HTML5_ESCAPES = re.compile(r'[\x00-\x1a\x1c-\x1f"\\]')


def form_value(value: Any) -> str:
    """A JSON-typed field as multipart text, the way the OpenAI SDKs send it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def edit_form(
    job: ImageJob,
    upstream_model: str,
    files: ExitStack,
    *,
    stream: bool,
    omitted: frozenset[str] = frozenset(),
    write_timeout_s: float | None = None,
) -> StallBoundForm:
    """The form: fields (less ``omitted``), then the images and mask; files close with ``files``."""
    body = job.upstream_body(upstream_model)
    body.pop("response_format", None)  # edits never ask for URLs upstream; see ImageJob.upstream_body
    if job.caps.family != "gpt-image":
        body["response_format"] = "b64_json"
    if stream:
        body["stream"] = True
    form = StallBoundForm(write_timeout_s)
    for name, value in body.items():
        if name in omitted:
            continue
        for field_name, text in flatten_field(name, value):
            form.append_payload(_text_part(field_name, text))
    # One image goes as `image`; several as repeated `image[]`, the array form the API expects.
    name = "image" if len(job.images) == 1 else "image[]"
    for index, image in enumerate(job.images):
        form.append_payload(_file_part(name, image, index, files))
    if job.mask is not None:
        form.append_payload(_file_part("mask", job.mask, 0, files, stem="mask"))
    if job.markup is not None:
        # Sent as it was spooled: byte for byte, as a file part.
        form.append_payload(_file_part("markup", job.markup, 0, files, stem="markup"))
    return form


def flatten_field(name: str, value: Any) -> list[tuple[str, str]]:
    """A JSON-typed field as multipart fields: objects as ``svg[model]``,
    ``svg[reasoning][effort]`` (the SDKs' encoding), lists as repeated ``name[]``; nulls dropped."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in flatten_field(f"{name}[{key}]", item)]
    if isinstance(value, list):
        return [pair for item in value for pair in flatten_field(f"{name}[]", item)]
    return [(name, form_value(value))]


class StallBoundForm(MultipartWriter):
    """A ``multipart/form-data`` body whose every write must finish within ``write_timeout_s``."""

    def __init__(self, write_timeout_s: float | None) -> None:
        super().__init__("form-data")
        self._write_timeout_s = write_timeout_s

    async def write(self, writer: AbstractStreamWriter, close_boundary: bool = True) -> None:
        # aiohttp ≥ 3.12 calls write_with_length, whose default lands here too.
        if self._write_timeout_s is not None:
            writer = _StallBoundWriter(writer, self._write_timeout_s)
        await super().write(writer, close_boundary)


class _StallBoundWriter(AbstractStreamWriter):
    """Delegates to aiohttp's writer; a write waiting on a full socket buffer too long times out.

    The TimeoutError reaches the response as it is (aiohttp passes timeouts through), so the caller
    maps it to ``UpstreamTimeout``.
    """

    def __init__(self, inner: AbstractStreamWriter, timeout_s: float) -> None:
        self._inner = inner
        self._timeout_s = timeout_s

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        async with asyncio.timeout(self._timeout_s):
            await self._inner.write(chunk)

    async def write_eof(self, chunk: bytes = b"") -> None:
        await self._inner.write_eof(chunk)

    async def drain(self) -> None:
        await self._inner.drain()

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        self._inner.enable_compression(encoding, strategy)

    def enable_chunking(self) -> None:
        self._inner.enable_chunking()

    async def write_headers(self, status_line: str, headers: Any) -> None:
        await self._inner.write_headers(status_line, headers)


def _disposition(name: str, filename: str | None = None) -> str:
    def escaped(text: str) -> str:
        return _HTML5_ESCAPES.sub(lambda m: "\\\\" if m[0] == "\\" else f"%{ord(m[0]):02X}", text)

    value = f'form-data; name="{escaped(name)}"'
    return value if filename is None else f'{value}; filename="{escaped(filename)}"'


def _text_part(name: str, value: str) -> payload.Payload:
    part = payload.BytesPayload(value.encode())
    del part.headers[hdrs.CONTENT_TYPE]  # a plain field, as browsers and the SDKs send it
    part.headers[hdrs.CONTENT_DISPOSITION] = _disposition(name)
    return part


def _file_part(
    name: str, image: InputImage, index: int, files: ExitStack, stem: str = "image"
) -> payload.Payload:
    extension = "jpg" if image.format == "jpeg" else image.format
    # The client's own filename is not forwarded: it may carry paths or personal data.
    handle = files.enter_context(image.path.open("rb"))
    part = payload.BufferedReaderPayload(handle, content_type=image.content_type)
    part.headers[hdrs.CONTENT_DISPOSITION] = _disposition(name, f"{stem}-{index}.{extension}")
    return part
