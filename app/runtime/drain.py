"""SIGTERM in two steps: leave the load balancer's rotation first, then drain.

A load balancer (or Kubernetes, through the endpoints of a Service) notices that a node is going
only when its readiness probe fails. If the node closed its listener at once, the requests the
balancer still sends during the next probe period would be refused. So on SIGTERM the node turns
``/readyz`` to 503, keeps serving for ``server.drain_delay_s``, and only then hands the signal on
to the server (uvicorn), which stops accepting and drains as before (``server.shutdown_grace_s``).

The server's own handler is wrapped rather than replaced, so this works whichever way uvicorn
runs (one process, or ``--workers N``, whose children each get SIGTERM from the supervisor). A
second SIGTERM during the delay skips the rest of it. SIGINT (Ctrl-C at a terminal) is not
delayed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from app.db.readiness import Readiness

log = logging.getLogger(__name__)


class DrainOnSigterm:
    def __init__(self, readiness: Readiness, *, delay_s: float) -> None:
        self._readiness = readiness
        self._delay_s = delay_s
        self._previous: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forwarded = False
        self._timer: asyncio.TimerHandle | None = None

    def install(self) -> Callable[[], None]:
        """Wrap the current SIGTERM handler; returns what puts it back. A no-op off the main
        thread (an app run inside a test's thread has no signals of its own)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        self._loop = asyncio.get_running_loop()
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

        def restore() -> None:
            if self._timer is not None:
                self._timer.cancel()
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous)

        return restore

    def _on_sigterm(self, sig: int, _frame: FrameType | None) -> None:
        if self._readiness.draining or self._delay_s <= 0:
            self._readiness.draining = True
            self._forward(sig)
            return
        self._readiness.draining = True
        log.warning(
            "SIGTERM: not ready from now on, serving for drain_delay_s before draining",
            extra={"fields": {"drain_delay_s": self._delay_s}},
        )
        assert self._loop is not None
        # A signal handler runs between two bytecodes of whatever the loop was doing: schedule
        # the timer through the loop's thread-safe door rather than touching its queues here.
        self._loop.call_soon_threadsafe(self._arm, sig)

    def _arm(self, sig: int) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(self._delay_s, self._forward, sig)

    def _forward(self, sig: int) -> None:
        if self._forwarded:
            return
        self._forwarded = True
        if self._timer is not None:
            self._timer.cancel()
        previous = self._previous
        if previous is None or previous == signal.SIG_IGN:
            return
        if callable(previous):
            previous(sig, None)
            return
        # No handler of the server's (SIG_DFL): die of the signal as the default would.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
