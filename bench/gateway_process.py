"""A gateway as a separate process (`python -m app serve`): for the soak, and for the multi-replica
and crash tests (tests import this module; it imports nothing from tests/).

Ports: ``python -m app serve`` takes a port number and has no way to report one it chose itself, so
the parent picks it. A port merely found free (bind to 0, close) can be handed out again by the
kernel to the next ``bind(0)`` before the child binds it, which is how two xdist workers collided.
``reserve_port`` leaves the port in TIME_WAIT instead: the kernel never gives it to ``bind(0)``
while that lasts (60 s on Linux), but a server that sets SO_REUSEADDR (uvicorn and asyncio do)
may bind it. Should the child still lose the port, ``wait_ready`` restarts it on another one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODELS_FILE = str(ROOT / "app" / "defaults" / "models.yaml")
# What uvicorn logs when the port is taken (errno 98, EADDRINUSE).
_PORT_TAKEN = b"address already in use"


def reserve_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on and that no ``bind(0)`` will be given for about a minute.

    One connection is made to a throw-away listener and the accepted side closed first, which
    leaves that side, bound to the port, in TIME_WAIT. The listener sets SO_REUSEADDR because Linux
    lets a later bind to a TIME_WAIT port through only when both sockets set it.
    """
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(1)
        address = listener.getsockname()
        with socket.create_connection(address) as client:
            accepted, _ = listener.accept()
            accepted.close()
            # Let the accepted side's FIN reach the client before it closes in turn, so the
            # accepted side is the one that ends in TIME_WAIT.
            client.recv(1)
    return int(address[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def peak_rss_kib(pid: int) -> int:
    """The highest resident set size a process has had (VmHWM), from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def gateway_config(
    upstream: dict[str, Any], data_dir: Path, db_url: str, *, admin_key: str, **extra: Any
) -> dict[str, Any]:
    """A `python -m app serve` config for reliability runs: ``upstream`` as the only upstream, short
    timeouts and backoffs, logs at WARNING, every file under ``data_dir``."""
    config: dict[str, Any] = {
        "admin_key": admin_key,
        "data_dir": str(data_dir),
        # Beside the rest of the run's files, not in the checkout's ./data/images (the default).
        "storage": {"path": str(data_dir / "images")},
        "models_file": MODELS_FILE,
        "database": {"url": db_url},
        "logging": {"level": "WARNING"},
        # A hanging upstream costs one timeout, then the retry goes elsewhere (here: again).
        "upstreams": [{**upstream, "timeout_s": 2, "connect_timeout_s": 2}],
        "retry": {"initial_delay_s": 0.01, "max_delay_s": 0.05},
        "tasks": {"workers": 2, "poll_s": 0.1},
        # No load balancer to leave on SIGTERM: drain at once (tests/operations/test_probes.py
        # sets its own delay).
        "server": {"drain_delay_s": 0},
    }
    config.update(extra)
    return config


def _address(hex_address: str) -> str:
    """/proc/net/tcp's little-endian hex address as text (IPv4, or IPv6 in four 32-bit words)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words)


def listening(pid: int) -> list[tuple[str, int]]:
    """The (address, port) of every socket process ``pid`` listens on, from /proc (Linux): whether a
    listener is that process's own, which a health check alone cannot tell."""
    sockets: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                # local address "ADDR:PORT" in hex; state 0A is LISTEN
                if fields[3] == "0A":
                    address, port = fields[1].rsplit(":", 1)
                    sockets[f"socket:[{fields[9]}]"] = (_address(address), int(port, 16))
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []  # the process is gone
    found = []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed since the listing (a connection ending): not the listener
        if target in sockets:
            found.append(sockets[target])
    return found


class ChildProcess:
    """What every gateway child shares (a server, a worker, a cluster node): its log, waiting for
    it to be ready, restarting it when its reserved port was taken meanwhile, stopping it.
    Subclasses set ``proc``, ``_log`` and ``log_path`` in ``_start``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: Any
    stop_timeout_s = 60.0

    def _start(self) -> None:
        raise NotImplementedError

    def _wait(self, ready: Callable[[], bool], *, what: str, timeout: float, restarts: int) -> None:
        """Until ``ready()``; a child that exited because its port was taken is started again (at
        most ``restarts`` times). On a timeout the child is killed: the deadline bounds a failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                if restarts > 0 and _PORT_TAKEN in self.log_path.read_bytes().lower():
                    restarts -= 1
                    self._start()
                    continue
                raise RuntimeError(f"{what} exited: {self.logs()[-3000:]}")
            if ready():
                return
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"{what} not ready: {self.logs()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        wait_s = self.stop_timeout_s if timeout is None else timeout
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(wait_s)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


class GatewayProcess(ChildProcess):
    """One ``python -m app serve`` child. Its output goes to ``log_path``; ``url`` is valid once
    ``wait_ready`` has returned (a restart on a lost port changes it)."""

    def __init__(
        self,
        config: dict[str, Any] | None,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        host: str | None = "127.0.0.1",
        config_path: Path | None = None,
    ) -> None:
        """``config=None`` starts with no config file at all (the packaged defaults), or with
        ``config_path`` as it is (the shipped one); ``host=None`` passes no ``--host``, so the
        config decides where it listens."""
        self.config, self.workdir, self.cwd, self.host = config, workdir, cwd, host
        self.given_config = config_path
        self.env = {**os.environ, "GATEWAY_ADMIN_KEY": "", **(env or {})}
        self._start()

    def _start(self) -> None:
        self.port = reserve_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.workdir / f"gateway-{self.port}.yaml"
        config_args: list[str] = []
        if self.config is not None:
            self.config_path.write_text(yaml.safe_dump(self.config))
            config_args = ["--config", str(self.config_path)]
        elif self.given_config is not None:
            config_args = ["--config", str(self.given_config)]
        self.log_path = self.workdir / f"gateway-{self.port}.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "app", "serve", *config_args]
        if self.host is not None:
            command += ["--host", self.host]
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port)],
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _owns_port(self) -> bool:
        """Whether the listener on ``port`` is this child's socket (not another process's, which a
        health check alone cannot tell apart)."""
        return any(port == self.port for _, port in self.listening())

    def listening(self) -> list[tuple[str, int]]:
        """The (address, port) of every socket this child listens on, from /proc (Linux)."""
        return listening(self.proc.pid)

    def wait_ready(self, timeout: float = 300.0, *, restarts: int = 3) -> GatewayProcess:
        """Block until ``/healthz`` answers from this child; on a timeout the child is killed.
        The deadline only bounds a failure: a loaded machine (xdist, coverage in the child, a CPU
        hog) took over 60 s to import and migrate (a batch restart test timed out at load 23)."""

        def healthy() -> bool:
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200 and self._owns_port()
            except httpx.TransportError:
                return False

        self._wait(healthy, what="gateway", timeout=timeout, restarts=restarts)
        return self


class WorkerProcess(ChildProcess):
    """One ``python -m app worker`` child (no HTTP listener: it is ready when it claims a task)."""

    stop_timeout_s = 30.0

    def __init__(
        self, config: dict[str, Any], workdir: Path, *, name: str = "worker", cwd: Path = ROOT
    ) -> None:
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--config", str(self.config_path), "worker"],
            cwd=cwd,
            env={**os.environ, "GATEWAY_ADMIN_KEY": ""},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
