"""Incremental Server-Sent Events decoder: bytes in, events out, for upstream streams.

Written here rather than taken from a library because the relay needs two things at once that the
common parsers don't offer together: chunk boundaries anywhere (even inside a CRLF), and events of
many megabytes without quadratic re-scanning. Lines are found with ``bytes.find`` from where the
last search stopped, and an event's data is kept as a list of line slices joined once at dispatch.
Semantics follow the WHATWG spec: ``event``, ``data`` (joined with ``\\n``), ``id``, ``retry``;
comment lines (``:``) are ignored; an event is dispatched on a blank line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: bytes
    id: str | None = None


class SSEDecoder:
    def __init__(self, max_event_bytes: int = 256 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._scan_from = 0
        self._event = ""
        self._data: list[bytes] = []
        self._data_size = 0
        self._id: str | None = None
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """Events completed by this chunk, in order."""
        self._buffer += chunk
        while True:
            newline = self._find_newline()
            if newline is None:
                break
            end, skip = newline
            line = bytes(self._buffer[:end])
            del self._buffer[: end + skip]
            self._scan_from = 0
            event = self._line(line)
            if event is not None:
                yield event
        if len(self._buffer) + self._data_size > self._max:
            raise ValueError("server-sent event larger than the decoder's limit")

    def _find_newline(self) -> tuple[int, int] | None:
        buffer = self._buffer
        lf = buffer.find(b"\n", self._scan_from)
        cr = buffer.find(b"\r", self._scan_from, lf if lf != -1 else len(buffer))
        if cr != -1:
            if cr + 1 == len(buffer):
                # A CR at the very end may be the first half of a CRLF split across chunks.
                self._scan_from = cr
                return None
            return cr, 2 if buffer[cr + 1 : cr + 2] == b"\n" else 1
        if lf != -1:
            return lf, 1
        self._scan_from = len(buffer)
        return None

    def _line(self, line: bytes) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", "replace")
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data and not self._event:
            return None
        event = SSEEvent(event=self._event or "message", data=b"\n".join(self._data), id=self._id)
        self._event, self._data, self._data_size = "", [], 0
        return event

    def flush(self) -> Iterator[SSEEvent]:
        """At end of stream: a final event not followed by a blank line is still delivered."""
        if self._buffer:
            # A CR held back as a possible half of CRLF is, at the end, a line ending of its own.
            event = self._line(bytes(self._buffer).removesuffix(b"\r"))
            self._buffer.clear()
            if event is not None:
                yield event
        event = self._dispatch()
        if event is not None:
            yield event


async def iter_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[SSEEvent]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event
