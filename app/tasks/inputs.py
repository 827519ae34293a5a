"""What a queued task keeps: the admitted job as JSON, and its input files in the input store.

Submission stores the job admission produced (``job_spec``) and hands the request's spooled uploads
to the input store (``keep``): moved into ``<inputs_root>/<task id>`` with a local store, streamed
to the bucket with S3 (``app/storage/inputs.py``), so a worker on another node can read them. A
worker gets the same job back (``restore``), its images pointing at a local folder that holds the
files (the S3 store streams them down first), and the inputs go when the task ends or is purged
(``drop``).

The stored job carries its schema's number (``JOB_SCHEMA``). A worker reads its own schema and the
ones before it (each upgraded here, in ``upgraded``; a forwarded batch line stores its job the
same way, ``app/batches/forward.py``); a job of a schema it does not know (a newer
node queued it, mid-upgrade) or with no stored job at all fails as ``task_unreadable``, uncharged,
rather than run as something it did not ask. So a rolling upgrade updates workers before API nodes
(README, "Upgrading").

- Schema 1 (0.2.0): the job's lifecycle as the answer's ``headers``.
- Schema 2: the lifecycle as dates (``sunset_at``, ``deprecated_at``); no headers, which a worker
  never sends: the task's own answers carry none.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from app.auth.keys import Caller
from app.core.errors import GatewayError
from app.db.tables import Task
from app.domain.catalog import ModelCapabilities
from app.domain.jobs import ImageJob, InputImage
from app.images.intake.spool import UploadForm
from app.images.service import ImageService, InputLimits
from app.storage import InputStore

JOB_SCHEMA = 2
_DATES = ("sunset_at", "deprecated_at")


class TaskInputs:
    """The tasks' input files in ``store``, and the jobs stored with their tasks."""

    def __init__(self, *, store: InputStore, images: ImageService, limits: InputLimits) -> None:
        self.store = store
        self._images = images
        self._limits = limits

    @property
    def root(self) -> Path:
        return self.store.root

    async def keep(self, task_id: str, form: UploadForm) -> list[dict[str, Any]]:
        """Give a request's spooled files to the store as the task's inputs."""
        names = [_name(index, upload.field) for index, upload in enumerate(form.files)]
        await self.store.keep(
            task_id, [(name, upload.path) for name, upload in zip(names, form.files, strict=True)]
        )
        return [
            {
                "field": upload.field,
                "filename": upload.filename,
                "name": name,
                "size": upload.size,
                "spooled": str(upload.path),
            }
            for name, upload in zip(names, form.files, strict=True)
        ]

    async def drop(self, task_id: str) -> None:
        await self.store.drop(task_id)

    async def _folder(self, task: Task) -> Path:
        """A local folder with the task's inputs (downloaded first when they are in the bucket)."""
        names = [str(f["name"]) for f in task.spec.get("files") or []]
        return await self.store.fetch(task.id, names)

    async def restore(self, task: Task, caller: Caller) -> ImageJob:
        """The admitted job again, as submission stored it: the same effective moderation level,
        the same validated settings. The model must still be served and allowed for the key."""
        stored = upgraded(task.spec.get("job"))
        caps = self._images.resolve_model(str(stored["model"]), caller)
        folder = await self._folder(task)
        names = {f["spooled"]: f["name"] for f in task.spec.get("files") or [] if "spooled" in f}

        def image(entry: Mapping[str, Any]) -> InputImage:
            values = {k: v for k, v in entry.items() if k != "spooled"}
            return InputImage(**{**values, "path": folder / names.get(entry["spooled"], "")})

        return job_from_spec(stored, caps, image=image)


def job_from_spec(
    stored: Mapping[str, Any],
    caps: ModelCapabilities,
    *,
    image: Callable[[Mapping[str, Any]], InputImage] | None = None,
) -> ImageJob:
    """A job from its stored form in this version's schema (``upgraded``); ``image`` makes an
    input image of each stored entry (none: the job keeps no input images)."""
    values = {k: v for k, v in stored.items() if k not in ("schema", "images", "mask", "markup")}
    for name in _DATES:
        if values.get(name) is not None:
            values[name] = dt.datetime.fromisoformat(values[name])
    if image is None:
        return ImageJob(**values, caps=caps)
    mask, markup = stored.get("mask"), stored.get("markup")
    return ImageJob(
        **values,
        caps=caps,
        images=tuple(image(entry) for entry in stored.get("images") or ()),
        mask=image(mask) if isinstance(mask, Mapping) else None,
        markup=image(markup) if isinstance(markup, Mapping) else None,
    )


def upgraded(stored: Any) -> dict[str, Any]:
    """A stored job in this version's schema (see the module docstring), or ``task_unreadable``."""
    schema = stored.get("schema", 1) if isinstance(stored, Mapping) else None
    if not isinstance(stored, Mapping) or not isinstance(schema, int) or not 1 <= schema <= JOB_SCHEMA:
        raise GatewayError(
            "This task was queued in a form this gateway version cannot read; it was not run "
            "and not charged. Submit it again.",
            code="task_unreadable",
        )
    job = dict(stored)
    if schema == 1:
        job.pop("headers", None)
    return job


# The catalog entry is looked up again by name.
_NOT_STORED = frozenset({"caps"})


def _name(index: int, field: str) -> str:
    """The stored file's name: its position and form field, in characters every store accepts
    (``image[]`` becomes ``image__``)."""
    return f"{index:03d}-{''.join(c if c.isascii() and c.isalnum() else '_' for c in field[:40])}"


def job_spec(job: ImageJob) -> dict[str, Any]:
    """An admitted job as JSON: every field but the catalog entry (looked up again by name), with
    the input images referring to the files the task keeps."""

    def plain(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            return value.isoformat()
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    def image(item: InputImage) -> dict[str, Any]:
        values = {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.name != "path"}
        return {**values, "spooled": str(item.path)}

    spec: dict[str, Any] = {"schema": JOB_SCHEMA}
    for f in dataclasses.fields(job):
        if f.name in _NOT_STORED:
            continue
        if f.name == "images":
            spec["images"] = [image(item) for item in job.images]
        elif f.name in ("mask", "markup"):
            item = getattr(job, f.name)
            spec[f.name] = image(item) if item is not None else None
        else:
            spec[f.name] = plain(getattr(job, f.name))
    return spec
