"""``python -m bench.profile`` (``make bench-profile``): where the gateway's CPU goes (issue 25).

1. CPU per request: the gateway's user+system CPU seconds (its children included, from /proc)
   over a fixed number of requests, three times, median reported; small answers at c=16 and one
   3.5 MB image at c=4. CPU time, unlike throughput, does not depend on how busy the machine is.
2. py-spy (``--gil``: only the thread holding the GIL counts, so worker threads parked in C do not
   pass for busy) records the gateway under the small-answer load, then under the large-answer
   load: a flame graph SVG, the collapsed stacks and a table of the top 25 self-time frames
   grouped by module, per load, under bench/results/.

py-spy stops the process for each sample, so requests are slower while it records: its shares
are meaningful, the request rates during the recording are not (and are not reported).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import cpu
from bench.flame import Profile, flame_svg, package_table, top_table
from bench.scenarios import LARGE, SMALL
from bench.servers import ROOT, Cpus, Server, pinned, start_gateway, start_upstream

RESULTS = ROOT / "bench" / "results"


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(p) for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), None
    )


def record(
    spy: str, gateway: Server, name: str, body: dict[str, object], *, total: int, concurrency: int, cpus: Cpus
) -> Profile:
    """py-spy on the gateway while ``total`` requests of ``body`` run; stopped (SIGINT, which makes
    py-spy write what it has) once they are done, so every run samples the same work."""
    raw = RESULTS / f"profile-{name}.txt"
    command = [
        spy,
        "record",
        "-p",
        str(gateway.pid),
        "-d",
        "3600",
        "-r",
        "250",
        "--gil",
        "--nolineno",
    ]
    # Not --nonblocking: reading a running process races with its GIL hand-overs, and such a run
    # charged 30% of the samples to aiosqlite's thread, which waits in sqlite3 without the GIL
    # (2.5% when the process is paused for each sample).
    command += ["-f", "raw", "-o", str(raw)]
    recorder = subprocess.Popen(pinned(command, cpus.load), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    asyncio.run(
        cpu.fire(
            gateway.base_url + "/images/generations",
            body,
            gateway.headers(),
            total=total,
            concurrency=concurrency,
        )
    )
    recorder.send_signal(signal.SIGINT)
    _, err = recorder.communicate(timeout=120)
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
    profile = Profile.read(raw)
    (RESULTS / f"profile-{name}.svg").write_text(flame_svg(profile, f"gateway, {name} answers"))
    return profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="small requests per CPU run")
    parser.add_argument("--large-requests", type=int, default=200, help="large requests per CPU run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-spy", action="store_true", help="CPU per request only")
    parser.add_argument("--cpu-only-small", action="store_true", help="skip the large CPU series")
    parser.add_argument("--no-cpu", action="store_true", help="py-spy only")
    args = parser.parse_args(argv)

    RESULTS.mkdir(exist_ok=True)
    cpus = Cpus.split()
    os.sched_setaffinity(0, cpus.load)
    spy = None if args.no_spy else py_spy()
    if not args.no_spy and spy is None:
        print("py-spy is missing (make install-dev installs it): CPU per request only", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    servers: list[Server] = []
    try:
        servers.append(start_upstream(workdir, cpus, pace_ms=10))
        servers.append(start_gateway(workdir, cpus, servers[0]))
        gateway = servers[-1]
        url = gateway.base_url + "/images/generations"
        series = (
            []
            if args.no_cpu
            else [
                cpu.repeat(
                    "small answers, c=16",
                    gateway.pid,
                    url,
                    SMALL,
                    gateway.headers(),
                    total=args.requests,
                    concurrency=16,
                    times=args.runs,
                )
            ]
        )
        if not args.cpu_only_small and not args.no_cpu:
            series.append(
                cpu.repeat(
                    "1 image 3.5 MB, c=4",
                    gateway.pid,
                    url,
                    LARGE,
                    gateway.headers(),
                    total=args.large_requests,
                    concurrency=4,
                    times=args.runs,
                    warmup=20,
                )
            )
        cpu_table = cpu.table(series)
        sections = [
            "CPU per request: the gateway's user+system CPU seconds (children included, /proc) over a "
            "fixed request count, divided by it; median of the runs. Measured by CPU time, so the "
            "machine's other load does not enter the figure.\n\n" + cpu_table
        ]
        print(cpu_table, flush=True)
        if spy is not None:
            for name, body, total, concurrency in (
                ("small", SMALL, 2000, 16),
                ("large", LARGE, 100, 4),
            ):
                profile = record(spy, gateway, name, body, total=total, concurrency=concurrency, cpus=cpus)
                text = (
                    f"### {name} answers: {profile.total} samples (GIL held), "
                    f"flame graph in bench/results/profile-{name}.svg\n\n"
                    f"{package_table(profile)}\n\n{top_table(profile)}"
                )
                sections.append(text)
                print("\n" + text, flush=True)
        (RESULTS / "profile.md").write_text("\n\n".join(sections) + "\n")
        print(f"\nwritten under {RESULTS.relative_to(ROOT)}/", flush=True)
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
