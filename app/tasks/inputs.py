"""What a queued task keeps: the admitted job as JSON, and its input files in a folder of its own.

Submission stores the job admission produced (``job_spec``) and moves the request's spooled uploads
into ``<inputs_root>/<task id>`` (``keep``); a worker gets the same job back (``restore``), its
images pointing at those files, and the folder goes when the task ends (``drop``). A task queued by
an older version stored its raw payload instead: it is admitted again (``_legacy``).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.db.tables import Task
from app.domain.jobs import ImageJob, InputImage
from app.images.intake.spool import SpooledFile, UploadForm
from app.images.service import GenerationDraft, ImageService, InputLimits
from app.keys import Caller


class TaskInputs:
    """The task input folders under ``root``, and the jobs stored with their tasks."""

    def __init__(self, *, root: Path, images: ImageService, limits: InputLimits) -> None:
        self.root = root
        self._images = images
        self._limits = limits

    def keep(self, task_id: str, form: UploadForm) -> list[dict[str, Any]]:
        """Move a request's spooled files into the task's own folder (same filesystem: a rename)."""
        folder = self.root / task_id
        folder.mkdir(parents=True, exist_ok=False)
        kept = []
        for index, upload in enumerate(form.files):
            name = f"{index:03d}-{upload.field.replace('/', '_')[:40]}"
            shutil.move(upload.path, folder / name)
            kept.append(
                {
                    "field": upload.field,
                    "filename": upload.filename,
                    "name": name,
                    "size": upload.size,
                    "spooled": str(upload.path),
                }
            )
        return kept

    def drop(self, task_id: str) -> None:
        shutil.rmtree(self.root / task_id, ignore_errors=True)

    async def restore(self, task: Task, caller: Caller) -> ImageJob:
        """The admitted job again, as submission stored it: the same effective moderation level,
        the same validated settings. The model must still be served and allowed for the key."""
        stored = task.spec.get("job")
        if not isinstance(stored, Mapping):
            return await self._legacy(task, caller)
        caps = self._images.resolve_model(str(stored["model"]), caller)
        folder = self.root / task.id
        names = {f["spooled"]: f["name"] for f in task.spec.get("files") or [] if "spooled" in f}

        def image(entry: Mapping[str, Any]) -> InputImage:
            values = {k: v for k, v in entry.items() if k != "spooled"}
            return InputImage(**{**values, "path": folder / names.get(entry["spooled"], "")})

        values = {k: v for k, v in stored.items() if k not in ("images", "mask")}
        mask = stored.get("mask")
        return ImageJob(
            **values,
            caps=caps,
            images=tuple(image(entry) for entry in stored.get("images") or ()),
            mask=image(mask) if isinstance(mask, Mapping) else None,
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
        folder = self.root / task.id
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
        elif f.name == "mask":
            spec["mask"] = image(job.mask) if job.mask is not None else None
        else:
            spec[f.name] = plain(getattr(job, f.name))
    return spec
