"""Asynchronous requests (SPEC §6): submit now, run on a worker, read the outcome later.

Submission runs the one admission path (``ImageService.admit``: validation, moderation to the
key's effective level, rate limits and the reservation) before answering 202, so errors come back
at once and a queued task can always run. The task stores what admission produced (the validated
job at its effective moderation level, and its hold), never the client's raw payload, so a worker
runs exactly what was admitted. Running a task goes through the same request path as a
synchronous call; its outcome is written in the same transaction as its charge (the one
settlement path), so a task is billed exactly once or not at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from app.auth.keys import Caller, KeyService
from app.billing.ledger import Hold, SettlementAbandoned
from app.core.errors import GatewayError
from app.db.tables import Task
from app.db.transient import retrying
from app.domain.jobs import ImageJob
from app.images.delivery import image_names, render_images, store_images
from app.images.intake.spool import UploadForm
from app.images.service import Admission, Draft, ImageService, InputLimits, ResultHook
from app.images.settlement import CostHook, shielded
from app.storage import ImageStore, InputStore
from app.tasks.idempotency import InFlight, fingerprint
from app.tasks.inputs import TaskInputs, job_spec
from app.tasks.progress import ProgressRecorder, preview_names, progress_of, render_progress, run_streamed
from app.tasks.queue import CANCELLED, FAILED, SUCCEEDED, NewTask, TaskQueue, new_task_id, reused
from app.upstream.call import UpstreamCall
from app.webhooks.endpoints import WebhookEndpoints
from app.webhooks.outbox import Outbox

log = logging.getLogger(__name__)

# Finished tasks deleted per transaction by the purge: memory stays flat however many are due.
PURGE_BATCH = 500


@dataclass(frozen=True, slots=True)
class TaskSettingsView:
    hold_ttl_s: float
    url_ttl_s: int
    retention_s: int


class TaskService:
    def __init__(
        self,
        *,
        queue: TaskQueue,
        images: ImageService,
        keys: KeyService,
        store: ImageStore,
        inputs: InputStore,
        input_limits: InputLimits,
        settings: TaskSettingsView,
        outbox: Outbox | None = None,
        endpoints: WebhookEndpoints | None = None,
    ) -> None:
        self.queue = queue
        self._outbox = outbox
        self._endpoints = endpoints
        # Called after a task's events were queued (the webhook sender's wakeup).
        self.on_events: Callable[[], None] = lambda: None
        self._images = images
        self._keys = keys
        self._store = store
        self._inputs = TaskInputs(store=inputs, images=images, limits=input_limits)
        self._settings = settings
        # Set on submit so an in-process worker starts at once instead of at its next poll.
        self.wakeup = asyncio.Event()
        self._in_flight = InFlight()
        # Tasks this process is running now (for /metrics).
        self.running = 0

    async def submit(
        self,
        *,
        caller: Caller,
        draft: Draft,
        idempotency_key: str | None,
        form: UploadForm | None = None,
        webhooks: list[str] | None = None,
        validated: Callable[[ImageJob], None] | None = None,
    ) -> tuple[Task, dict[str, str]]:
        """Admit a request and queue it; a repeated idempotency key returns the first task,
        uncharged and not admitted again."""
        if idempotency_key is None:
            return await self._submit(caller, draft, None, None, form, webhooks, validated)
        print_ = await asyncio.to_thread(fingerprint, draft, webhooks)
        with self._in_flight.hold(caller.key_id, idempotency_key, print_):
            existing = await self.queue.find(caller.key_id, idempotency_key)
            if existing is not None:
                refused = reused(print_, existing)
                if refused is not None:
                    raise refused
                return existing, {}
            return await self._submit(caller, draft, idempotency_key, print_, form, webhooks, validated)

    async def _submit(
        self,
        caller: Caller,
        draft: Draft,
        idempotency_key: str | None,
        print_: str | None,
        form: UploadForm | None,
        webhooks: list[str] | None,
        validated: Callable[[ImageJob], None] | None,
    ) -> tuple[Task, dict[str, str]]:
        # Named endpoints must be the key's own (400 otherwise), checked before anything is held;
        # without a name the key's enabled ones are read in the insert's transaction instead,
        # where they cost one query per batch of submissions rather than one per request.
        chosen = []
        if webhooks is not None and self._endpoints is not None:
            chosen = await self._endpoints.choose(caller.key_id, webhooks)
        admission = await self._images.admit(
            caller=caller, draft=draft, asynchronous=True, validated=validated
        )
        # From here the hold exists: queue the task or give the hold back, even if the client
        # hangs up meanwhile (a cancelled submission must not leave a hold without its task).
        task = await shielded(
            self._enqueue(
                caller=caller,
                admission=admission,
                idempotency_key=idempotency_key,
                print_=print_,
                form=form,
                chosen=chosen,
                default_webhooks=webhooks is None and self._endpoints is not None,
            )
        )
        return task, admission.headers

    async def _enqueue(
        self,
        *,
        caller: Caller,
        admission: Admission,
        idempotency_key: str | None,
        print_: str | None,
        form: UploadForm | None,
        chosen: list[str],
        default_webhooks: bool,
    ) -> Task:
        job, hold = admission.job, admission.hold
        task_id = new_task_id()
        try:
            files: list[dict[str, Any]] = []
            if form is not None:
                files = await self._inputs.keep(task_id, form)
            spec: dict[str, Any] = {"job": job_spec(job), "files": files}
            if chosen:
                spec["webhooks"] = chosen
            task, created = await self.queue.submit(
                NewTask(
                    id=task_id,
                    key_id=caller.key_id,
                    request_id=job.request_id,
                    endpoint=job.endpoint,
                    model=job.model,
                    spec=spec,
                    response_format=job.response_format,
                    idempotency_key=idempotency_key,
                    idempotency_fingerprint=print_,
                    hold_id=hold.id,
                    hold_period=hold.period,
                    hold_micros=hold.amount_micros,
                    default_webhooks=default_webhooks,
                ),
                max_queued=caller.max_queued_tasks,
            )
        except BaseException:
            await self._images.release(hold)
            await self._drop_inputs(task_id, has_files=form is not None)
            raise
        if not created:
            await self._images.release(hold)
            await self._drop_inputs(task_id, has_files=form is not None)
        self.wakeup.set()
        return task

    @property
    def inputs_root(self) -> Path:
        """This node's folder of task inputs, or of a worker's local copies of them (swept for
        orphans by the lifespan)."""
        return self._inputs.root

    @property
    def input_store(self) -> InputStore:
        """Where queued edits keep their input files (its object side is swept too)."""
        return self._inputs.store

    async def view(self, task: Task, *, base_url: str) -> dict[str, Any]:
        """The task object a client sees, with its images as URLs or base64 as it asked."""
        body: dict[str, Any] = {
            "id": task.id,
            "task_id": task.id,
            "object": "image.task",
            "status": task.status,
            "model": task.model,
            "endpoint": task.endpoint,
            "created_at": _ts(task.created_at),
            "started_at": _ts(task.started_at),
            "finished_at": _ts(task.finished_at),
            "progress": await render_progress(
                self.progress(task), self._store, base_url=base_url, ttl_s=self._settings.url_ttl_s
            ),
        }
        if task.status == SUCCEEDED and task.result is not None:
            body["result"] = await render_images(
                task.result,
                self._store,
                response_format=task.response_format,
                base_url=base_url,
                ttl_s=self._settings.url_ttl_s,
            )
        if task.status in (FAILED, CANCELLED) and task.error is not None:
            body["error"] = task.error
        return body

    def progress(self, task: Task) -> dict[str, Any]:
        """The task's progress, previews by name: equal between two reads when nothing moved."""
        return _progress(task)

    async def claim(self, worker: str, limit: int) -> list[Task]:
        """Fail the tasks that ran out of attempts, then lease up to ``limit`` runnable ones."""
        for abandoned in await self.queue.fail_exhausted(self._events_for_abandoned):
            # Its last worker died mid-run: nothing settled it, so its hold goes back now (a
            # settlement still in flight would find the task failed and roll itself back).
            await self._images.release(_hold_of(abandoned))
            await self._after(abandoned)
        return await self.queue.claim_batch(worker, limit)

    async def run_claimed(self, task: Task, worker: str) -> None:
        """Run one leased task to its outcome (its lease is renewed by the worker pool)."""
        self.running += 1
        try:
            await self._run(task, worker)
        finally:
            self.running -= 1

    async def _run(self, task: Task, worker: str) -> None:
        hold = _hold_of(task)
        resuming = task.dispatched_at is not None and bool(task.provider_job)
        if task.dispatched_at is not None and not resuming:
            # An earlier worker died after calling the upstream. Running again could make the
            # upstream do (and charge for) the work twice: fail it, uncharged, instead. (Unless
            # the upstream recorded the job it accepted: then it is polled again, not resubmitted.)
            error = GatewayError(
                "The gateway stopped while this task's upstream call was in flight; it was not "
                "charged. Submit it again.",
                code="task_interrupted",
            )
            await self._interrupted(task, worker, error.to_body()["error"], hold)
            await self._after(task)
            return
        try:
            # Nothing has reached the upstream yet: a database that is busy or restarting is
            # waited out (the lease is renewed meanwhile), never turned into a failed task.
            caller = await retrying(lambda: self._keys.caller_for(task.key_id), what="task start")
            job = await self._inputs.restore(task, caller)
            if not resuming and not await self.queue.mark_dispatched(task.id, worker):
                return  # the lease was lost meanwhile: the new owner decides
            # How this run calls the upstream: as a task (its waits count as tasks'), polling the
            # provider job an earlier run recorded, and recording the one it submits.
            call = UpstreamCall(
                source="task", resume=task.provider_job, on_submitted=self._recorder(task, worker)
            )
            if job.stream:  # it asked for partial images: previews as they arrive
                await run_streamed(
                    images=self._images,
                    caller=caller,
                    job=job,
                    hold=hold,
                    recorder=ProgressRecorder(
                        task_id=task.id, worker=worker, job=job, store=self._store, writer=self.queue.writer
                    ),
                    finish=self._finisher(task, worker, job),
                    failer=self._failer(task, worker),
                    call=call,
                )
            else:
                await self._images.run(
                    caller=caller,
                    job=job,
                    hold=hold,
                    finish=self._finisher(task, worker, job),
                    failed=self._failer(task, worker),
                    call=call,
                )
        except SettlementAbandoned:
            log.warning("task was taken over by another worker", extra={"fields": {"task_id": task.id}})
            return
        except GatewayError as exc:
            await self._fail(task, worker, exc.to_body()["error"], hold)
        except Exception:
            log.exception("task failed unexpectedly", extra={"fields": {"task_id": task.id}})
            error = GatewayError("The gateway had an error while running the task.", code="internal_error")
            await self._fail(task, worker, error.to_body()["error"], hold)
        await self._after(task)

    def _recorder(self, task: Task, worker: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
        """What a polled upstream (FLUX) calls once it has accepted the task's jobs."""

        async def record(provider_job: dict[str, Any]) -> None:
            if not await self.queue.record_provider_job(task.id, worker, provider_job):
                log.warning(
                    "task lease lost before its provider job was recorded",
                    extra={"fields": {"task_id": task.id}},
                )

        return record

    def _finisher(self, task: Task, worker: str, job: ImageJob) -> ResultHook:
        async def finish(body: dict[str, Any]) -> tuple[dict[str, Any], CostHook]:
            stored = await store_images(body, self._store, output_format=job.output_format)

            def record(c: Connection, cost: int) -> bool:
                done = self.queue.finish_in(
                    c, task.id, worker, status=SUCCEEDED, result=stored, cost_micros=cost
                )
                if done and self._outbox is not None:
                    self._outbox.enqueue_in(c, task, status=SUCCEEDED)
                return done

            return stored, record

        return finish

    def _failer(self, task: Task, worker: str) -> Callable[[dict[str, Any]], CostHook]:
        """A task that failed after its stream started: the error and the charge for what the
        upstream did are recorded together, in the settlement's transaction."""

        def failed(error: dict[str, Any]) -> CostHook:
            def record(c: Connection, cost: int) -> bool:
                done = self.queue.finish_in(c, task.id, worker, status=FAILED, error=error, cost_micros=cost)
                if done and self._outbox is not None:
                    self._outbox.enqueue_in(c, task, status=FAILED, error=error)
                return done

            return record

        return failed

    async def _interrupted(self, task: Task, worker: str, error: dict[str, Any], hold: Hold) -> None:
        """Fail a task cut off after dispatch, uncharged, with its possible operator cost on the
        ledger (``Settlement.interrupted``); the row and the failure commit together, so a worker
        that dies here too leaves both to the next one, never one of them twice."""
        outbox = self._outbox

        def record(c: Connection, cost: int) -> bool:
            done = self.queue.finish_in(c, task.id, worker, status=FAILED, error=error, cost_micros=cost)
            if done and outbox is not None:
                outbox.enqueue_in(c, task, status=FAILED, error=error)
            return done

        try:
            await self._images.settlement.interrupted(
                request_id=task.request_id,
                key_id=task.key_id,
                model=task.model,
                endpoint=task.endpoint,
                hold=hold,
                also=record,
            )
        except SettlementAbandoned:
            return  # the lease was lost meanwhile: the new owner decides

    async def _fail(self, task: Task, worker: str, error: dict[str, Any], hold: Hold) -> None:
        # The request path has already settled or released the hold for upstream failures; a
        # failure before it (the key was revoked, validation changed) still holds it: release.
        await self._images.release(hold)
        outbox = self._outbox

        def events(c: Connection) -> None:
            if outbox is not None:
                outbox.enqueue_in(c, task, status=FAILED, error=error)

        await self.queue.finish(task.id, worker, status=FAILED, error=error, also=events)

    def _events_for_abandoned(self, c: Connection, task: Task) -> None:
        if self._outbox is not None:
            self._outbox.enqueue_in(c, task, status=FAILED, error=task.error)

    async def _after(self, task: Task) -> None:
        self.on_events()
        await self._drop_inputs(task.id, has_files=bool((task.spec or {}).get("files")))

    async def _drop_inputs(self, task_id: str, *, has_files: bool) -> None:
        """Remove a task's inputs (a generation has none). A failure is left to the orphan sweep,
        which removes a finished or unknown task's inputs: the task's outcome, or the error that
        ended its submission, stands whatever the store says."""
        if not has_files:
            return
        try:
            await self._inputs.drop(task_id)
        except Exception:
            log.warning(
                "could not remove a task's inputs", extra={"fields": {"task_id": task_id}}, exc_info=True
            )

    # -- cancel (issue 26, SPEC §11) -------------------------------------------------------------

    async def cancel(self, task_id: str, key_id: str) -> Task | None:
        """``POST /v1/tasks/{id}/cancel``: a queued task stops at once, its hold is released and
        its ``image.task.cancelled`` event queued; a running one is left to finish (and be billed:
        no provider here offers a cancel), a finished one is unchanged. Returns the task as it now
        is, or None when the key has no such task.

        The hold goes after the cancel's transaction: if this process dies in between, the hold
        belongs to no live task and the reconciler releases it (``release_expired``)."""
        outbox = self._outbox

        def events(c: Connection, task: Task) -> None:
            if outbox is not None:
                outbox.enqueue_in(c, task, status=CANCELLED, error=task.error)

        cancelled = await self.queue.cancel_queued(task_id, key_id, also=events)
        if cancelled is not None:
            if cancelled.hold_id:
                await self._images.release(_hold_of(cancelled))
            await self._after(cancelled)
        return await self.queue.get(task_id, key_id)

    # -- end cancel --------------------------------------------------------------------------------

    async def render(self, task_id: str, *, base_url: str) -> dict[str, Any] | None:
        """The task object as its owner sees it (for webhook events); None when it is gone."""
        async with self.queue.sessions() as session:
            task = await session.get(Task, task_id)
        return await self.view(task, base_url=base_url) if task is not None else None

    async def purge(self) -> int:
        """Delete finished tasks past retention, with their stored images."""
        purged = 0
        while True:
            gone = await self.queue.purge_finished(
                timedelta(seconds=self._settings.retention_s), limit=PURGE_BATCH
            )
            for task in gone:
                for name in [*image_names(task.result), *preview_names(task)]:
                    await self._store.delete(name)
                await self._drop_inputs(task.id, has_files=bool((task.spec or {}).get("files")))
            purged += len(gone)
            if len(gone) < PURGE_BATCH:
                return purged


def _progress(task: Task) -> dict[str, Any]:
    """Images completed of those asked for. A non-streamed call is answered whole, so its count
    moves from 0 to all at once: the count the result holds, not an estimate. A task that asked
    for partial images also counts them and has a preview per image (app/tasks/progress.py)."""
    spec = task.spec or {}
    asked = (spec.get("job") or {}).get("n")
    images = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else 1
    completed = 0
    if task.status == SUCCEEDED and isinstance(task.result, dict):
        data = task.result.get("data")
        completed = len(data) if isinstance(data, list) else 0
    return progress_of(task, images=max(images, completed), completed=completed)


def _hold_of(task: Task) -> Hold:
    return Hold(
        id=task.hold_id or "",
        key_id=task.key_id,
        period=task.hold_period or "",
        amount_micros=task.hold_micros,
    )


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None
