"""Batch throughput and memory: ``python -m bench.batch`` (``make bench-batch``; issue 27, acceptance 6).

One gateway process as shipped (``python -m app serve``, in-process task workers, local image
store) in front of the fast fake upstream (bench/upstream.py, no pacing, a tiny PNG per image), on
SQLite and on PostgreSQL. For each database it runs a batch of 5,000 and one of 20,000 generation
lines through the SDK's path (``POST /v1/files`` with the JSONL streamed from disk, ``POST
/v1/batches``, polling ``GET /v1/batches/{id}``), then streams the output file back and counts its
lines. Reported per cell:

- lines/s: lines over the wall time from ``batches.create`` to the poll that saw ``completed``;
- time to the first completed line (the first poll whose ``request_counts.completed`` > 0);
- the gateway's RSS when idle after start, and its peak (VmHWM) over the whole cell. The peak at
  20,000 lines next to the one at 5,000 shows whether memory grows with the file's size.

Rewrites the batch block of BENCHMARKS.md (``--no-write`` to print only).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.gateway_process import peak_rss_kib, rss_kib
from bench.servers import ROOT, Cpus, Server, start_gateway, start_upstream

BEGIN, END = "<!-- batch-bench:begin -->", "<!-- batch-bench:end -->"
SIZES = (5_000, 20_000)
PG_ADMIN_DSN = os.environ.get("GATEWAY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
# Settings the cells run with, beside the shipped defaults (printed in the block): the batch
# runner looks for work every 0.2 s and keeps up to 256 lines of one key admitted.
SETTINGS: dict[str, Any] = {
    "batches": {"poll_s": 0.2, "max_batch_lines_in_flight": 256},
    "tasks": {"poll_s": 0.2},
}
POLL_S = 0.05


@dataclass
class Cell:
    database: str
    lines: int
    file_mib: float = 0.0
    upload_s: float = 0.0
    wall_s: float = 0.0
    first_line_s: float = 0.0
    rss_idle_mib: float = 0.0
    rss_peak_mib: float = 0.0
    cpu_s: float = 0.0
    # Lines that ended when a cell ran out of its time budget (a partial cell); None when whole.
    ended: int | None = None
    output_lines: int = 0
    failed: int = 0
    note: str = ""

    @property
    def done(self) -> int:
        return self.lines if self.ended is None else self.ended

    @property
    def lines_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s else 0.0

    @property
    def lines_per_cpu_s(self) -> float:
        """Lines per second of the gateway's own CPU time: what the rate would be with a core to
        itself, and far less sensitive to other load on the machine than ``lines_per_s``."""
        return self.done / self.cpu_s if self.cpu_s else 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_input(path: Path, lines: int) -> None:
    """A batch input file written line by line (the bench never holds it in memory either)."""
    sizes = ("1024x1024", "1536x1024", "1024x1536")
    with path.open("wb") as out:
        for i in range(lines):
            body = {"model": "gpt-image-1", "prompt": f"product shot {i}", "size": sizes[i % 3]}
            line = {"custom_id": f"shot-{i}", "method": "POST", "url": "/v1/images/generations", "body": body}
            out.write(json.dumps(line).encode() + b"\n")


async def _pg(sql: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def postgres_database(workdir: Path) -> tuple[str, str]:
    """A fresh database, migrated as an operator would (``python -m app migrate``)."""
    name = "gw_batch_" + secrets.token_hex(4)
    asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"
    config = workdir / f"{name}.json"
    models = str(ROOT / "app" / "defaults" / "models.yaml")
    config.write_text(json.dumps({"database": {"url": url}, "models_file": models}))
    command = [sys.executable, "-m", "app", "--config", str(config), "migrate"]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300, capture_output=True)
    return name, url


def run_cell(
    workdir: Path, cpus: Cpus, upstream: Server, database: str, lines: int, budget_s: float | None = None
) -> Cell:
    """One batch through one fresh gateway. ``budget_s``: stop waiting after this long and keep
    the cell as a partial one (its rate over the lines completed so far, marked as such)."""
    cell = Cell(database, lines)
    extra: dict[str, Any] = dict(SETTINGS)
    pg_name = None
    if database == "PostgreSQL":
        pg_name, url = postgres_database(workdir)
        extra["database"] = {"url": url}
    source = workdir / f"input-{lines}.jsonl"
    if not source.exists():
        write_input(source, lines)
    cell.file_mib = source.stat().st_size / 2**20
    gateway = start_gateway(workdir, cpus, upstream, extra=extra)
    try:
        cell.rss_idle_mib = rss_kib(gateway.pid) / 1024
        cpu_at_start = cpu_seconds(gateway.pid)
        base = gateway.base_url
        auth = {"authorization": f"Bearer {gateway.api_key}"}
        with httpx.Client(headers=auth, timeout=600) as client:
            started = time.monotonic()
            with source.open("rb") as handle:  # httpx streams a file object in chunks
                uploaded = client.post(
                    f"{base}/files", data={"purpose": "batch"}, files={"file": (source.name, handle)}
                )
            uploaded.raise_for_status()
            cell.upload_s = time.monotonic() - started
            started = time.monotonic()
            created = client.post(
                f"{base}/batches",
                json={
                    "input_file_id": uploaded.json()["id"],
                    "endpoint": "/v1/images/generations",
                    "completion_window": "24h",
                },
            )
            created.raise_for_status()
            batch = created.json()
            counts: dict[str, int] = {}
            while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(POLL_S)
                batch = client.get(f"{base}/batches/{batch['id']}").json()
                counts = batch.get("request_counts") or {}
                if not cell.first_line_s and counts.get("completed", 0) > 0:
                    cell.first_line_s = time.monotonic() - started
                if budget_s is not None and time.monotonic() - started > budget_s:
                    break
            cell.wall_s = time.monotonic() - started
            cell.rss_peak_mib = peak_rss_kib(gateway.pid) / 1024
            cell.cpu_s = cpu_seconds(gateway.pid) - cpu_at_start
            if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                # Out of time: the rate is over the lines that ended, and the cell says so.
                ended = counts.get("completed", 0) + counts.get("failed", 0)
                cell.ended = ended
                cell.note = f"partial: {ended:,} of {lines:,} lines ended in the {budget_s:.0f} s budget"
                return cell
            if batch["status"] != "completed":
                cell.note = f"batch {batch['status']}: {batch.get('errors')}"
                return cell
            cell.failed = int(batch["request_counts"]["failed"])
            with client.stream("GET", f"{base}/files/{batch['output_file_id']}/content") as answer:
                answer.raise_for_status()
                for text in answer.iter_lines():
                    cell.output_lines += bool(text.strip())
    finally:
        gateway.stop()
        if pg_name is not None:
            asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
    return cell


def _errors(cell: Cell) -> str:
    return f" + {cell.failed:,} in the error file" if cell.failed else ""


def render(cells: list[Cell], *, load: str) -> str:
    head = [
        BEGIN,
        "",
        "### Batch (issue 27): `make bench-batch`",
        "",
        "One gateway process (in-process task workers, local store) in front of the fast fake upstream;",
        "generation lines of gpt-image-1 at three sizes, uploaded with `POST /v1/files`, run with",
        "`POST /v1/batches`, polled every 50 ms. lines/s is over the wall time from `batches.create`",
        "to `completed`; *first line* is when `request_counts.completed` first exceeded 0. RSS is the",
        "gateway's: idle after start, and its peak (VmHWM) over the cell. lines/CPU-s divides by the",
        "gateway's own CPU time over the batch (all threads), which depends far less on the machine's",
        "other load than lines/s does. The prompts are `product shot <n>`: the default moderation",
        "blocks n = 1488 (a hate code), so one line per file lands in the error file, as it should.",
        "Settings beside the defaults:",
        f"`{json.dumps(SETTINGS)}`.",
        "",
        f"Machine: {load}",
        "",
        "| database | lines | file | upload | lines/s | lines/CPU-s | first line | wall "
        "| RSS idle | RSS peak | output |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for c in cells:
        if c.note and not c.note.startswith("partial"):
            rows.append(f"| {c.database} | {c.lines:,} | | | | | | | | | {c.note} |")
            continue
        rows.append(
            f"| {c.database} | {c.lines:,} | {c.file_mib:.1f} MiB | {c.upload_s:.1f} s | "
            f"{c.lines_per_s:,.1f} | {c.lines_per_cpu_s:,.0f} | {c.first_line_s:.1f} s | {c.wall_s:.0f} s | "
            f"{c.rss_idle_mib:.0f} MiB | {c.rss_peak_mib:.0f} MiB | "
            + (f"{c.note} |" if c.note else f"{c.output_lines:,} lines{_errors(c)} |")
        )
    growth = []
    for database in ("SQLite", "PostgreSQL"):
        peaks = {
            c.lines: c.rss_peak_mib
            for c in cells
            if c.database == database and (not c.note or c.ended is not None)
        }
        if len(peaks) >= 2:
            small, large = min(peaks), max(peaks)
            growth.append(
                f"{database}: peak RSS {peaks[small]:.0f} MiB at {small:,} lines, "
                f"{peaks[large]:.0f} MiB at {large:,}"
            )
    tail = ["", "Memory against the file's size: " + "; ".join(growth) + "." if growth else "", "", END]
    return "\n".join([*head, *rows, *tail])


def write(block: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    return f"{cores} cores, load average {one:.1f} (1 min) / {five:.1f} (5 min) when the run started"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--databases", default="SQLite,PostgreSQL", help="comma-separated")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated line counts")
    parser.add_argument("--cells-out", type=Path, help="append each finished cell to this file (JSON lines)")
    parser.add_argument(
        "--render", type=Path, nargs="+", help="render the cells saved in these files; run nothing"
    )
    parser.add_argument("--load", help="with --render: the machine line to print")
    parser.add_argument("--budget-s", type=float, help="stop a cell after this long and report it as partial")
    args = parser.parse_args(argv)
    if args.render:
        saved = [json.loads(text) for path in args.render for text in path.read_text().splitlines() if text]
        for cell in saved:
            cell.pop("load", None)
        order = {"SQLite": 0, "PostgreSQL": 1}
        restored = sorted((Cell(**c) for c in saved), key=lambda c: (order.get(c.database, 2), c.lines))
        block = render(restored, load=args.load or machine_load())
        print(block)
        if not args.no_write:
            write(block)
        return
    load = machine_load()
    cpus = Cpus.split()
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        workdir = Path(tmp)
        upstream = start_upstream(workdir, cpus, pace_ms=0)
        try:
            for database in args.databases.split(","):
                for lines in (int(n) for n in args.sizes.split(",")):
                    print(f"{database}, {lines:,} lines …", flush=True)
                    try:
                        cell = run_cell(workdir, cpus, upstream, database, lines, args.budget_s)
                    except Exception as exc:  # one broken cell (no PostgreSQL) leaves the rest
                        cell = Cell(database, lines, note=f"{type(exc).__name__}: {str(exc)[:80]}")
                    print(f"  {cell}", flush=True)
                    cells.append(cell)
                    if args.cells_out:
                        with args.cells_out.open("a") as out:
                            out.write(json.dumps({**dataclasses.asdict(cell), "load": load}) + "\n")
        finally:
            upstream.stop()
    block = render(cells, load=load)
    print(block)
    if not args.no_write:
        write(block)


if __name__ == "__main__":
    main()
