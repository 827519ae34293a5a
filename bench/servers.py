"""Start and stop the processes under test: fake upstream, gateway, nginx, LiteLLM; read their memory.

Every server is pinned to the "server" CPUs and the load (wrk, the async client, the fake upstream)
to the others, so the system under test never shares a core with what measures it. Each process
is started in its own session and stopped by its process group id, so nginx workers and uvicorn
children go with their parent.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
MODEL = "gpt-image-1"
UPSTREAM_KEY = "sk-bench-upstream"
LITELLM_MASTER_KEY = "sk-litellm-bench"


class Unavailable(RuntimeError):
    """A competitor could not be installed or started; its columns read n/a with this reason."""


@dataclass(frozen=True)
class Cpus:
    server: tuple[int, ...]
    load: tuple[int, ...]

    @classmethod
    def split(cls) -> Cpus:
        """The last core for load, the rest for servers (one core each way on a 2-core machine)."""
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            return cls(server=tuple(cores), load=tuple(cores))
        return cls(server=tuple(cores[:-1]), load=(cores[-1],))


def pinned(command: Sequence[str], cpus: Sequence[int]) -> list[str]:
    """``command`` run through ``taskset`` (which execs, so the pid stays the command's own)."""
    if shutil.which("taskset") is None:
        return list(command)
    return ["taskset", "-c", ",".join(map(str, cpus)), *command]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A started process and how to reach it as an OpenAI base URL."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    api_key: str
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}", "content-type": "application/json"}

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=5)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(
    name: str, command: list[str], workdir: Path, *, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return process, log


def _wait_http(server: Server, path: str, timeout_s: float, *, headers: dict[str, str] | None = None) -> None:
    """Poll ``path`` until any HTTP answer below 500 comes back."""
    deadline = time.monotonic() + timeout_s
    url = server.base_url.removesuffix("/v1") + path
    while time.monotonic() < deadline:
        if not server.alive():
            raise Unavailable(f"{server.name} exited at start:\n{server.tail()}")
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise Unavailable(f"{server.name} did not answer {path} within {timeout_s:.0f} s:\n{server.tail()}")


# -- fake upstream ----------------------------------------------------------------------------------


def start_upstream(
    workdir: Path, cpus: Cpus, *, pace_ms: float, hold_s: float = 0.0, fault_rate: float = 0.0, seed: int = 0
) -> Server:
    command = [sys.executable, "-m", "bench.upstream", "--port", "0", "--pace-ms", str(pace_ms)]
    command += ["--hold-s", str(hold_s), "--fault-rate", str(fault_rate), "--seed", str(seed)]
    process, log = _spawn("upstream", pinned(command, cpus.load), workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        text = log.read_text()
        if text.startswith("PORT "):
            port = int(text.split()[1])
            return Server("upstream", process, f"http://127.0.0.1:{port}/v1", UPSTREAM_KEY, log)
        time.sleep(0.05)
    raise RuntimeError(f"the fake upstream did not start:\n{log.read_text()}")


# -- gateway ----------------------------------------------------------------------------------------


def start_gateway(
    workdir: Path,
    cpus: Cpus,
    upstream: Server,
    *,
    workers: int = 1,
    extra: dict[str, Any] | None = None,
) -> Server:
    """The gateway as shipped (one worker unless told otherwise, SQLite, local storage) with logs at
    WARNING, in front of the fake upstream only; then one tenant key made through the admin API.
    ``extra``: config sections to merge in (the slow scenario's task settings, PostgreSQL)."""
    # A fresh data dir per start: a restarted gateway must not inherit a locked database.
    data = Path(tempfile.mkdtemp(prefix="gateway-data-", dir=workdir))
    port = free_port()
    admin_key = "bench-admin-" + secrets.token_hex(16)
    config = {
        "admin_key": admin_key,
        "data_dir": str(data),
        "database": {"url": f"sqlite+aiosqlite:///{data}/gateway.db"},
        "storage": {"kind": "local", "path": str(data / "images")},
        "models_file": str(ROOT / "app" / "defaults" / "models.yaml"),
        "server": {"host": "127.0.0.1", "port": port, "workers": workers},
        "logging": {"level": "WARNING", "json": True},
        "upstreams": [
            {
                "name": "fake",
                "kind": "openai",
                "base_url": upstream.base_url,
                "api_key": upstream.api_key,
                "models": ["*"],
                "timeout_s": 300,
                # The benchmark's model (gpt-image-1) is retired; the fake still serves it.
                "follows_retirements": False,
            }
        ],
    }
    config.update(extra or {})
    path = data / "gateway.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    command = [sys.executable, "-m", "app", "serve", "--config", str(path), "--host", "127.0.0.1"]
    process, log = _spawn("gateway", pinned([*command, "--port", str(port)], cpus.server), data)
    server = Server("gateway", process, f"http://127.0.0.1:{port}/v1", "", log)
    _wait_http(server, "/healthz", 60)
    answer = httpx.post(
        f"http://127.0.0.1:{port}/admin/keys",
        headers={"authorization": f"Bearer {admin_key}"},
        json={"name": "bench"},
        timeout=10,
    )
    answer.raise_for_status()
    server.api_key = answer.json()["key"]
    server.extra["admin_key"] = admin_key
    return server


# -- nginx ------------------------------------------------------------------------------------------


def ensure_tool(binary: str, package: str) -> str | None:
    """The path of ``binary``, installing Debian's ``package`` when running as root; None if not."""
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    print(f"  installing {package} with apt-get …", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    for attempt in range(2):
        done = subprocess.run(install, env=env, capture_output=True, timeout=300, check=False)
        if done.returncode == 0:
            break
        if attempt == 0:  # a fresh machine may have no package lists yet
            subprocess.run(
                ["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300, check=False
            )
    return shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        # Uploads stream through as they arrive, like the gateway's spooling relay.
        client_max_body_size 0;
        proxy_request_buffering off;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
            # Answers are relayed through memory buffers, never spilled to temp files (the worker
            # runs as an unprivileged user and the point is the floor, not disk I/O); SSE answers
            # carry X-Accel-Buffering: no and go through unbuffered.
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, cpus: Cpus, upstream: Server) -> Server:
    binary = ensure_tool("nginx", "nginx-light")
    if binary is None:
        raise Unavailable("nginx is not installed and could not be installed")
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    upstream_port = int(upstream.base_url.rsplit(":", 1)[1].split("/")[0])
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, upstream_port=upstream_port))
    process, log = _spawn("nginx", pinned([binary, "-c", str(conf), "-p", str(prefix)], cpus.server), workdir)
    server = Server("nginx", process, f"http://127.0.0.1:{port}/v1", upstream.api_key, log)
    _wait_http(server, "/v1/models", 15)
    return server


# -- LiteLLM ----------------------------------------------------------------------------------------


def ensure_litellm(timeout_s: float = 420) -> Path:
    """``litellm`` from its own venv (bench/.venv-litellm), created and filled from PyPI on first use."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    print("  installing litellm[proxy] into bench/.venv-litellm (first run only) …", flush=True)
    try:
        if not (LITELLM_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True, timeout=120)
        pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "litellm[proxy]"]
        done = subprocess.run(pip, capture_output=True, timeout=timeout_s, check=False)
    except (subprocess.SubprocessError, OSError) as exc:
        raise Unavailable(f"could not install litellm: {exc}") from exc
    if done.returncode != 0 or not binary.exists():
        raise Unavailable(
            "pip install 'litellm[proxy]' failed: " + done.stderr.decode(errors="replace")[-400:]
        )
    return binary


def start_litellm(workdir: Path, cpus: Cpus, upstream: Server) -> Server:
    binary = ensure_litellm()
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": upstream.base_url,
                    "api_key": upstream.api_key,
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
        "litellm_settings": {"set_verbose": False},
    }
    path = workdir / "litellm.yaml"
    path.write_text(json.dumps(config, indent=2))
    # Access logs off, as for the gateway (WARNING) and nginx (access_log off).
    log_config = workdir / "litellm-logging.json"
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"err": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
                "root": {"level": "WARNING", "handlers": ["err"]},
                "loggers": {"uvicorn.access": {"level": "WARNING"}},
            }
        )
    )
    command = [str(binary), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--num_workers", "1", "--telemetry", "False", "--log_config", str(log_config)]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "true"}
    process, log = _spawn("litellm", pinned(command, cpus.server), workdir, env=env)
    server = Server("litellm", process, f"http://127.0.0.1:{port}/v1", LITELLM_MASTER_KEY, log)
    _wait_http(server, "/health/liveliness", 120)
    probe = httpx.post(
        server.base_url + "/images/generations",
        headers=server.headers(),
        json={"model": MODEL, "prompt": "probe", "size": "1024x1024", "quality": "low"},
        timeout=60,
    )
    if probe.status_code != 200 or "data" not in probe.json():
        server.stop()
        raise Unavailable(f"LiteLLM answered {probe.status_code} to a generation: {probe.text[:300]}")
    return server


# -- memory -----------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in task.read_text().split()]
        except OSError:
            pass
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (LiteLLM and nginx run child processes)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        queue += _children(current)
    return pids


def _status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Current resident memory of the process tree."""
    return sum(_status_kb(p, "VmRSS") for p in tree(pid)) * 1024


def peak_bytes(pid: int) -> int:
    """Peak resident memory (VmHWM) of the process tree since the last ``reset_peak``."""
    return sum(_status_kb(p, "VmHWM") for p in tree(pid)) * 1024


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``, Linux ≥ 4.0; needs the same user
    or root). Without it a peak is the lifetime peak, which ``PeakSampler`` then backs up."""
    ok = True
    for p in tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


class PeakSampler:
    """Peak RSS of a process tree over a ``with`` block: VmHWM after a reset where the kernel allows
    it, else (and as a cross-check) the highest VmRSS seen by sampling every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._reset_ok = False

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakSampler:
        self.before = rss_bytes(self.pid)
        self._reset_ok = reset_peak(self.pid)
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._reset_ok:
            self.peak = max(self.peak, peak_bytes(self.pid))
