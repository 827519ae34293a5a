"""Task progress (issue 16): how far a running task is, and the streamed run that moves it.

An asynchronous request that asks for ``partial_images`` is admitted as a streaming job
(``streamed_for_previews``); its worker streams from the upstream through the same relay as a
synchronous stream (``ImageStream``), so the partials are counted, and billed, by the one
settlement path. Here each partial image is kept as its image's preview in the image store (the
latest one replaces the earlier), and the counts are written to the task row as they change, so a
poll from any process sees them. Writes are bounded: one per partial image, plus one per image
completed before the last (the last one's count is written with the outcome, in the settlement's
transaction).

Previews are a convenience: a preview that cannot be stored, or progress that cannot be written,
is logged and the task goes on (it is neither failed nor billed again). They are kept after the
task ends, whichever way, and deleted with it when it is purged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, update

from app.auth.keys import Caller
from app.billing.ledger import Hold
from app.core.errors import GatewayError
from app.db.tables import Task
from app.db.writer import Writer
from app.domain.jobs import ImageJob, ProviderEvent
from app.images.delivery import content_type_of, store_b64
from app.images.service import ImageService, ResultHook
from app.images.settlement import CostHook
from app.storage import ImageStore
from app.upstream.call import UpstreamCall

log = logging.getLogger(__name__)

IN_PROGRESS = "in_progress"
SETTINGS = ("background", "output_format", "quality", "size")
# The settlement's work for a task that fails mid-stream, given the task's error object.
Failer = Callable[[dict[str, Any]], CostHook]


def asked_partials(task: Task) -> int:
    """The partial images per image the task's request asked for (0: no previews)."""
    job = (task.spec or {}).get("job") or {}
    asked = job.get("partial_images") if job.get("stream") else 0
    return asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else 0


def progress_of(task: Task, *, images: int, completed: int) -> dict[str, Any]:
    """The task's progress with previews by their stored names (stable between reads, so the
    events stream compares it to tell a change; the view turns the names into signed links)."""
    progress: dict[str, Any] = {"images": images, "images_completed": completed}
    partials = asked_partials(task)
    if not partials:
        return progress
    stored = task.progress if isinstance(task.progress, dict) else {}
    if task.status == IN_PROGRESS:
        progress["images_completed"] = int(stored.get("images_completed") or 0)
    progress["partial_images"] = partials
    progress["partial_images_received"] = int(stored.get("partial_images_received") or 0)
    progress["previews"] = [dict(p) for p in stored.get("previews") or [] if isinstance(p, dict)]
    return progress


async def render_progress(
    progress: dict[str, Any], store: ImageStore, *, base_url: str, ttl_s: int
) -> dict[str, Any]:
    """``progress`` as a client sees it: each preview's stored name becomes a signed link, the
    same kind of link ``response_format=url`` hands out (whatever format the result is in: a
    preview in base64 on every poll would resend megabytes)."""
    if "previews" not in progress:
        return progress
    shown = []
    for preview in progress["previews"]:
        name = preview.get("image")
        item = {k: v for k, v in preview.items() if k != "image"}
        if isinstance(name, str):
            item["url"] = await store.url_for(name, base_url=base_url, ttl_s=ttl_s)
        shown.append(item)
    return {**progress, "previews": shown}


def preview_names(task: Task) -> list[str]:
    """The stored previews of a task (deleted with it)."""
    stored = task.progress if isinstance(task.progress, dict) else {}
    return [
        str(p["image"])
        for p in stored.get("previews") or []
        if isinstance(p, dict) and isinstance(p.get("image"), str)
    ]


