"""``python -m bench.ab REV``: CPU per request of commit REV against the working tree (issue 25).

Both gateways run at once, on the same core, in front of one fake upstream, and the measurement
runs alternate between them (REV, tree, tree, REV, …), so a change in the machine's load lands on
both alike. On a shared machine consecutive runs of the same code differ by ±10% in CPU per
request (cache and frequency contention), which a before-then-after pair mistakes for an effect;
interleaving is what makes a few percent visible at all.

REV is exported with ``git archive`` into a temporary directory, whose ``app`` package the first
gateway runs (``python -m app`` from that directory).

``--config JSON`` instead compares two configurations of the working tree: the second gateway gets
the JSON's sections merged in (``python -m bench.ab --config '{"console": {"request_log": false}}'``
measures what the request log costs a request, issue 26).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench import cpu, servers
from bench.scenarios import LARGE, SMALL


def export(rev: str, into: Path) -> Path:
    """The tree of ``rev`` under ``into`` (its app/ and the models file the gateway reads)."""
    archive = subprocess.run(
        ["git", "-C", str(servers.ROOT), "archive", rev, "app"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", help="the commit to compare the working tree with (e.g. HEAD~1)")
    parser.add_argument(
        "--config", help="compare the tree with itself, this JSON's sections merged into the second"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--large", action="store_true", help="one 3.5 MB image per answer instead of a tiny one"
    )
    args = parser.parse_args(argv)
    body, what = (LARGE, "one 3.5 MB image") if args.large else (SMALL, "small answers")
    if (args.rev is None) == (args.config is None):
        parser.error("give either REV or --config")
    variant: dict[str, Any] | None = orjson.loads(args.config) if args.config else None

    cpus = servers.Cpus.split()
    os.sched_setaffinity(0, cpus.load)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-ab-"))
    base = export(args.rev, Path(tempfile.mkdtemp(prefix="gateway-ab-rev-"))) if args.rev else servers.ROOT
    started: list[servers.Server] = []
    tree_root = servers.ROOT
    try:
        started.append(servers.start_upstream(workdir, cpus, pace_ms=10))
        # start_gateway runs `python -m app` from servers.ROOT: pointed at the export for the first.
        servers.ROOT = base
        try:
            started.append(servers.start_gateway(workdir, cpus, started[0]))
        finally:
            servers.ROOT = tree_root
        started.append(servers.start_gateway(workdir, cpus, started[0], extra=variant))
        gateways = {args.rev or "tree": started[1], "tree" if args.rev else "variant": started[2]}
        for gateway in gateways.values():
            asyncio.run(
                cpu.fire(
                    gateway.base_url + "/images/generations",
                    body,
                    gateway.headers(),
                    total=300,
                    concurrency=args.concurrency,
                )
            )
        figures: dict[str, list[float]] = {name: [] for name in gateways}
        for run in range(args.runs):
            order = list(gateways) if run % 2 == 0 else list(reversed(gateways))
            for name in order:
                gateway = gateways[name]
                result = cpu.measure(
                    gateway.pid,
                    gateway.base_url + "/images/generations",
                    body,
                    gateway.headers(),
                    total=args.requests,
                    concurrency=args.concurrency,
                )
                figures[name].append(result.cpu_ms_per_request)
                print(f"  {name}: {result.cpu_ms_per_request:.3f} ms (errors {result.errors})", flush=True)
        print(
            f"\n{what}, c={args.concurrency}, {args.requests:,} requests x {args.runs}, "
            "gateway CPU ms/request (user+sys, /proc), interleaved:"
        )
        for name, values in figures.items():
            runs = ", ".join(f"{v:.3f}" for v in values)
            print(f"  {name:>10}: median {statistics.median(values):.3f} (runs {runs})")
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if args.rev:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
