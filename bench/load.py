"""Load generators: wrk (closed-loop HTTP load, from Debian's package) and an async httpx client
for what wrk cannot measure (per-event SSE timing, multipart uploads, async task polling).

Both run pinned to the load core(s), apart from the servers they measure.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.servers import pinned

# The wrk script. Two things beyond a plain POST:
# - a drain: once the cell's time is up, delay() holds each connection's *next* request for an hour,
#   so every request already sent completes before wrk closes its sockets at -d. A plain wrk run
#   hangs up on up to -c requests in flight at the end, and what a server does with those
#   cancellations (the gateway wedged on it once: see BENCHMARKS.md) would leak into the next cell.
# - exact results: done() prints microsecond percentiles from wrk's histogram, and the time from the
#   first request to the last answer (LuaJIT's ffi reads CLOCK_MONOTONIC; os.time() has only seconds),
#   since wrk's own duration includes the idle drain.
_WRK_SCRIPT = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local f = assert(io.open("{body_path}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}

local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) first = nil; last = 0; drained = 0 end

function delay()
  -- Called as a connection is about to send: at its start, and right after each answer.
  local t = now_ms()
  if first == nil then first = t end
  if t - first < {budget_ms} then
    last = t
    return 0
  end
  -- Time is up: this connection's answer just came; hold its next request. Once every connection
  -- has drained, stop the thread, so that servers closing idle keep-alive connections during the
  -- rest of -d are not counted as read errors.
  drained = drained + 1
  if drained <= {connections} then last = t end
  if drained >= {connections} then wrk.thread:stop() end
  return 3600000
end

function done(summary, latency, requests)
  local e = summary.errors
  local active = threads[1]:get("last") - threads[1]:get("first")
  io.write(string.format(
    "WRKJSON {{\\"requests\\": %d, \\"active_ms\\": %.3f, \\"bytes\\": %d, \\"connect\\": %d, " ..
    "\\"read\\": %d, \\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d, \\"p50_us\\": %d, " ..
    "\\"p99_us\\": %d, \\"mean_us\\": %.1f}}\\n",
    summary.requests, active, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass
class LoadResult:
    """One measurement cell. Latencies in milliseconds; ``errors`` counts non-2xx and socket errors."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    error_kinds: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; small samples (edits) make interpolation meaningless anyway."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# -- wrk --------------------------------------------------------------------------------------------


def run_wrk(
    url: str,
    *,
    body: dict[str, Any],
    headers: dict[str, str],
    connections: int,
    duration_s: float,
    drain_s: float,
    cpus: Sequence[int],
    wrk: str = "wrk",
    hang_up: bool = False,
) -> LoadResult:
    """``wrk -t1 -c<connections>`` POSTing ``body`` for ``duration_s``, then up to ``drain_s`` for
    the requests in flight to finish (wrk takes whole seconds, so the run lasts their sum rounded up).
    ``hang_up``: no drain, wrk closes its connections with requests in flight, as plain wrk does."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(orjson.dumps(body))
        header_lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
        script = Path(tmp) / "post.lua"
        script.write_text(
            _WRK_SCRIPT.format(
                body_path=body_path,
                headers=header_lines,
                budget_ms=10**12 if hang_up else round(duration_s * 1000),
                connections=connections,
            )
        )
        seconds = math.ceil(duration_s + (0 if hang_up else drain_s))
        command = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "-s", str(script)]
        done = subprocess.run(
            pinned([*command, url], cpus), capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    for line in done.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line.removeprefix("WRKJSON "))
            kinds = ("connect", "read", "write", "status", "timeout")
            errors = sum(data[k] for k in kinds)
            breakdown = ", ".join(f"{k} {data[k]}" for k in kinds if data[k])
            return LoadResult(
                requests=data["requests"],
                duration_s=data["active_ms"] / 1000,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                errors=errors,
                extra={"bytes_per_request": data["bytes"] / data["requests"] if data["requests"] else 0.0},
                error_kinds=breakdown,
            )
    output = (done.stderr + done.stdout)[-500:]
    raise RuntimeError(f"wrk printed no summary (exit {done.returncode}): {output}")


async def warm_up(
    base_url: str, headers: dict[str, str], body: dict[str, Any], *, concurrency: int, requests: int
) -> float:
    """A few complete requests at the cell's concurrency (connection pools, lazy imports, caches);
    returns their slowest time in seconds, which sizes the cell's drain."""
    slowest = 0.0
    async with _client(concurrency) as client:

        async def one(_: int) -> None:
            nonlocal slowest
            start = time.perf_counter()
            answer = await client.post(base_url + "/images/generations", headers=headers, json=body)
            await answer.aread()
            slowest = max(slowest, time.perf_counter() - start)

        await _closed_loop(concurrency, requests, one)
    return slowest


# -- async Python client ----------------------------------------------------------------------------


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300, connect=10))


async def _closed_loop(concurrency: int, total: int, one: Any) -> float:
    """Run ``one(i)`` ``total`` times from ``concurrency`` workers; return the wall time."""
    counter = iter(range(total))

    async def worker() -> None:
        for index in counter:
            await one(index)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


class NotSupported(Exception):
    """The target answered in a way that shows it lacks the feature; the cell reads n/a."""


