"""Console page latency at 100,000 request-log entries: ``python -m bench.console``
(``make bench-console``).

Starts the gateway as shipped (``python -m app serve``, SQLite, the `local` backend), seeds 100,000
request-log entries and 10,000 ledger rows over 30 days for 50 keys (plus tasks, moderation
events, thumbnails and webhook deliveries), signs in as
the operator and as a tenant, and times each page: 5 warm-up views, then 50 sequential ones.
Two references in the same run: ``/healthz`` (the floor of an HTTP round trip through the
gateway) and ``GET /admin/usage`` (the JSON API that the usage page draws). It also prints
SQLite's plan for each list query, to show they walk an index instead of scanning the table.
Rewrites the console block of BENCHMARKS.md (``--no-write`` to print only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- console-bench:begin -->", "<!-- console-bench:end -->"
ROWS, KEYS, VIEWS, WARMUP = 10_000, 50, 50, 5
LOG_ROWS, DELIVERIES = 100_000, 2_000
# Batches (all ended, so no runner picks them up) and the lines of the one whose page is timed.
BATCHES, BATCH_LINES = 1_000, 50_000
# The request log's status classes, in the shares a busy gateway might see.
LOG_MIX = [(200, "ok", None)] * 16 + [
    (400, "4xx", "invalid_value"),
    (429, "4xx", "rate_limit_exceeded"),
    (502, "5xx", "upstream_error"),
    (400, "blocked", "moderation_blocked"),
]
ADMIN = "bench-console-admin-" + "0" * 16


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    config = {
        "admin_key": ADMIN,
        "data_dir": str(data),
        "database": {"url": f"sqlite+aiosqlite:///{data}/gateway.db"},
        "storage": {"kind": "local", "path": str(data / "images")},
        "models_file": str(ROOT / "app" / "defaults" / "models.yaml"),
        "logging": {"level": "WARNING", "json": True},
        "tasks": {"workers": 0},
        "upstreams": [{"name": "local", "kind": "local", "models": ["*"]}],
    }
    path = data / "gateway.yaml"
    path.write_text(json.dumps(config))
    command = [
        sys.executable,
        "-m",
        "app",
        "serve",
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = open(data / "gateway.log", "wb")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the gateway did not start; see " + str(data / "gateway.log"))


def seed(db: Path, key_ids: list[str]) -> dict[str, str]:
    """10,000 ledger rows over 30 days, 2,000 tasks, 500 moderation events, 1,000 thumbnails."""
    rng = random.Random(7)
    now = datetime.now(UTC).replace(tzinfo=None)
    models = ["gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini", "dall-e-3"]
    ledger, tasks, events, thumbs = [], [], [], []
    for i in range(ROWS):
        at = now - timedelta(seconds=rng.randrange(30 * 86400))
        status = "succeeded" if rng.random() > 0.04 else "failed"
        key = key_ids[i % len(key_ids)] if i % 10 else key_ids[0]  # key 0: a heavy tenant
        ledger.append(
            (
                f"req_{i:024x}",
                key,
                rng.choice(models),
                "local",
                "generations",
                status,
                1,
                9,
                0,
                0,
                272,
                10_925 if status == "succeeded" else 0,
                0,
                rng.randrange(80, 900),
                at.isoformat(sep=" "),
            )
        )
        if i % 10 == 1:
            thumbs.append((f"req_{i:024x}", key, f"img_{i:032x}.webp", 0, 128, 128, at.isoformat(sep=" ")))
    for i in range(2_000):
        at = now - timedelta(seconds=rng.randrange(30 * 86400))
        tasks.append(
            (
                f"task_{i:024x}",
                key_ids[i % len(key_ids)],
                f"req_t{i:023x}",
                "generations",
                "gpt-image-1",
                rng.choice(["succeeded", "succeeded", "failed", "queued"]),
                "{}",
                "url",
                at.isoformat(sep=" "),
            )
        )
    for i in range(500):
        at = now - timedelta(seconds=rng.randrange(30 * 86400))
        events.append(
            (
                f"req_m{i:023x}",
                key_ids[i % len(key_ids)],
                "input",
                "auto",
                "classifier",
                '["violence"]',
                '["gore"]',
                "0" * 64,
                at.isoformat(sep=" "),
            )
        )
    log = []
    for i in range(LOG_ROWS):
        at = now - timedelta(seconds=rng.randrange(30 * 86400))
        http_status, status_class, code = rng.choice(LOG_MIX)
        key = key_ids[i % len(key_ids)]
        log.append(
            (
                at.isoformat(sep=" "),
                f"req_l{i:027x}",
                key,
                f"tenant-{i % len(key_ids)}",
                "POST",
                "/v1/images/generations",
                rng.choice(models),
                http_status,
                status_class,
                code,
                f"Invalid value: '{i}x{i}'. Supported values are: 'auto', '1024x1024'." if code else None,
                "local" if status_class != "4xx" else None,
                rng.randrange(80, 900),
                4160 if http_status == 200 else 0,
                10_925 if http_status == 200 else 0,
                f"{i:064x}",
            )
        )
    deliveries = [
        (
            f"msg_{i:028x}",
            "we_bench",
            key_ids[0],
            f"task_{i:024x}",
            "image.task.succeeded",
            "{}",
            rng.choice(["pending", "delivered", "failed"]),
            rng.randrange(1, 8),
            now.isoformat(sep=" "),
            (now + timedelta(days=3)).isoformat(sep=" "),
            rng.choice([200, 500, 502]),
            (now - timedelta(seconds=rng.randrange(30 * 86400))).isoformat(sep=" "),
        )
        for i in range(DELIVERIES)
    ]
    batches = [
        (
            f"batch_{i:024x}",
            key_ids[i % len(key_ids)],
            "/v1/images/generations",
            f"file-{i:024x}",
            "24h",
            "completed",
            BATCH_LINES if i == 0 else 10,
            BATCH_LINES - 100 if i == 0 else 10,
            100 if i == 0 else 0,
            "http://127.0.0.1",
            (now - timedelta(seconds=rng.randrange(30 * 86400))).isoformat(sep=" "),
            (now + timedelta(days=1)).isoformat(sep=" "),
        )
        for i in range(BATCHES)
    ]
    lines = [
        (batches[0][0], i, f"line-{i}", '{"prompt": "a lighthouse"}', "ok" if i >= 100 else "error")
        for i in range(BATCH_LINES)
    ]
    with sqlite3.connect(db) as c:
        c.executemany(
            "INSERT INTO batches (id, key_id, endpoint, input_file_id, completion_window, status, total,"
            " completed, failed, base_url, created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            batches,
        )
        c.executemany(
            "INSERT INTO batch_lines (batch_id, line, custom_id, body, state) VALUES (?,?,?,?,?)", lines
        )
        c.executemany(
            "INSERT INTO request_log (created_at, request_id, key_id, key_name, method, route, model,"
            " status, status_class, error_code, error_message, upstream, latency_ms, tokens, cost_micros,"
            " prompt_sha256) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            log,
        )
        c.execute(
            "INSERT INTO webhook_endpoints (id, key_id, url, secret, enabled, created_at)"
            " VALUES ('we_bench', ?, 'https://hooks.example/bench', 'whsec_x', 0, ?)",
            (key_ids[0], now.isoformat(sep=" ")),
        )
        c.executemany(
            "INSERT INTO webhook_deliveries (id, endpoint_id, key_id, task_id, event_type, snapshot, status,"
            " attempts, next_attempt_at, give_up_at, last_status_code, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            deliveries,
        )
        c.executemany(
            "INSERT INTO ledger_entries (request_id, key_id, model, upstream, endpoint, status, images,"
            " text_input_tokens, image_input_tokens, text_output_tokens, image_output_tokens, cost_micros,"
            " estimated, latency_ms, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            ledger,
        )
        c.executemany(
            "INSERT INTO request_thumbnails (request_id, key_id, image, position, width, height, created_at)"
            " VALUES (?,?,?,?,?,?,?)",
            thumbs,
        )
        c.executemany(
            "INSERT INTO tasks (id, key_id, request_id, endpoint, model, status, spec, response_format,"
            " created_at, hold_micros, attempts, cost_micros) VALUES (?,?,?,?,?,?,?,?,?,0,0,0)",
            tasks,
        )
        c.executemany(
            "INSERT INTO moderation_events (request_id, key_id, stage, level, checker, categories, rules,"
            " prompt_sha256, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            events,
        )
        middle = c.execute(
            "SELECT id FROM ledger_entries ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET 5000"
        )
        anchor = str(middle.fetchone()[0])
        middle = c.execute(
            "SELECT id FROM request_log ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET 50000"
        )
        log_anchor = str(middle.fetchone()[0])
    return {
        "anchor": anchor,
        "log_anchor": log_anchor,
        "request": f"req_l{4321:027x}",
        "batch": batches[0][0],
    }


def plans(db: Path, key_id: str) -> list[tuple[str, str]]:
    """SQLite's plan for the console's list queries (the SQL the ORM sends, parameters inlined)."""
    queries = {
        "request log, all keys": "SELECT * FROM request_log ORDER BY created_at DESC, id DESC LIMIT 51",
        "request log, one key": f"SELECT * FROM request_log WHERE key_id = '{key_id}' "
        "ORDER BY created_at DESC, id DESC LIMIT 51",
        "request log, one status class": "SELECT * FROM request_log WHERE status_class = '5xx' "
        "ORDER BY created_at DESC, id DESC LIMIT 51",
        "last use of a key": f"SELECT max(created_at) FROM request_log WHERE key_id = '{key_id}'",
        "usage by day, 30 days": "SELECT substr(created_at, 1, 10) AS d, count(id), sum(cost_micros) FROM "
        "ledger_entries WHERE created_at >= datetime('now', '-30 days') GROUP BY d",
        "tasks, all keys": "SELECT * FROM tasks ORDER BY created_at DESC, id DESC LIMIT 51",
        "batches, all keys": "SELECT * FROM batches ORDER BY created_at DESC, id DESC LIMIT 51",
        "a batch's lines by state": "SELECT state, count(*) FROM batch_lines WHERE batch_id = 'b' "
        "GROUP BY state",
        "thumbnails of a page": "SELECT * FROM request_thumbnails WHERE request_id IN ('a', 'b')",
    }
    out = []
    with sqlite3.connect(db) as c:
        for name, sql in queries.items():
            rows = c.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            out.append((name, "; ".join(str(r[-1]) for r in rows)))
    return out


def sign_in(url: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
    response = client.post("/console/login", data={"api_key": key})
    assert response.status_code == 303, response.text
    return client


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(
    client: httpx.Client, path: str, pid: int, headers: dict[str, str] | None = None
) -> dict[str, float]:
    started = time.perf_counter()
    assert client.get(path, headers=headers).status_code == 200, path
    first = (time.perf_counter() - started) * 1000  # cold: caches empty
    for _ in range(WARMUP - 1):
        assert client.get(path, headers=headers).status_code == 200, path
    cpu_before = cpu_seconds(pid)
    samples = []
    for _ in range(VIEWS):
        started = time.perf_counter()
        response = client.get(path, headers=headers)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, path
    cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / VIEWS
    samples.sort()
    return {
        "cpu": cpu_ms,
        "first": first,
        "median": statistics.median(samples),
        "p95": samples[int(len(samples) * 0.95) - 1],
        "max": samples[-1],
        "bytes": len(response.content),
    }


def run() -> str:
    data = Path(tempfile.mkdtemp(prefix="console-bench-"))
    process, url = start(data)
    try:
        admin = {"authorization": f"Bearer {ADMIN}"}
        made = [
            httpx.post(
                url + "/admin/keys", headers=admin, json={"name": f"tenant-{i}", "owner": f"org-{i % 7}"}
            ).json()
            for i in range(KEYS)
        ]
        key_ids = [k["id"] for k in made]
        seeded = seed(data / "gateway.db", key_ids)
        operator, tenant = sign_in(url, ADMIN), sign_in(url, made[0]["key"])
        today = datetime.now(UTC).date()
        span = f"from={(today - timedelta(days=29)).isoformat()}&to={(today + timedelta(days=1)).isoformat()}"
        cases: list[tuple[str, str, httpx.Client, str, dict[str, str] | None]] = [
            ("reference", "GET /healthz", operator, "/healthz", None),
            (
                "reference",
                "GET /admin/usage?group_by=day (JSON API)",
                operator,
                f"/admin/usage?{span}&group_by=day",
                admin,
            ),
            ("operator", "overview (14 days, 5 charts)", operator, "/console/overview", None),
            ("operator", "usage (30 days, 4 charts)", operator, "/console/usage", None),
            ("operator", "usage CSV (30 days)", operator, "/console/usage.csv?" + span, None),
            ("operator", "requests, newest 50", operator, "/console/requests", None),
            (
                "operator",
                "requests, filtered by model + status",
                operator,
                "/console/requests?model=dall-e-3&status=5xx",
                None,
            ),
            (
                "operator",
                "requests, halfway down (keyset)",
                operator,
                f"/console/requests?before={seeded['log_anchor']}",
                None,
            ),
            (
                "operator",
                "requests, search by key name",
                operator,
                "/console/requests?q=tenant-7",
                None,
            ),
            (
                "operator",
                "requests, search by error text",
                operator,
                "/console/requests?q=%271234x1234%27",
                None,
            ),
            ("operator", "request detail", operator, f"/console/requests/{seeded['request']}", None),
            ("operator", "keys (50, budget bars, last use)", operator, "/console/keys", None),
            ("operator", "webhook deliveries (newest 200)", operator, "/console/webhooks", None),
            ("operator", "a key's webhook endpoints", operator, f"/console/keys/{key_ids[0]}/webhooks", None),
            ("operator", "tasks, newest 50", operator, "/console/tasks", None),
            ("operator", f"batches, newest 50 (of {BATCHES:,})", operator, "/console/batches", None),
            (
                "operator",
                f"batch detail ({BATCH_LINES:,} lines)",
                operator,
                f"/console/batches/{seeded['batch']}",
                None,
            ),
            ("operator", "moderation events", operator, "/console/moderation", None),
            ("operator", "upstreams", operator, "/console/upstreams", None),
            ("tenant", "usage (own key, 1,000 rows)", tenant, "/console/usage", None),
            ("tenant", "requests, own newest 50", tenant, "/console/requests", None),
            ("tenant", "tasks, own", tenant, "/console/tasks", None),
            ("tenant", "batches, own", tenant, "/console/batches", None),
            ("tenant", "playground", tenant, "/console/playground", None),
        ]
        results = [
            (who, name, timed(client, path, process.pid, headers))
            for who, name, client, path, headers in cases
        ]
        load = os.getloadavg()
        load = os.getloadavg()
        query_plans = plans(data / "gateway.db", key_ids[0])
        slowest = max(r["p95"] for who, _, r in results if who != "reference")
    finally:
        process.terminate()
        process.wait(timeout=30)
    lines = [
        f"`python -m bench.console` ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC): the gateway as shipped",
        f"(SQLite, one worker), {LOG_ROWS:,} request-log entries and {ROWS:,} ledger rows over 30 days",
        f"for {KEYS} keys, 2,000 tasks, 500 moderation events, {DELIVERIES:,} webhook deliveries, "
        f"{BATCHES:,} batches (one of {BATCH_LINES:,} lines);",
        f"{WARMUP} warm-up views then {VIEWS} sequential views per page from one client on loopback.",
        "Wall-clock times (ms) are what the client saw (*first view*: the first warm-up, with the",
        "console's day cache empty); *CPU/view* is the gateway process's user+system",
        "CPU time over the 50 views divided by 50 (from /proc, 10 ms ticks), which waiting for a busy",
        f"CPU does not inflate. Load average during the run: {load[0]:.1f} on 2 cores (other work on",
        "the machine).",
        "",
        "| who | page | CPU/view | first view | median | p95 | max | bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for who, name, r in results:
        lines.append(
            f"| {who} | {name} | {r['cpu']:.1f} | {r['first']:.1f} | {r['median']:.1f} | {r['p95']:.1f} "
            f"| {r['max']:.1f} "
            f"| {int(r['bytes']):,} |"
        )
    lines += ["", f"Slowest console page p95: {slowest:.1f} ms (target: under 100 ms)."]
    lines += ["", "SQLite's plans for the list queries:", "", "| query | plan |", "|---|---|"]
    lines += [f"| {name} | `{plan}` |" for name, plan in query_plans]
    return "\n".join(lines)


def write(block: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    section = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Console (issue 18)\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    block = run()
    print(block)
    if not args.no_write:
        write(block)


if __name__ == "__main__":
    main()
