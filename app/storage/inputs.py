"""Where a queued edit's input files wait for their worker: a local folder, or the object store.

A task's inputs are a set of files named by the gateway (``000-image``, ``016-mask``) under the
task's id. The port has three jobs, whatever the backend:

- ``keep``: take the request's spooled files as the task's inputs (at submission, on the API node);
- ``fetch``: a local folder that holds them, for the upstream call (on the worker node);
- ``drop``: remove them, and any local copy, when the task ends or is purged.

``LocalInputStore`` keeps today's shape: ``<root>/<task id>/``, filled by a rename from the spool;
``fetch`` is that folder itself. It works for one node, or for nodes that share ``root``.

``S3InputStore`` puts them under ``<prefix>task-inputs/<task id>/<name>`` in the bucket, so a worker
on any node can read them (SPEC §10: nothing a request needs lives on one node's disk). Files are
streamed between disk and store by boto3's transfer manager in parts of ``PART_BYTES``, with at most
``CONCURRENCY`` parts in flight, so memory is bounded by those two numbers and never by the size of
an upload (16 × 50 MB edits are admitted). ``fetch`` downloads into ``<root>/<task id>/`` on the
worker's own disk, where the orphan sweep already looks for folders a killed process left.
The object-side sweep (``listing``, ``remove``, ``abort_stale_uploads``) is called by
``app/images/intake/sweep.py`` with the same rule as for folders.
"""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from app.core.errors import GatewayError, StorageUnavailableError
from app.storage.base import ImageStore, require_aware
from app.storage.config import StorageSettings

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

# The folder under the store's prefix; image names (img_<hex>.<ext>) can never collide with it.
INPUTS_FOLDER = "task-inputs/"
# Part size and parts in flight per file: 8 MiB × 4 bounds one transfer's buffers at 32 MiB.
PART_BYTES = 8 * 1024 * 1024
CONCURRENCY = 4
_DELETE_BATCH = 1000  # the DeleteObjects maximum
# Task ids and file names as the gateway makes them; anything else under the folder is not ours.
_COMPONENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def transfer_config() -> TransferConfig:
    # Imported here: boto3 is loaded only when S3 is configured (app/storage/__init__.py).
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=PART_BYTES,
        multipart_chunksize=PART_BYTES,
        max_concurrency=CONCURRENCY,
        # Downloaded parts waiting to be written: 16 × 256 KiB, not the default 100.
        max_io_queue=16,
        io_chunksize=256 * 1024,
    )


class InputObjects(Protocol):
    """The object side of the orphan sweep: inputs that live in a store every node shares."""

    async def listing(self) -> dict[str, float]: ...

    async def remove(self, task_ids: Sequence[str]) -> int: ...

    async def abort_stale_uploads(self, cutoff: datetime) -> int: ...


class InputStore(Protocol):
    root: Path
    """This node's folder for task inputs (the inputs themselves, or a worker's local copies)."""

    @property
    def objects(self) -> InputObjects | None:
        """The shared store's side, for the sweep; None when the inputs are only folders."""
        ...

    async def keep(self, task_id: str, files: Sequence[tuple[str, Path]]) -> None:
        """Take the spooled ``(name, path)`` files as the task's inputs; raises if the task has some."""
        ...

    async def fetch(self, task_id: str, names: Sequence[str]) -> Path:
        """A local folder holding the task's inputs under their names."""
        ...

    async def drop(self, task_id: str) -> None:
        """Remove the task's inputs and any local copy; nothing there is not an error."""
        ...


def check_component(value: str) -> str:
    if not _COMPONENT.fullmatch(value):
        raise ValueError(f"not a task input name: {value!r}")
    return value


