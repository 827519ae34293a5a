"""``python -m bench`` (``make bench``): start the targets, run the scenarios, write BENCHMARKS.md.

python -m bench                      # everything; rewrites BENCHMARKS.md (~6-8 min on 2 cores)
python -m bench --only small,stream  # a subset, printed only
python -m bench --quick              # shorter cells, printed only
python -m bench --profile            # also py-spy the gateway during small answers at c=16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.flame import Profile, flame_svg, package_table, top_table
from bench.load import run_wrk
from bench.report import render, results, write_benchmarks
from bench.scenarios import SCENARIOS, SMALL, Bench, Settings, Target
from bench.servers import (
    ROOT,
    Cpus,
    Server,
    Unavailable,
    ensure_tool,
    pinned,
    rss_bytes,
    start_gateway,
    start_litellm,
    start_nginx,
    start_upstream,
)

RESULTS = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="gateway benchmarks (issue 9)")
    parser.add_argument("--only", help=f"comma-separated scenarios among: {', '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="2 s cells, fewer streams")
    parser.add_argument("--duration", type=float, help="seconds per wrk cell (default 5)")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (its install takes ~1 min)")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway under small answers, c=16")
    parser.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md even for a partial run")
    return parser.parse_args(argv)


def start_targets(workdir: Path, cpus: Cpus, started: list[Server], *, litellm: bool) -> list[Target]:
    """Start everything, appending each server to ``started`` at once so a failure stops the rest."""
    print("starting the fake upstream, nginx, the gateway and LiteLLM …", flush=True)
    upstream = start_upstream(workdir, cpus, pace_ms=10)
    started.append(upstream)
    targets = [Target("direct", upstream, memory=False)]
    try:
        started.append(start_nginx(workdir, cpus, upstream))
        targets.append(Target("nginx", started[-1]))
    except Unavailable as exc:
        targets.append(Target("nginx", None, str(exc).splitlines()[0]))

    def restart_gateway() -> Server:
        started.append(start_gateway(workdir, cpus, upstream))
        return started[-1]

    targets.append(Target("gateway", restart_gateway(), restart=restart_gateway))
    if not litellm:
        targets.append(Target("litellm", None, "skipped (--no-litellm)"))
    else:
        try:
            started.append(start_litellm(workdir, cpus, upstream))
            targets.append(Target("litellm", started[-1]))
        except Unavailable as exc:
            print(f"  LiteLLM n/a: {exc}", flush=True)
            targets.append(Target("litellm", None, str(exc).splitlines()[0][:200]))
    for target in targets:
        state = (
            f"{target.server.base_url} (pid {target.server.pid})"
            if target.server
            else f"n/a: {target.reason}"
        )
        print(f"  {target.name:8} {state}", flush=True)
    return targets


def measure_idle(bench: Bench) -> None:
    """RSS of each proxy at rest, after one small request has loaded its lazily imported code."""
    for target in bench.targets:
        if target.server is None or not target.memory:
            continue
        httpx.post(
            target.server.base_url + "/images/generations",
            headers=target.server.headers(),
            json=SMALL,
            timeout=60,
        )
        time.sleep(1.0)
        bench.idle_rss[target.name] = rss_bytes(target.server.pid)
    print(
        "  idle RSS: " + ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in bench.idle_rss.items()), flush=True
    )


def profile(bench: Bench, seconds: float = 8.0) -> None:
    """py-spy the gateway while wrk runs small answers at c=16; keep the raw stacks and a summary."""
    gateway = bench.target("gateway").server
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if gateway is None or bench.wrk is None or not Path(py_spy).exists():
        print("profile skipped: needs the gateway, wrk and py-spy (make install-dev)", flush=True)
        return
    RESULTS.mkdir(exist_ok=True)
    raw = RESULTS / "profile-gateway.txt"
    # --gil: only the thread holding the GIL is sampled, so threads parked in C (aiosqlite's and
    # anyio's workers waiting on their queues) do not pass for busy. SQLAlchemy's sync session code
    # runs in greenlets, whose stacks py-spy shows without the request frames that started them.
    # py-spy pauses the process for each sample (accurate stacks), which slows the gateway down:
    # the profile is for shares of time, not for throughput.
    command = [
        py_spy,
        "record",
        "-p",
        str(gateway.pid),
        "-d",
        f"{seconds:g}",
        "-r",
        "200",
        "--gil",
        "-f",
        "raw",
    ]
    spy = subprocess.Popen(pinned([*command, "-o", str(raw)], bench.cpus.load), stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    result = run_wrk(
        gateway.base_url + "/images/generations",
        body=SMALL,
        headers=gateway.headers(),
        connections=16,
        duration_s=seconds - 1,
        drain_s=2,
        cpus=bench.cpus.load,
        wrk=bench.wrk,
    )
    spy.wait(timeout=60)
    print(f"profile: gateway at {result.rps:,.0f} req/s under py-spy; stacks in {raw}", flush=True)
    stacks = Profile.read(raw)
    summary = f"{stacks.total} samples (GIL held)\n\n{package_table(stacks)}\n\n{top_table(stacks)}\n"
    (RESULTS / "profile-summary.md").write_text(summary)
    (RESULTS / "profile-gateway.svg").write_text(flame_svg(stacks, "gateway, small answers, c=16"))
    print(summary, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [s for s in selected if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {unknown}; choose among {list(SCENARIOS)}", file=sys.stderr)
        return 2
    settings = Settings()
    if args.quick:
        settings = Settings(duration_s=2.0, stream_count=20, quick=True)
    if args.duration:
        settings.duration_s = args.duration
    started = time.monotonic()
    cpus = Cpus.split()
    # This process drives the async client: it belongs with the load, off the servers' core.
    os.sched_setaffinity(0, cpus.load)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    servers: list[Server] = []
    try:
        wrk = ensure_tool("wrk", "wrk")
        if wrk is None:
            print("wrk is not available: the wrk scenarios will read n/a", flush=True)
        targets = start_targets(workdir, cpus, servers, litellm=not args.no_litellm)
        bench = Bench(targets=targets, cpus=cpus, workdir=workdir, settings=settings, wrk=wrk)
        measure_idle(bench)
        for name in selected:
            print(f"scenario {name} …", flush=True)
            SCENARIOS[name](bench)
        if args.profile:
            profile(bench)
        elapsed = time.monotonic() - started
        note = "" if not args.quick else "Quick run (2 s cells): rough figures."
        block = render(bench, elapsed, note)
        print("\n" + results(bench), flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.json").write_text(
            json.dumps(
                {
                    "cells": [dataclasses.asdict(c) for c in bench.cells],
                    "idle_rss": bench.idle_rss,
                    "texts": bench.texts,
                    "elapsed_s": elapsed,
                },
                indent=1,
                default=str,
            )
        )
        (RESULTS / "latest.md").write_text(block)
        if (not args.only and not args.quick) or args.write:
            write_benchmarks(ROOT / "BENCHMARKS.md", block)
            if "slow" in bench.texts:
                from bench.slow import write_section

                write_section(ROOT / "BENCHMARKS.md", bench.texts["slow"])
            print(f"\nBENCHMARKS.md rewritten ({elapsed / 60:.1f} min)", flush=True)
        else:
            print(f"\npartial run: BENCHMARKS.md left alone; see {RESULTS / 'latest.md'}", flush=True)
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
