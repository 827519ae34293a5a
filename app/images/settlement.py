"""The one settlement path: an upstream outcome becomes one ledger row, exactly once.

``Settlement.settle`` is the only writer of settlement rows. JSON answers, URL delivery, streams
and tasks all end there, with an ``UpstreamOutcome`` saying which upstream was reached, how the
call ended, how many images completed and what usage the upstream reported. It prices the usage,
charges it against the request's hold (in full, even above the hold: the upstream has billed the
operator already, and the excess is recorded as an overrun on the row and in a metric), and runs
shielded from cancellation, so a client that leaves cannot cut a charge in half.

The stream relay, which settles a stream once whichever way it ends, is ``app/images/relay.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection

from app.auth.keys import Caller
from app.billing.ledger import Hold, LedgerRecord, LedgerService
from app.billing.pricing import PARTIAL_IMAGE_OUTPUT_TOKENS, request_cost
from app.billing.svg import SvgCharge
from app.db.transient import patient
from app.domain.jobs import ImageJob, TokenUsage
from app.domain.money import apply_multiplier
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import INERT, RequestTrace

log = logging.getLogger("app.images.service")
T = TypeVar("T")

StreamStatus = Literal["succeeded", "failed", "cancelled"]
# Work done inside a settlement's transaction, given the charge (a task recording its result);
# False aborts the whole settlement.
CostHook = Callable[[Connection, int], bool]


@dataclass(frozen=True, slots=True)
class UpstreamOutcome:
    """How one request's upstream call ended, as settlement needs it.

    ``upstream`` is None when no upstream was reached (nothing to record: the hold is released).
    ``usage`` is what the upstream reported for the completed images (None: it reported none, and
    the catalog's estimate is charged); ``partials`` are streamed partial images of an image that
    never completed, charged as OpenAI bills them (PARTIAL_IMAGE_OUTPUT_TOKENS each).
    """

    job: ImageJob
    caller: Caller
    hold: Hold | None
    upstream: str | None
    status: str  # succeeded | failed | cancelled
    images: int
    usage: TokenUsage | None
    started: float
    raw_usage: Any = None
    error_code: str | None = None
    partials: int = 0
    # SVG output: the author's tokens and their cost (multiplier applied), added to the charge.
    svg: SvgCharge | None = None
    # Completed images the upstream reported no usage for, when it did report some for others (a
    # stream's ``completed`` events each carry their own): each is charged at the catalog's
    # estimate and the row is marked estimated, as a request with no usage at all is.
    unreported: int = 0
    # The request's span: the settlement records the outcome on it and ends it.
    trace: RequestTrace = INERT


@dataclass(frozen=True, slots=True)
class Settled:
    cost_micros: int
    overrun_micros: int


class Settlement:
    """Turns upstream outcomes into ledger rows (see the module docstring)."""

    def __init__(self, ledger: LedgerService, metrics: Metrics) -> None:
        self._ledger = ledger
        self._metrics = metrics

    async def interrupted(
        self, *, request_id: str, key_id: str, model: str, endpoint: str, hold: Hold, also: CostHook
    ) -> None:
        """A task whose worker died after dispatching its upstream call: the tenant pays nothing
        (its hold is released), but the upstream may have done and billed the work. The row says
        so: status ``interrupted``, cost 0, and ``operator_cost_micros`` the request's reservation,
        the most that call can have cost (marked estimated: whether it was billed is unknown).
        ``also`` records the task's failure in the same transaction, so the row is written once."""
        record = LedgerRecord(
            request_id=request_id,
            key_id=key_id,
            model=model,
            upstream=None,  # which upstream the dead worker had chosen was never recorded
            endpoint=endpoint,
            status="interrupted",
            images=0,
            usage=TokenUsage(estimated=True),
            cost_micros=0,
            latency_ms=0,
            error_code="task_interrupted",
            reserved_micros=hold.amount_micros,
            operator_cost_micros=hold.amount_micros,
        )
        await shielded(self._ledger.settle(hold, record, also=lambda c: also(c, 0)))
        self._metrics.observe_interrupted(model=model, micros=hold.amount_micros)

    async def settle(self, outcome: UpstreamOutcome, *, also: CostHook | None = None) -> Settled:
        """Price ``outcome``, write its ledger row, charge it and release its hold, atomically and
        shielded from the caller's cancellation. ``also`` runs in the same transaction (a task
        recording its result); if it refuses, nothing is committed (``SettlementAbandoned``)."""
        job, caller, hold = outcome.job, outcome.caller, outcome.hold
        traced = outcome.trace
        if outcome.upstream is None:
            if hold is not None:
                await shielded(self._ledger.release(hold))
            traced.settled(upstream=None, usage=None, cost_micros=0, status=outcome.status)
            traced.end()
            return Settled(0, 0)
        cost, usage = 0, outcome.usage
        if usage is not None and outcome.unreported and outcome.images:
            per_image = job.caps.output_tokens_per_image(job.quality, job.size)
            usage = usage + TokenUsage(image_output=per_image * outcome.unreported, estimated=True)
        if outcome.images:
            cost, usage = request_cost(job, usage, outcome.images)
        if outcome.partials and job.caps.reports_usage:
            extra = TokenUsage(image_output=outcome.partials * PARTIAL_IMAGE_OUTPUT_TOKENS, estimated=True)
            usage = extra if usage is None else usage + extra
            cost, usage = request_cost(job, usage, max(outcome.images, 1))
        cost = apply_multiplier(cost, caller.price_multiplier_ppm)
        if outcome.svg is not None:
            cost += outcome.svg.cost_micros
        held = hold.amount_micros if hold is not None else 0
        overrun = max(0, cost - held) if hold is not None else 0
        record = LedgerRecord(
            request_id=job.request_id,
            key_id=caller.key_id,
            model=job.model,
            upstream=outcome.upstream,
            endpoint=job.endpoint,
            status=outcome.status,
            images=outcome.images,
            usage=usage,
            cost_micros=cost,
            latency_ms=ms_since(outcome.started),
            error_code=outcome.error_code,
            raw_usage=outcome.raw_usage or None,
            reserved_micros=held,
            overrun_micros=overrun,
            svg=outcome.svg,
        )
        in_tx = (lambda c: also(c, cost)) if also is not None else None
        await shielded(self._ledger.settle(hold, record, also=in_tx))
        observe_outcome(self._metrics, job, usage, cost, outcome.images)
        if overrun:
            self._metrics.observe_overrun(model=job.model, micros=overrun)
            log.warning(
                "charge exceeded its reservation",
                extra={
                    "fields": {
                        "key_id": caller.key_id,
                        "model": job.model,
                        "reserved_micros": held,
                        "cost_micros": cost,
                        "overrun_micros": overrun,
                    }
                },
            )
        log_settled(outcome, cost)
        traced.settled(upstream=outcome.upstream, usage=usage, cost_micros=cost, status=outcome.status)
        traced.end()
        return Settled(cost, overrun)

    async def release(self, hold: Hold) -> None:
        """Give back a hold for a request that ends before any upstream call."""
        await shielded(self._ledger.release(hold))


# Shielded operations still running after their caller was cancelled; referenced so that they
# finish (the event loop itself keeps only weak references to tasks).
_PENDING: set[asyncio.Future[Any]] = set()


def background(operation: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``operation`` as a task that the caller's cancellation does not reach. A money movement
    must land, so it also waits out a busy or restarting database for as long as that lasts
    (app/db/transient.py), rather than giving up after ``database.retry_s`` as a request would."""
    with patient(None):
        task = asyncio.ensure_future(operation)
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    return task


async def shielded(operation: Coroutine[Any, Any, T]) -> T:
    """Finish a money movement (or a slot's release) even if the request's task is cancelled."""
    return await asyncio.shield(background(operation))


def observe_outcome(
    metrics: Metrics, job: ImageJob, usage: TokenUsage | None, cost: int, images: int
) -> None:
    tokens = usage or TokenUsage()
    metrics.observe_usage(
        model=job.model,
        text_input=tokens.text_input,
        image_input=tokens.image_input,
        text_output=tokens.text_output,
        image_output=tokens.image_output,
        cost_micros=cost,
        images=images,
    )


def merge_usage(total: dict[str, Any], usage: Any) -> None:
    """Sum OpenAI usage objects field by field (nested details included), for the ledger's copy."""
    if not isinstance(usage, dict):
        return
    for key, value in usage.items():
        if isinstance(value, dict):
            merge_usage(total.setdefault(key, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


def log_settled(outcome: UpstreamOutcome, cost: int) -> None:
    job = outcome.job
    log.info(
        "image request completed" if outcome.status == "succeeded" else "image request settled",
        extra={
            "fields": {
                "key_id": outcome.caller.key_id,
                "model": job.model,
                "upstream": outcome.upstream,
                "status": outcome.status,
                "images": outcome.images,
                "cost_micros": cost,
                "latency_ms": ms_since(outcome.started),
                "stream": job.stream,
            }
        },
    )


def ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
