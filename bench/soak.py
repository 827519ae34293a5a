"""The soak (issue 10): the reliability mix with upstream faults, for a long time, then the books.

    python -m bench.soak --minutes 30          # the real thing (not run by the test suite)
    python -m bench.soak --minutes 1           # a smoke run of the same

A gateway process (SQLite, ``--task-workers`` in-process task workers) in front of the benchmark's
fake upstream (``bench/upstream.py``), which misbehaves on ``--fault-rate`` of its image calls with
every fault kind it has; ``--concurrency`` clients send the reliability mix of ``bench/traffic.py``
(generations, streams, edits, url results, async tasks, each polled to its end by its client)
without pause. Every ``--report-every`` seconds a line gives the requests so far, their rate, the answers that
broke the contract, the task queue and the gateway's resident memory. At the end, once every task
has ended: the ledger invariant (Σ ledger = Σ spend = the catalog price of what the clients saw
complete, nothing reserved), no stuck task, no leftover spool file, and memory growth since the
first report within ``--max-rss-growth``. Exit status 0 when all of that holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.books import expected_micros, ledger_violations, leftover_files, open_tasks
from bench.gateway_process import GatewayProcess, gateway_config, rss_kib
from bench.servers import Cpus, start_upstream
from bench.traffic import Outcome, Traffic, create_key, summary

ADMIN_KEY = "sk-soak-admin-0123456789abcdef0123456789"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to send traffic (default 30)")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of upstream calls that fail")
    parser.add_argument("--report-every", type=float, help="seconds between reports (default: 60, or less)")
    parser.add_argument("--max-rss-growth", type=float, default=1.2, help="final RSS / first report's RSS")
    parser.add_argument("--task-workers", type=int, default=4, help="the gateway's in-process task workers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="keep the database and logs here (default: a temp dir)")
    return parser.parse_args(argv)


def bad_answers(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.unexpected_5xx or o.status == 0 or not o.body_ok]


def soak(args: argparse.Namespace, workdir: Path) -> int:
    duration = args.minutes * 60
    every = args.report_every or min(60.0, max(5.0, duration / 10))
    data_dir, db_url = workdir / "data", f"sqlite+aiosqlite:///{workdir / 'soak.db'}"
    upstream = start_upstream(workdir, Cpus.split(), pace_ms=10, fault_rate=args.fault_rate, seed=args.seed)
    fake = {
        "name": "fake",
        "kind": "openai",
        "base_url": upstream.base_url,
        "api_key": upstream.api_key,
        "models": ["*"],
        # The soak's model (gpt-image-1) is retired; the fake still serves it.
        "follows_retirements": False,
    }
    tasks = {"workers": args.task_workers, "poll_s": 0.1}
    config = gateway_config(fake, data_dir, db_url, admin_key=ADMIN_KEY, tasks=tasks)
    gateway: GatewayProcess | None = None
    try:
        gateway = GatewayProcess(config, workdir).wait_ready()
        key, key_id = create_key(gateway.url, ADMIN_KEY, "soak")
        # The load test's mix; each client polls its async task to the end before its next
        # request, as SDK users do, so the queue holds what is in flight rather than growing
        # whenever submissions outpace the workers.
        traffic = Traffic(gateway.url, key, seed=args.seed, wait_for_tasks=True)
        print(
            f"soak: {args.minutes:g} min at concurrency {args.concurrency}, "
            f"{args.fault_rate:.0%} upstream faults; gateway pid {gateway.proc.pid}, logs in {workdir}"
        )
        columns = ("t (s)", 7), ("requests", 9), ("req/s", 7), ("bad", 5), ("faults", 7), ("queue", 6)
        print(" ".join(f"{name:>{width}}" for name, width in columns), f"{'RSS MiB':>8}")
        started = time.monotonic()
        first_rss, last_rss = 0, 0
        while (elapsed := time.monotonic() - started) < duration:
            asyncio.run(traffic.run(seconds=min(every, duration - elapsed), concurrency=args.concurrency))
            elapsed = time.monotonic() - started
            fired = httpx.get(upstream.base_url + "/_faults", timeout=10).json()["fired"]
            last_rss = rss_kib(gateway.proc.pid)
            first_rss = first_rss or last_rss
            count, bad = len(traffic.outcomes), len(bad_answers(traffic.outcomes))
            print(
                f"{elapsed:7.0f} {count:9d} {count / elapsed:7.1f} {bad:5d} {fired:7d} "
                f"{open_tasks(db_url):6d} {last_rss / 1024:8.1f}",
                flush=True,
            )
        stuck = asyncio.run(traffic.settle_tasks(timeout_s=300))
        return verdict(traffic, key_id, db_url, data_dir, stuck, first_rss, last_rss, args.max_rss_growth)
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


def verdict(
    traffic: Traffic,
    key_id: str,
    db_url: str,
    data_dir: Path,
    stuck: list[Outcome],
    first_rss: int,
    last_rss: int,
    max_growth: float,
) -> int:
    outcomes = traffic.outcomes
    expected = expected_micros(outcomes)
    problems = ledger_violations(db_url, [key_id], expected)
    bad = bad_answers(outcomes)
    if bad:
        problems.append(f"{len(bad)} answers broke the contract, e.g. {bad[:3]}")
    if stuck or open_tasks(db_url):
        problems.append(f"{len(stuck)} tasks never ended, e.g. {[o.task_id for o in stuck[:5]]}")
    left = leftover_files(data_dir)
    if left:
        problems.append(f"{len(left)} spool or task input files left, e.g. {left[:3]}")
    growth = last_rss / first_rss if first_rss else 0.0
    if growth > max_growth:
        problems.append(
            f"RSS grew {growth:.2f}x ({first_rss} KiB -> {last_rss} KiB), more than {max_growth}x"
        )
    print(f"\noutcomes: {summary(outcomes)}")
    print(
        f"billed: {expected} micro-units for {sum(len(o.completed) for o in outcomes)} completed results; "
        f"RSS {first_rss / 1024:.1f} -> {last_rss / 1024:.1f} MiB ({growth:.2f}x)"
    )
    for problem in problems:
        print(f"FAIL {problem}")
    print("soak: OK" if not problems else f"soak: {len(problems)} problem(s)")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return soak(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        return soak(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