class LocalInputStore:
    """``<root>/<task id>/<name>``, moved in from the spool (a rename on the same file system)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def objects(self) -> InputObjects | None:
        return None

    def _folder(self, task_id: str) -> Path:
        return self.root / check_component(task_id)

    async def keep(self, task_id: str, files: Sequence[tuple[str, Path]]) -> None:
        await asyncio.to_thread(self._move_in, self._folder(task_id), files)

    @staticmethod
    def _move_in(folder: Path, files: Sequence[tuple[str, Path]]) -> None:
        folder.mkdir(parents=True, exist_ok=False)
        for name, path in files:
            shutil.move(path, folder / check_component(name))

    async def fetch(self, task_id: str, names: Sequence[str]) -> Path:  # noqa: ARG002
        return self._folder(task_id)

    async def drop(self, task_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self._folder(task_id), True)


class S3InputStore:
    """Task inputs as objects; ``root`` holds a worker's local copies while it runs a task."""

    def __init__(self, client: S3Client, *, bucket: str, prefix: str, root: Path) -> None:
        self._client = client
        self.bucket = bucket
        self.base = prefix + INPUTS_FOLDER
        self.root = root
        self._transfer = transfer_config()

    @property
    def objects(self) -> InputObjects | None:
        return self

    def key_for(self, task_id: str, name: str) -> str:
        return f"{self.base}{check_component(task_id)}/{check_component(name)}"

    async def keep(self, task_id: str, files: Sequence[tuple[str, Path]]) -> None:
        await _reaching_store(functools.partial(self._upload, task_id, files))

    def _upload(self, task_id: str, files: Sequence[tuple[str, Path]]) -> None:
        # One file after the other: each transfer already keeps CONCURRENCY parts in flight, and a
        # sequence keeps the request's memory at one transfer's buffers.
        for name, path in files:
            self._client.upload_file(
                str(path), self.bucket, self.key_for(task_id, name), Config=self._transfer
            )

    async def fetch(self, task_id: str, names: Sequence[str]) -> Path:
        folder = self.root / check_component(task_id)
        await _reaching_store(functools.partial(self._download, task_id, names, folder))
        return folder

    def _download(self, task_id: str, names: Sequence[str], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            # The transfer manager writes to a temp name beside the target and renames it in place.
            self._client.download_file(
                self.bucket,
                self.key_for(task_id, name),
                str(folder / check_component(name)),
                Config=self._transfer,
            )

    async def drop(self, task_id: str) -> None:
        check_component(task_id)
        await asyncio.to_thread(self._delete_under, [task_id])
        await asyncio.to_thread(shutil.rmtree, self.root / task_id, True)

    def _delete_under(self, task_ids: Sequence[str]) -> int:
        keys: list[ObjectIdentifierTypeDef] = []
        for task_id in task_ids:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.base}{task_id}/"):
                keys.extend({"Key": obj["Key"]} for obj in page.get("Contents", []) if "Key" in obj)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    # -- the object side of the orphan sweep ---------------------------------------------------------

    async def listing(self) -> dict[str, float]:
        """Each task id with inputs in the store, and the newest LastModified (unix time) of them."""
        return await asyncio.to_thread(self._listing)

    def _listing(self) -> dict[str, float]:
        newest: dict[str, float] = {}
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.base):
            for obj in page.get("Contents", []):
                task_id, _, name = obj.get("Key", "")[len(self.base) :].partition("/")
                modified = obj.get("LastModified")
                if modified is None or not (_COMPONENT.fullmatch(task_id) and _COMPONENT.fullmatch(name)):
                    continue
                newest[task_id] = max(newest.get(task_id, 0.0), modified.timestamp())
        return newest

    async def remove(self, task_ids: Sequence[str]) -> int:
        """Remove the inputs of these tasks from the store; returns how many tasks had some."""
        for task_id in task_ids:
            check_component(task_id)
        removed = 0
        for task_id in task_ids:
            removed += await asyncio.to_thread(self._delete_under, [task_id]) > 0
        return removed

    async def abort_stale_uploads(self, cutoff: datetime) -> int:
        """Abort multipart uploads under the inputs folder begun before ``cutoff``: a process killed
        mid-upload leaves its parts, invisible to listings but stored (and billed) until aborted."""
        return await asyncio.to_thread(self._abort_stale, require_aware(cutoff))

    def _abort_stale(self, cutoff: datetime) -> int:
        aborted = 0
        paginator = self._client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.base):
            for upload in page.get("Uploads", []):
                key, upload_id, initiated = upload.get("Key"), upload.get("UploadId"), upload.get("Initiated")
                if key is None or upload_id is None or initiated is None or initiated >= cutoff:
                    continue
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                aborted += 1
        return aborted


async def _reaching_store(call: Callable[[], None]) -> None:
    """Run a transfer in a thread; the store's failures (after boto's retries) become a 503 the
    client may retry, or, on a worker, the task's clear error instead of an internal one."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        await asyncio.to_thread(call)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
            # A worker found them gone (swept or purged meanwhile): retrying cannot help.
            raise GatewayError(
                "The task's input files are no longer stored.", code="task_inputs_missing"
            ) from None
        raise StorageUnavailableError() from exc
    except (BotoCoreError, Boto3Error) as exc:
        raise StorageUnavailableError() from exc


def build_input_store(settings: StorageSettings, store: ImageStore, root: Path) -> InputStore:
    """The image store's bucket when it is S3 (every node reaches it), else the folder ``root``."""
    if settings.kind == "s3":
        from app.storage.s3 import S3ImageStore

        if not isinstance(store, S3ImageStore):
            raise TypeError("storage.kind is s3 but the image store is not")
        return S3InputStore(store.client, bucket=store.bucket, prefix=store.prefix, root=root)
    return LocalInputStore(root)
