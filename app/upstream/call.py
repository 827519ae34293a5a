"""How one job is being run, beside what it asks: the context every upstream call is handed.

``ImageJob`` is what the client asked for and what admission decided; it is the same whether the
job runs now for a client or later as a task. What differs between those runs is here, passed
down explicitly from the request path (``app/images/service.py``) through the router to each
adapter and its transport, never carried in a context variable:

- ``source``: who waits for the call (``request`` or ``task``), for the slots' waiting counts;
- ``trace``: the request's span, the parent of each upstream try's span;
- ``on_answer``: called when an upstream answers with success, before its body is read. From
  then on the work is billed even if the client leaves, so the request path stops letting a
  disconnect cut the call;
- ``resume`` and ``on_submitted``: for submit-and-poll upstreams (FLUX, fal.ai, Replicate) run
  by a task. ``resume`` is what an earlier run recorded (``{"upstream", ...}``), to poll that
  provider job again instead of submitting a new one; ``on_submitted`` records it once submitted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from app.telemetry.tracing import INERT, RequestTrace

CallSource = Literal["request", "task"]
SOURCES: tuple[CallSource, ...] = ("request", "task")


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """The execution context of one job's upstream calls (see the module docstring)."""

    source: CallSource = "request"
    trace: RequestTrace = INERT
    on_answer: Callable[[], None] | None = None
    resume: Mapping[str, Any] | None = None
    on_submitted: Callable[[dict[str, Any]], Awaitable[None]] | None = None

    def answered(self) -> None:
        """The upstream answered with success (see ``on_answer``)."""
        if self.on_answer is not None:
            self.on_answer()

    @property
    def resumable(self) -> bool:
        """Whether a submitted provider job is recorded (a task): such a job is polled, never
        waited for on one long-held connection, so a new worker can pick it up."""
        return self.on_submitted is not None

    def resumed_on(self, upstream: str) -> Mapping[str, Any] | None:
        """What an earlier run recorded on ``upstream`` (None: submit anew)."""
        resume = self.resume
        return resume if resume is not None and resume.get("upstream") == upstream else None

    async def submitted(self, record: dict[str, Any]) -> None:
        """Hand what finds the accepted provider job again to whoever keeps it."""
        if self.on_submitted is not None:
            await self.on_submitted(record)


# A call with no request around it: a direct adapter call (tests, probes), nothing to tell.
DIRECT = UpstreamCall()
