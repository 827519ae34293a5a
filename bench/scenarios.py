"""The six scenarios of issue 9, each run against every target (direct, nginx, gateway, LiteLLM).

A scenario appends ``Cell``s to ``Bench.cells``; the report (bench/report.py) lays them out and
computes the added latencies against the direct cell of the same row. A target that lacks a
feature (LiteLLM streaming images, async mode on anything but the gateway) gets an n/a cell with
the reason, never a failed run.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.load import LoadResult, NotSupported, async_task_load, edit_load, run_wrk, stream_load, warm_up
from bench.servers import MODEL, ROOT, Cpus, PeakSampler, Server, pinned, rss_bytes, start_gateway

SMALL: dict[str, Any] = {
    "model": MODEL,
    "prompt": "a lighthouse at dawn",
    "size": "1024x1024",
    "quality": "low",
}
LARGE: dict[str, Any] = {
    "model": MODEL,
    "prompt": "a lighthouse at dawn",
    "size": "1536x1024",
    "quality": "high",
}
LARGE_N4: dict[str, Any] = {**LARGE, "n": 4}
STREAM: dict[str, Any] = {**SMALL, "stream": True, "partial_images": 3}

EDIT_IMAGES = 16
EDIT_IMAGE_BYTES = 20_000_000
EDIT_CONCURRENCY = 4


@dataclass
class Target:
    """Something to send load to; ``server`` is None when it could not be had (``reason`` says why).
    ``memory`` says whether its RSS is worth tracking (not for the fake upstream itself).
    ``restart`` replaces a wedged server with a fresh one (see ``Bench.recover``)."""

    name: str
    server: Server | None
    reason: str = ""
    memory: bool = True
    restart: Callable[[], Server] | None = None
    restarts: list[str] = field(default_factory=list)


@dataclass
class Cell:
    group: str
    row: str
    target: str
    result: LoadResult | None = None
    note: str = ""
    peak_rss: int | None = None
    rss_rise: int | None = None


@dataclass
class Settings:
    duration_s: float = 5.0
    stream_count: int = 60
    quick: bool = False


@dataclass
class Bench:
    targets: list[Target]
    cpus: Cpus
    workdir: Path
    settings: Settings
    wrk: str | None
    cells: list[Cell] = field(default_factory=list)
    idle_rss: dict[str, int] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    _baselines: dict[tuple[str, str], int] = field(default_factory=dict)

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    def _baseline(self, group: str, target: Target) -> int:
        """RSS when ``target`` first enters ``group``: the reference for the group's RSS rises, taken
        before any of its warm-ups (a warm-up would already have grown the heap)."""
        assert target.server is not None
        key = (group, target.name)
        if key not in self._baselines:
            self._baselines[key] = rss_bytes(target.server.pid)
        return self._baselines[key]

    def measure(
        self,
        group: str,
        row: str,
        target: Target,
        run: Callable[[Server], LoadResult],
        *,
        warmup: Callable[[Server], object] | None = None,
    ) -> Cell:
        cell = Cell(group, row, target.name)
        self.cells.append(cell)
        server = target.server
        if server is None:
            cell.note = target.reason
            return cell
        if not server.alive():
            cell.note = f"{target.name} is not running any more"
            return cell
        baseline = self._baseline(group, target) if target.memory else 0
        try:
            if warmup is not None:
                warmup(server)
                if self.recover(target, f"{group} | {row}, after the warm-up"):
                    server, cell.note = target.server, "restarted after a wedge (see below)"
                    assert server is not None
                    baseline = self._baseline(group, target)
            if target.memory:
                with PeakSampler(server.pid) as sampler:
                    cell.result = run(server)
                cell.peak_rss, cell.rss_rise = sampler.peak, sampler.peak - baseline
            else:
                cell.result = run(server)
        except NotSupported as exc:
            cell.note = f"not supported ({str(exc)[:110].strip()}…)"
        except (TimeoutError, httpx.HTTPError, RuntimeError, OSError) as exc:
            cell.note = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        print(f"  {group} | {row} | {target.name}: {describe(cell)}", flush=True)
        self.recover(target, f"{group} | {row}")
        return cell

    def fresh(self) -> None:
        """Restart what can be restarted (the gateway) before a scenario, so that its RSS figures
        start from a fresh process and not from the heap the previous scenario left behind."""
        for target in self.targets:
            if target.restart is None or target.server is None:
                continue
            target.server.stop(grace_s=5)
            target.server = target.restart()
            probe(target.server)  # one request: lazily imported code is loaded before any baseline
            for key in [k for k in self._baselines if k[1] == target.name]:
                del self._baselines[key]

    def recover(self, target: Target, where: str, problem: str | None = None) -> bool:
        """Check that ``target`` still answers a small generation; if not, restart it and say so.

        wrk ends a cell by closing its connections with requests still in flight. A server must
        survive that (clients time out and hang up all the time); one that stops answering
        afterwards is restarted so the rest of the run still measures something, and the report
        lists each restart."""
        if target.restart is None or target.server is None:
            return False
        problem = problem or probe(target.server)
        if problem is None:
            return False
        log = target.server.log.read_text(errors="replace") if target.server.log.exists() else ""
        if "database is locked" in log:
            problem += "; its log says `database is locked`"
        target.restarts.append(f"{where}: {problem}")
        print(f"  !! {target.name} wedged ({problem}); restarting it", flush=True)
        target.server.stop(grace_s=2)
        target.server = target.restart()
        for key in [k for k in self._baselines if k[1] == target.name]:
            del self._baselines[key]
        return True

    # -- wrk cells ----------------------------------------------------------------------------------

    def wrk_row(self, group: str, row: str, body: dict[str, Any], connections: int) -> None:
        """One row of wrk cells: per target, a short httpx warm-up whose slowest answer sizes the
        drain, then wrk for ``duration_s``."""
        for target in self.targets:
            if self.wrk is None:
                self.cells.append(Cell(group, row, target.name, note="wrk is not available"))
                continue
            wrk = self.wrk
            slowest = [0.0]

            def warmup(server: Server, c: int = connections, slowest: list[float] = slowest) -> None:
                load = warm_up(server.base_url, server.headers(), body, concurrency=c, requests=max(2 * c, 8))
                slowest[0] = asyncio.run(asyncio.wait_for(load, 120))

            def run(
                server: Server, c: int = connections, wrk: str = wrk, slowest: list[float] = slowest
            ) -> LoadResult:
                return run_wrk(
                    server.base_url + "/images/generations",
                    body=body,
                    headers=server.headers(),
                    connections=c,
                    duration_s=self.settings.duration_s,
                    drain_s=min(10.0, 1.0 + 2 * slowest[0]),
                    cpus=self.cpus.load,
                    wrk=wrk,
                )

            self.measure(group, row, target, run, warmup=warmup)

    def run_async(self, coro: Awaitable[LoadResult], timeout_s: float) -> LoadResult:
        async def bounded() -> LoadResult:
            return await asyncio.wait_for(coro, timeout_s)

        return asyncio.run(bounded())


def probe(server: Server, timeout_s: float = 8.0) -> str | None:
    """None when ``server`` answers a small generation with 200 in time, else what went wrong."""
    if not server.alive():
        return "the process exited"
    try:
        answer = httpx.post(
            server.base_url + "/images/generations", headers=server.headers(), json=SMALL, timeout=timeout_s
        )
    except httpx.HTTPError as exc:
        return f"no answer within {timeout_s:g} s ({type(exc).__name__})"
    return None if answer.status_code == 200 else f"HTTP {answer.status_code}: {answer.text[:120]}"


def describe(cell: Cell) -> str:
    if cell.result is None:
        return f"n/a ({cell.note})" if cell.note else "n/a"
    r = cell.result
    text = f"{r.rps:,.1f}/s p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms"
    if r.errors:
        text += f" errors {r.errors} ({r.error_kinds or 'client-side'})"
    if cell.peak_rss:
        text += f" peak RSS {cell.peak_rss / 2**20:.0f} MB"
    return text


# -- scenarios --------------------------------------------------------------------------------------


def small_answers(bench: Bench) -> None:
    for connections in (1, 16, 64):
        bench.wrk_row("1. small answers", f"c={connections}", SMALL, connections)


def large_answers(bench: Bench) -> None:
    bench.fresh()
    for label, body in (("1 image", LARGE), ("n=4", LARGE_N4)):
        for connections in (1, 8):
            bench.wrk_row("2. large answers", f"{label}, c={connections}", body, connections)


def streaming(bench: Bench) -> None:
    bench.fresh()
    count = bench.settings.stream_count
    for connections, streams in ((1, count), (16, count * 4)):
        for target in bench.targets:

            def run(server: Server, c: int = connections, n: int = streams) -> LoadResult:
                load = stream_load(server.base_url, server.headers(), STREAM, streams=n, concurrency=c)
                return bench.run_async(load, 120)

            def warmup(server: Server, c: int = connections) -> LoadResult:
                return bench.run_async(
                    stream_load(server.base_url, server.headers(), STREAM, streams=c, concurrency=c), 60
                )

            bench.measure("3. streaming, partial_images=3", f"c={connections}", target, run, warmup=warmup)


def edit_image(directory: Path, size: int = EDIT_IMAGE_BYTES) -> Path:
    """A structurally valid PNG of about ``size`` bytes: random RGB rows in stored (level 0)
    deflate blocks, so its size is its pixel count and every chunk CRC checks out."""
    path = directory / "edit-input.png"
    if path.exists():
        return path
    side = int((size / 3) ** 0.5)
    raw = os.urandom(side * side * 3)
    stride = side * 3
    rows = b"".join(b"\x00" + raw[i * stride : (i + 1) * stride] for i in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 0))
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


def edits(bench: Bench) -> None:
    bench.fresh()
    big = edit_image(bench.workdir)
    (bench.workdir / "small").mkdir(exist_ok=True)
    small = edit_image(bench.workdir / "small", 64 * 1024)
    row = f"{EDIT_CONCURRENCY} × {EDIT_IMAGES}×{big.stat().st_size / 1e6:.0f} MB"
    for target in bench.targets:

        def run(server: Server) -> LoadResult:
            load = edit_load(
                server.base_url,
                server.headers(),
                big,
                images=EDIT_IMAGES,
                requests=EDIT_CONCURRENCY,
                concurrency=EDIT_CONCURRENCY,
                model=MODEL,
            )
            return bench.run_async(load, 240)

        def warmup(server: Server) -> LoadResult:
            load = edit_load(
                server.base_url, server.headers(), small, images=2, requests=2, concurrency=1, model=MODEL
            )
            return bench.run_async(load, 60)

        bench.measure("4. edits", row, target, run, warmup=warmup)


def async_mode(bench: Bench) -> None:
    bench.fresh()
    tasks = 50 if bench.settings.quick else 200
    for target in bench.targets:
        if target.name != "gateway":
            bench.cells.append(
                Cell("5. async tasks", f"{tasks} tasks, c=16", target.name, note="no async mode")
            )
            continue

        def run(server: Server) -> LoadResult:
            load = async_task_load(server.base_url, server.headers(), SMALL, tasks=tasks, concurrency=16)
            return bench.run_async(load, 120)

        bench.measure("5. async tasks", f"{tasks} tasks, c=16", target, run)


def workers(bench: Bench) -> None:
    """``serve --workers N``: one process against two, each free to use every core.

    The other scenarios give the target one core of its own; a second worker needs a second core,
    which here is the one wrk and the fake upstream run on, so these figures are this machine's
    ceiling rather than a clean per-worker cost. Both gateways run the same way, so the ratio holds.
    """
    upstream = bench.target("direct").server
    if upstream is None or bench.wrk is None:
        return
    every_core = Cpus(server=tuple(sorted({*bench.cpus.server, *bench.cpus.load})), load=bench.cpus.load)
    for count in (1, 2):
        server = start_gateway(bench.workdir, every_core, upstream, workers=count)
        target = Target(f"gateway, {count} worker{'s' if count > 1 else ''}", server)
        try:
            probe(server)
            for connections in (16, 64):
                single = Bench(
                    targets=[target],
                    cpus=bench.cpus,
                    workdir=bench.workdir,
                    settings=bench.settings,
                    wrk=bench.wrk,
                )
                single.wrk_row("6. workers (both cores)", f"c={connections}", SMALL, connections)
                bench.cells.extend(single.cells)
        finally:
            server.stop(grace_s=5)


def request_log(bench: Bench) -> None:
    """Small answers with the console's request log on (the default) and off, in the same run.

    Two gateways like the one measured above, differing only in ``console.request_log``; their rows
    alternate (on, off, on, off) so that drift on a shared machine hits both alike.
    """
    upstream = bench.target("direct").server
    if upstream is None or bench.wrk is None:
        return
    for connections in (16, 64):
        for label, enabled in (("log on", True), ("log off", False)):
            server = start_gateway(
                bench.workdir, bench.cpus, upstream, extra={"console": {"request_log": enabled}}
            )
            target = Target(f"gateway, {label}", server)
            try:
                probe(server)
                single = Bench(
                    targets=[target],
                    cpus=bench.cpus,
                    workdir=bench.workdir,
                    settings=bench.settings,
                    wrk=bench.wrk,
                )
                single.wrk_row("9. request log on vs off", f"c={connections}", SMALL, connections)
                bench.cells.extend(single.cells)
            finally:
                server.stop(grace_s=5)


def hang_ups(bench: Bench) -> None:
    """Not a speed test: do the proxies survive clients that hang up with requests in flight?
    Plain wrk does exactly that at the end of a run, as do clients that time out."""
    rounds = 2
    rows = [
        f"| target | after wrk -c16 hung up on its in-flight requests ({rounds} rounds of 2 s) |",
        "|---|---|",
    ]
    for target in bench.targets:
        if target.server is None or bench.wrk is None:
            rows.append(f"| {target.name} | n/a |")
            continue
        problem: str | None = None
        for _ in range(rounds):
            try:
                run_wrk(
                    target.server.base_url + "/images/generations",
                    body=SMALL,
                    headers=target.server.headers(),
                    connections=16,
                    duration_s=2,
                    drain_s=0,
                    cpus=bench.cpus.load,
                    wrk=bench.wrk,
                    hang_up=True,
                )
            except RuntimeError as exc:
                problem = f"wrk failed: {str(exc)[:100]}"
                break
            time.sleep(1.0)  # let the server notice the disconnects
            problem = probe(target.server)
            if problem is not None:
                break
        verdict = "answers normally" if problem is None else f"**stops answering**: {problem}"
        if problem is not None and target.restart is not None:
            bench.recover(target, "hang-up check", problem)
            verdict += " (restarted)"
        rows.append(f"| {target.name} | {verdict} |")
        print(f"  hang-ups | {target.name}: {verdict}", flush=True)
    bench.texts["hangups"] = "\n".join(rows)


def moderation(bench: Bench) -> None:
    """The classifier's own micro-benchmark, when it exists; its markdown goes into the report."""
    if not (ROOT / "bench" / "moderation_bench.py").exists():
        bench.texts["moderation"] = "n/a (not implemented: bench/moderation_bench.py is missing)"
        return
    command = pinned([sys.executable, "-m", "bench.moderation_bench"], bench.cpus.server)
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired:
        bench.texts["moderation"] = "n/a (bench.moderation_bench did not finish within 180 s)"
        return
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-600:]
        bench.texts["moderation"] = (
            f"n/a (bench.moderation_bench failed, exit {done.returncode}):\n\n```\n{tail}\n```"
        )
        return
    bench.texts["moderation"] = done.stdout.strip()
    print("  " + "\n  ".join(done.stdout.strip().splitlines()), flush=True)


def slow_upstream(bench: Bench) -> None:
    """Issue 16: an upstream that holds each answer 10 s (bench/slow.py, its own servers and section)."""
    from bench.slow import markdown
    from bench.slow import run as run_slow

    started = time.monotonic()
    litellm = any(t.name == "litellm" and t.server is not None for t in bench.targets)
    rows = run_slow(bench.workdir, bench.cpus, hold_s=10.0, litellm=litellm, quick=bench.settings.quick)
    bench.texts["slow"] = markdown(rows, 10.0, time.monotonic() - started)


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "small": small_answers,
    "large": large_answers,
    "stream": streaming,
    "edits": edits,
    "async": async_mode,
    "workers": workers,
    "requestlog": request_log,
    "hangups": hang_ups,
    "moderation": moderation,
    "slow": slow_upstream,
}
