"""Run any ASGI app on a real uvicorn HTTP server in a background daemon thread.

    with ThreadedServer(app) as server:
        httpx.get(server.url + "/healthz")

The port is chosen by the OS (uvicorn binds port 0, then `.port` reads the bound socket), so parallel
servers never race for a port. `stop()` is bounded: it asks uvicorn to exit, cancels requests that are
still running after `graceful_timeout_s`, and forces the exit if the thread still has not finished.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any, Self

import uvicorn


class ThreadedServer:
    """A uvicorn server for `app` in a daemon thread. Reusable: `start()` again after `stop()`."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout_s: float = 60.0,  # bounds a failure only: a loaded box starts slowly
        shutdown_timeout_s: float = 30.0,  # bounds a hang only (150 held requests at load 23: > 20 s)
        graceful_timeout_s: int = 3,
        log_level: str = "warning",
        lifespan: str = "auto",
        name: str = "test-server",
        **config_kwargs: Any,
    ) -> None:
        """`config_kwargs` go to `uvicorn.Config` unchanged (e.g. `http="h11"`, `loop="asyncio"`,
        `limit_concurrency=...`). By default `log_config=None`, so uvicorn leaves the process's logging
        configuration alone and its records reach pytest's caplog through the root logger."""
        self.app = app
        self.host = host
        self.requested_port = port
        self.startup_timeout_s = startup_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.name = name
        self._config_kwargs: dict[str, Any] = {
            "log_level": log_level,
            "lifespan": lifespan,
            "timeout_graceful_shutdown": graceful_timeout_s,
            "log_config": None,
            **config_kwargs,
        }
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self.error: BaseException | None = None
        """An exception that escaped `uvicorn.Server.run` in the server thread, if any."""

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Self:
        if self.running:
            raise RuntimeError(f"{self.name} is already running on {self.url}")
        config = uvicorn.Config(self.app, host=self.host, port=self.requested_port, **self._config_kwargs)
        server = uvicorn.Server(config)
        self._server, self._port, self.error = server, None, None
        self._thread = threading.Thread(target=self._run, args=(server,), name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"{self.name} failed to start") from self.error
            if time.monotonic() > deadline:
                self._shutdown(server, self._thread)
                raise TimeoutError(f"{self.name} did not start within {self.startup_timeout_s} s")
            time.sleep(0.005)
        self._port = self._bound_port(server)
        return self

    def stop(self) -> None:
        """Stop the server and join its thread (idempotent). Raises if the thread will not finish."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None and thread is not None:
            self._shutdown(server, thread)

    def _shutdown(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        server.should_exit = True
        thread.join(self.shutdown_timeout_s)
        if thread.is_alive():
            server.force_exit = True
            thread.join(self.shutdown_timeout_s)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop within {2 * self.shutdown_timeout_s} s")

    def _run(self, server: uvicorn.Server) -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn exits this way when the lifespan startup fails
            pass
        except BaseException as exc:  # keep it for start()/tests; don't trip threading.excepthook
            self.error = exc

    @staticmethod
    def _bound_port(server: uvicorn.Server) -> int:
        for listener in server.servers:
            for sock in listener.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("uvicorn reports no listening socket")

    # -- properties -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._server

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- context manager --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
