"""CPU seconds a server spends per request, over a fixed number of requests (issue 25).

Wall-clock throughput means nothing on a machine whose cores are shared with other work; the CPU
time the server process (and its children) is charged per request does not depend on how long it
waited for a core, so it is what ``make bench-profile`` reports and what the optimisations of
issue 25 are judged by.

The load comes from a raw asyncio client over httptools, a fixed ``total`` of requests from
``concurrency`` keep-alive connections: a request count, not a duration, so every repetition
does the same work whatever the machine's load.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (uvicorn's worker processes), from /proc (Linux)."""
    found = [pid]
    for current in found:
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                found.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants, reaped children included (utime, stime,
    cutime, cstime of /proc/<pid>/stat)."""
    total = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue  # gone since the listing
        # Fields after the command name, which may hold spaces, closed by the last ")".
        fields = stat.rpartition(")")[2].split()
        total += sum(int(value) for value in fields[11:15])
    return total / _TICKS


@dataclass
class Run:
    requests: int
    errors: int
    cpu_s: float

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_s * 1000 / self.requests if self.requests else float("nan")


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending ``request`` and reading the answer, one at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed by the server"))

    async def send(self, request: bytes) -> int:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.done


def build_request(url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    payload = orjson.dumps(body)
    lines = [f"POST {parts.path} HTTP/1.1", f"host: {parts.netloc}", f"content-length: {len(payload)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def fire(
    url: str, body: dict[str, Any], headers: dict[str, str], *, total: int, concurrency: int
) -> int:
    """Send ``total`` requests over ``concurrency`` connections; return how many were not 2xx."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(url, body, headers)
    loop = asyncio.get_running_loop()
    remaining = iter(range(total))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        connection: _Connection | None = None
        for _ in remaining:
            if connection is None:
                _, connection = await loop.create_connection(_Connection, host, port)
            try:
                status = await connection.send(request)
            except ConnectionError:
                errors += 1
                connection = None
                continue
            if not 200 <= status < 300:
                errors += 1
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


def measure(
    pid: int,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    total: int,
    concurrency: int,
) -> Run:
    """The server's CPU seconds over ``total`` requests (the client's own CPU is not counted)."""
    before = cpu_seconds(pid)
    errors = asyncio.run(fire(url, body, headers, total=total, concurrency=concurrency))
    return Run(total, errors, cpu_seconds(pid) - before)


@dataclass
class Series:
    label: str
    runs: list[Run]

    @property
    def median_ms(self) -> float:
        return statistics.median(r.cpu_ms_per_request for r in self.runs)


def repeat(
    label: str,
    pid: int,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    total: int,
    concurrency: int,
    times: int = 3,
    warmup: int = 200,
) -> Series:
    """``times`` measurements after a warm-up (connection pools, lazy imports, caches)."""
    asyncio.run(fire(url, body, headers, total=warmup, concurrency=concurrency))
    runs = [measure(pid, url, body, headers, total=total, concurrency=concurrency) for _ in range(times)]
    return Series(label, runs)


def table(series: Sequence[Series]) -> str:
    """Markdown rows: median and each repetition, in ms of server CPU per request."""
    lines = [
        "| load | requests × runs | CPU ms/request (median) | runs | errors |",
        "|---|---|---|---|---|",
    ]
    for s in series:
        runs = ", ".join(f"{r.cpu_ms_per_request:.3f}" for r in s.runs)
        errors = sum(r.errors for r in s.runs)
        lines.append(
            f"| {s.label} | {s.runs[0].requests:,} × {len(s.runs)} | {s.median_ms:.3f} | {runs} | {errors} |"
        )
    return "\n".join(lines)