async def stream_load(
    base_url: str, headers: dict[str, str], body: dict[str, Any], *, streams: int, concurrency: int
) -> LoadResult:
    """Streamed generations. Each ``data:`` line carries the upstream's ``emitted_ns``; its arrival
    time minus that is the event's relay delay (client parsing included, which the direct run has
    too, so it cancels out of the added latency). p50/p99 are over events; ``first_event_ms`` is the
    median time to the first event."""
    delays: list[float] = []
    firsts: list[float] = []
    errors = 0
    async with _client(concurrency) as client:

        async def one(_: int) -> None:
            nonlocal errors
            start = time.perf_counter()
            first = True
            async with client.stream(
                "POST", base_url + "/images/generations", headers=headers, json=body
            ) as r:
                if r.status_code != 200 or not r.headers.get("content-type", "").startswith(
                    "text/event-stream"
                ):
                    await r.aread()
                    raise NotSupported(
                        f"HTTP {r.status_code}, {r.headers.get('content-type')}: {r.text[:160]}"
                    )
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.monotonic_ns()
                    data = orjson.loads(line[5:])
                    if "error" in data or "emitted_ns" not in data:
                        errors += 1
                        continue
                    delays.append((now - data["emitted_ns"]) / 1e6)
                    if first:
                        firsts.append((time.perf_counter() - start) * 1000)
                        first = False

        wall = await _closed_loop(concurrency, streams, one)
    return LoadResult(
        requests=streams,
        duration_s=wall,
        p50_ms=_percentile(delays, 50),
        p99_ms=_percentile(delays, 99),
        errors=errors,
        extra={"events": len(delays), "first_event_ms": statistics.median(firsts) if firsts else 0.0},
    )


async def edit_load(
    base_url: str,
    headers: dict[str, str],
    image: Path,
    *,
    images: int,
    requests: int,
    concurrency: int,
    model: str,
) -> LoadResult:
    """Multipart edits of ``images`` copies of ``image`` each; files stream from disk (httpx reads
    them in 64 KiB chunks), so the client's memory stays flat whatever the upload size."""
    latencies: list[float] = []
    errors = 0
    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    async with _client(concurrency) as client:

        async def one(_: int) -> None:
            nonlocal errors
            handles = [image.open("rb") for _ in range(images)]
            try:
                files = [("image[]", (f"input{i}.png", fh, "image/png")) for i, fh in enumerate(handles)]
                start = time.perf_counter()
                r = await client.post(
                    base_url + "/images/edits",
                    headers=headers,
                    data={"model": model, "prompt": "add a red kite in the sky"},
                    files=files,
                )
                latencies.append((time.perf_counter() - start) * 1000)
                if r.status_code != 200:
                    errors += 1
                    if errors == 1 and r.status_code in (404, 405, 500, 501):
                        raise NotSupported(f"HTTP {r.status_code}: {r.text[:160]}")
            finally:
                for fh in handles:
                    fh.close()

        wall = await _closed_loop(concurrency, requests, one)
    uploaded = image.stat().st_size * images * requests
    return LoadResult(
        requests=requests,
        duration_s=wall,
        p50_ms=_percentile(latencies, 50),
        p99_ms=max(latencies) if latencies else float("nan"),
        errors=errors,
        extra={"upload_mb_per_s": uploaded / wall / 1e6 if wall else 0.0},
    )


async def async_task_load(
    base_url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    *,
    tasks: int,
    concurrency: int,
    poll_s: float = 0.05,
    deadline_s: float = 60.0,
) -> LoadResult:
    """``?async=true`` submissions from ``concurrency`` clients as fast as the 202s come back, while
    each task is polled on the side until it ends.

    ``submitted_per_s``: 202s over the time the submissions took. rps (requests / duration): tasks
    that ended, per second from the first submission to the last completion. p50/p99: submit to
    succeeded. A first answer other than 202 with a task id means the mode is missing."""
    latencies: list[float] = []
    done_at: list[float] = []
    errors = 0
    pollers: list[asyncio.Task[None]] = []
    async with _client(concurrency * 2) as client:

        async def poll(task_id: str, sent: float) -> None:
            nonlocal errors
            while time.perf_counter() - sent < deadline_s:
                await asyncio.sleep(poll_s)
                state = (await client.get(f"{base_url}/tasks/{task_id}", headers=headers)).json()
                if state.get("status") in ("succeeded", "failed"):
                    errors += state["status"] == "failed"
                    done_at.append(time.perf_counter())
                    latencies.append((done_at[-1] - sent) * 1000)
                    return
            errors += 1

        async def submit(_: int) -> None:
            sent = time.perf_counter()
            r = await client.post(base_url + "/images/generations?async=true", headers=headers, json=body)
            if r.status_code != 202 or "id" not in r.json():
                raise NotSupported(f"HTTP {r.status_code}: {r.text[:160]}")
            pollers.append(asyncio.ensure_future(poll(r.json()["id"], sent)))

        start = time.perf_counter()
        try:
            submitting = await _closed_loop(concurrency, tasks, submit)
            await asyncio.gather(*pollers)
        finally:
            for poller in pollers:
                poller.cancel()
    wall = (max(done_at) - start) if done_at else 0.0
    return LoadResult(
        requests=len(done_at),
        duration_s=wall,
        p50_ms=_percentile(latencies, 50),
        p99_ms=_percentile(latencies, 99),
        errors=errors,
        extra={"submitted_per_s": tasks / submitting if submitting else 0.0},
    )
