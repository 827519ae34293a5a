"""The orphan sweep: spool and task-input folders left behind by a process that died.

Requests remove their spool folder and tasks their input folder on every ending a process lives
through; a SIGKILL or an OOM kill leaves them on disk. Other replicas and ``python -m app worker``
share the data directory, so nothing can be wiped at start: a folder is an orphan only when

- spool (``<spool_root>/upload-*``): nothing has written to it for ``spool_age_s``, longer than any
  live request may hold it (the settings refuse a shorter age);
- task inputs (``<inputs_root>/task_<32 hex>``): its task has finished (a finished task never reads
  its inputs again, so at once, whatever the folder's age: a kill between a task's outcome commit and
  the removal of its folder is cleaned up by the sweep at the next start), or its task is unknown
  (purged, or never committed) and the folder is older than ``inputs_age_s``, which covers the moment
  between moving the files in and committing the task row. A queued or running task's folder stays.

Only folders named as the gateway names them are considered; other files, and symlinks (to folders
or anywhere), are left alone, and removal never follows a link. The file system is walked and
changed in worker threads, off the event loop.

With an object store (``storage.kind: s3``) the inputs live in the bucket, under one prefix per task,
and the same rule applies to them (``objects``): a finished task's at once, an unknown task's once
its newest object is older than ``inputs_age_s``, a live task's kept. Multipart uploads a killed
process left unfinished under that folder are aborted once as old. The local folders are still
swept: on a worker they hold its copies of the inputs of the tasks it runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from app.images.intake.spool import SPOOL_PREFIX
from app.storage.inputs import InputObjects

log = logging.getLogger(__name__)

# As app.tasks.queue.new_task_id() makes them (tests/unit/test_sweep.py checks they agree).
_TASK_ID = re.compile(r"task_[0-9a-f]{32}")
# Task ids asked about per call, so that the IN (...) list stays far below database limits.
_BATCH = 500

TaskActivity = Callable[[list[str]], Awaitable[Mapping[str, bool]]]
"""For those of the given task ids that have a task row: whether it is still queued or in progress
(its inputs are in use) rather than finished. Ids without a row are absent from the answer."""


@dataclass(frozen=True, slots=True)
class SweepPolicy:
    spool_root: Path
    inputs_root: Path
    spool_age_s: float
    inputs_age_s: float
    # The object store's side of the task inputs, when they live there (app/storage/inputs.py).
    objects: InputObjects | None = None


@dataclass(frozen=True, slots=True)
class Swept:
    spools: int
    inputs: int
    # Tasks whose inputs went from the object store, and unfinished uploads aborted there.
    objects: int = 0
    uploads: int = 0


async def sweep(policy: SweepPolicy, activity: TaskActivity) -> Swept:
    """Remove orphaned folders once; returns how many of each kind went.

    Spools go first, so a database that cannot answer ``activity`` still lets them be swept.
    Candidates (with their staleness) are listed before the database is asked, so a task committed
    meanwhile is seen as known and active.
    """
    stale_spools = await asyncio.to_thread(_stale, policy.spool_root, _is_spool, policy.spool_age_s)
    spools = await asyncio.to_thread(_remove, stale_spools)
    folders = await asyncio.to_thread(_folders, policy.inputs_root, _is_task)
    stale = await asyncio.to_thread(_older, folders, policy.inputs_age_s)
    doomed = await _orphans([path.name for path in folders], stale, activity)
    inputs = await asyncio.to_thread(_remove, [path for path in folders if path.name in doomed])
    objects = uploads = 0
    if policy.objects is not None:
        now = time.time()
        listed = {k: v for k, v in (await policy.objects.listing()).items() if _is_task(k)}
        old = {task_id for task_id, newest in listed.items() if newest < now - policy.inputs_age_s}
        objects = await policy.objects.remove(sorted(await _orphans(list(listed), old, activity)))
        cutoff = datetime.fromtimestamp(now, UTC) - timedelta(seconds=policy.inputs_age_s)
        uploads = await policy.objects.abort_stale_uploads(cutoff)
    return Swept(spools=spools, inputs=inputs, objects=objects, uploads=uploads)


async def _orphans(task_ids: list[str], stale: set[str], activity: TaskActivity) -> set[str]:
    """Which of these tasks' inputs go. Known: kept while the task runs, removed once it has
    finished; unknown (purged, or never committed): removed once stale."""
    known: dict[str, bool] = {}
    for start in range(0, len(task_ids), _BATCH):
        known.update(await activity(task_ids[start : start + _BATCH]))
    return {task_id for task_id in task_ids if not known.get(task_id, task_id not in stale)}


def _is_spool(name: str) -> bool:
    return name.startswith(SPOOL_PREFIX)


def _is_task(name: str) -> bool:
    return _TASK_ID.fullmatch(name) is not None


def _folders(root: Path, ours: Callable[[str], bool]) -> list[Path]:
    """Our folders directly under ``root`` (symlinks, even to folders, are not ours)."""
    try:
        with os.scandir(root) as entries:
            return [
                Path(entry.path)
                for entry in entries
                if ours(entry.name) and entry.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []


def _stale(root: Path, ours: Callable[[str], bool], age_s: float) -> list[Path]:
    """Our folders directly under ``root`` with nothing changed in them for ``age_s``."""
    stale = _older(folders := _folders(root, ours), age_s)
    return [folder for folder in folders if folder.name in stale]


def _older(folders: list[Path], age_s: float) -> set[str]:
    """The names of those ``folders`` with nothing changed in them for ``age_s``."""
    cutoff = time.time() - age_s
    return {folder.name for folder in folders if _last_change(folder) < cutoff}


def _last_change(folder: Path) -> float:
    """The newest mtime of the folder and of its entries, links not followed: a file still being
    written keeps its folder fresh, whatever the folder's own mtime says. A folder that vanished
    or cannot be read counts as fresh: it is someone else's business."""
    try:
        newest = folder.lstat().st_mtime
        with os.scandir(folder) as entries:
            for entry in entries:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return float("inf")
    return newest


def _remove(folders: list[Path]) -> int:
    removed = 0
    for folder in folders:
        try:
            # On Linux rmtree works through directory fds and refuses a folder swapped for a
            # symlink since it was listed; links inside are unlinked, never followed.
            shutil.rmtree(folder)
        except FileNotFoundError:
            continue  # its request or task finished, or another replica swept it, meanwhile
        except OSError as exc:
            log.warning(
                "could not remove an orphaned folder",
                extra={"fields": {"path": str(folder), "error": exc.strerror or str(exc)}},
            )
            continue
        removed += 1
    return removed