@dataclass(slots=True)
class ProgressRecorder:
    """One running task's progress: the latest partial of each image in the store, the counts on
    the task row (written only while this worker holds the task)."""

    task_id: str
    worker: str
    job: ImageJob
    store: ImageStore
    writer: Writer
    completed: int = 0
    received: int = 0
    previews: dict[int, dict[str, Any]] = field(default_factory=dict)
    writes: int = 0

    async def partial(self, event: ProviderEvent, *, image_index: int) -> None:
        """A partial image of image ``image_index`` (the relay's count of images completed before
        it: an upstream streams its images one after the other)."""
        self.received += 1
        replaced: str | None = None
        try:
            stored = await store_b64(
                event.data.get("b64_json"),
                self.store,
                content_type=content_type_of(event.data, self.job.output_format),
            )
        except Exception:
            log.warning("a task's preview could not be stored", extra={"fields": {"task_id": self.task_id}})
        else:
            index = event.data.get("partial_image_index")
            previous = self.previews.get(image_index)
            replaced = previous["image"] if previous is not None else None
            self.previews[image_index] = {
                "index": image_index,
                "partial_image_index": index if isinstance(index, int) else self.received - 1,
                "image": stored.name,
            }
        if await self._write() and replaced is not None:
            # Only once the row no longer names it: a poll never gets a link to a deleted file.
            try:
                await self.store.delete(replaced)
            except Exception:
                log.warning("an earlier preview could not be deleted", extra={"fields": {"image": replaced}})

    async def image_completed(self, completed: int) -> None:
        self.completed = completed
        await self._write()

    def snapshot(self) -> dict[str, Any]:
        return {
            "images_completed": self.completed,
            "partial_images_received": self.received,
            "previews": [self.previews[i] for i in sorted(self.previews)],
        }

    async def _write(self) -> bool:
        values = self.snapshot()
        task_id, worker = self.task_id, self.worker

        def write(c: Connection) -> bool:
            written = c.execute(
                update(Task)
                .where(Task.id == task_id, Task.worker == worker, Task.status == IN_PROGRESS)
                .values(progress=values)
            )
            return bool(getattr(written, "rowcount", 0) == 1)

        self.writes += 1
        try:
            written = await self.writer.run(write)
        except Exception:
            log.warning("a task's progress could not be written", extra={"fields": {"task_id": task_id}})
            return False
        if not written:
            log.info("task progress not written: lease lost", extra={"fields": {"task_id": task_id}})
        return written


def assemble(completed: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    """The ImagesResponse a non-streamed call would have answered, from the completed events: the
    images in order, the settings the upstream reported, and the usage summed over the events."""
    body: dict[str, Any] = {"created": next((e["created_at"] for e in completed if "created_at" in e), 0)}
    items = []
    for event in completed:
        item: dict[str, Any] = {"b64_json": event.get("b64_json")}
        if event.get("revised_prompt") is not None:
            item["revised_prompt"] = event["revised_prompt"]
        items.append(item)
    body["data"] = items
    last = completed[-1] if completed else {}
    body.update({k: last[k] for k in SETTINGS if k in last})
    if usage:
        body["usage"] = usage
    return body


async def run_streamed(
    *,
    images: ImageService,
    caller: Caller,
    job: ImageJob,
    hold: Hold,
    recorder: ProgressRecorder,
    finish: ResultHook,
    failer: Failer,
    call: UpstreamCall,
) -> None:
    """Run a task's job as a stream: partials become previews, the completed images its result.

    The outcome is written in the settlement's transaction either way: on success the stored
    result (via ``finish``), on a failure mid-stream the error (via ``failer``), each with the
    charge the relay settles (what the upstream completed, and unfinished partials as OpenAI bills
    them). A failure before the first event is raised, settled by ``open_stream`` as usual.
    """
    stream = await images.open_stream(caller=caller, job=job, hold=hold, call=call)
    completed: list[dict[str, Any]] = []

    async def on_event(event: ProviderEvent) -> None:
        if event.is_completed:
            completed.append(event.data)
            if stream.completed == job.n:
                # Stored before the relay settles on this event, and recorded in its transaction.
                body = assemble(completed, stream.raw_usage)
                _, stream.also = await finish(body)
            elif stream.completed < job.n:
                await recorder.image_completed(stream.completed)
        elif event.type.endswith(".partial_image"):
            await recorder.partial(event, image_index=stream.completed)

    stream.on_event = on_event
    # The stream owns its end: on a failure or a cancellation it settles what the upstream did
    # once, with the task's failure (``failer``) in the same transaction. A failure after the
    # settlement began is raised: the task's own failure path decides, and finds it finished if
    # it was (a SettlementAbandoned included).
    async with stream.ending(
        internal=GatewayError("The gateway had an error while running the task.", code="internal_error"),
        interrupted=GatewayError(
            "The gateway stopped while this task's upstream stream was in flight; what "
            "the upstream had completed was charged. Submit it again.",
            code="task_interrupted",
        ),
        on_failure=lambda failure: failer(failure.to_body()["error"]),
        raise_after_settling=True,
    ):
        async for _ in stream.events():
            pass
