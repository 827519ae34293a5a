"""What a queued task keeps: the admitted job as JSON, and its input files in the input store.

Submission stores the job admission produced (``job_spec``) and hands the request's spooled uploads
to the input store (``keep``): moved into ``<inputs_root>/<task id>`` with a local store, streamed
to the bucket with S3 (``app/storage/inputs.py``), so a worker on another node can read them. A
worker gets the same job back (``restore``), its images pointing at a local folder that holds the
files (the S3 store streams them down first), and the inputs go when the task ends or is purged
(``drop``). A task queued by an older version stored its raw payload instead: it is admitted again
(``_legacy``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.auth.keys import Caller
from app.db.tables import Task
from app.domain.jobs import ImageJob, InputImage
from app.images.intake.spool import SpooledFile, UploadForm
from app.images.service import GenerationDraft, ImageService, InputLimits
from app.storage import InputStore


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
        stored = task.spec.get("job")
        if not isinstance(stored, Mapping):
            return await self._legacy(task, caller)
        caps = self._images.resolve_model(str(stored["model"]), caller)
        folder = await self._folder(task)
        names = {f["spooled"]: f["name"] for f in task.spec.get("files") or [] if "spooled" in f}

        def image(entry: Mapping[str, Any]) -> InputImage:
            values = {k: v for k, v in entry.items() if k != "spooled"}
            return InputImage(**{**values, "path": folder / names.get(entry["spooled"], "")})

        values = {k: v for k, v in stored.items() if k not in ("images", "mask", "markup")}
        mask, markup = stored.get("mask"), stored.get("markup")
        return ImageJob(
            **values,
            caps=caps,
            images=tuple(image(entry) for entry in stored.get("images") or ()),
            mask=image(mask) if isinstance(mask, Mapping) else None,
            markup=image(markup) if isinstance(markup, Mapping) else None,
        )

    async def _legacy(self, task: Task, caller: Caller) -> ImageJob:
        """A task queued by an older version (its raw payload stored): admitted again, moderation
        included, so it cannot run at a looser level than the key allows."""
        payload = dict(task.spec.get("payload") or {})
        if task.endpoint == "generations":
            job = await self._images.validate(
                caller=caller, draft=GenerationDraft(payload=payload, request_id=task.request_id)
            )
            return await self._images.screen(caller=caller, job=job)
        folder = await self._folder(task)
        files = [
            SpooledFile(
                field=f["field"],
                filename=f.get("filename"),
                content_type=None,
                path=folder / f["name"],
                size=f["size"],
            )
            for f in task.spec.get("files") or []
        ]
        form = UploadForm(fields={k: [str(v)] for k, v in payload.items()}, files=files, spool_dir=folder)
        job = await self._images.jobs.prepare_edit(
            caller=caller, form=form, request_id=task.request_id, limits=self._limits
        )
        return await self._images.screen(caller=caller, job=job)


# The catalog entry is looked up again by name; a provider job to resume and its recorder are set
# by the task runner for each run (issue 19), not by admission.
_NOT_STORED = frozenset({"caps", "resume", "on_submitted"})


def _name(index: int, field: str) -> str:
    """The stored file's name: its position and form field, in characters every store accepts
    (``image[]`` becomes ``image__``)."""
    return f"{index:03d}-{''.join(c if c.isascii() and c.isalnum() else '_' for c in field[:40])}"


def job_spec(job: ImageJob) -> dict[str, Any]:
    """An admitted job as JSON: every field but the catalog entry (looked up again by name), with
    the input images referring to the files the task keeps."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    def image(item: InputImage) -> dict[str, Any]:
        values = {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.name != "path"}
        return {**values, "spooled": str(item.path)}

    spec: dict[str, Any] = {}
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
