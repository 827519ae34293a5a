"""The orphan sweep: spool and task-input folders left behind by a process that died.

Requests remove their spool folder and tasks their input folder on every ending a process lives
through; a SIGKILL or an OOM kill leaves them on disk. Other replicas and ``python -m app worker``
share the data directory, so nothing can be wiped at start: a folder is an orphan only when

- spool (``<spool_root>/upload-*``): nothing has written to it for ``spool_age_s``, longer than any
  live request may hold it (the settings refuse a shorter age);
- task inputs (``<inputs_root>/task_<32 hex>``): its task is neither queued nor in progress (finished,
  purged, or never committed) and the folder is older than ``inputs_age_s``, which covers the moment
  between moving the files in and committing the task row.

Only folders named as the gateway names them are considered; other files, and symlinks (to folders
or anywhere), are left alone, and removal never follows a link. The file system is walked and
changed in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from app.images.intake.spool import SPOOL_PREFIX

log = logging.getLogger(__name__)

# As app.tasks.queue.new_task_id() makes them (tests/unit/test_sweep.py checks they agree).
_TASK_ID = re.compile(r"task_[0-9a-f]{32}")
# Task ids asked about per call, so that the IN (...) list stays far below database limits.
_BATCH = 500

ActiveTasks = Callable[[list[str]], Awaitable[Collection[str]]]
"""Answers which of the given task ids are still queued or in progress (their inputs are in use)."""


@dataclass(frozen=True, slots=True)
class SweepPolicy:
    spool_root: Path
    inputs_root: Path
    spool_age_s: float
    inputs_age_s: float


@dataclass(frozen=True, slots=True)
class Swept:
    spools: int
    inputs: int


async def sweep(policy: SweepPolicy, active: ActiveTasks) -> Swept:
    """Remove orphaned folders once; returns how many of each kind went.

    Spools go first, so a database that cannot answer ``active`` still lets them be swept. Candidates
    are listed before the database is asked, so a task committed meanwhile is seen as active.
    """
    stale_spools = await asyncio.to_thread(_stale, policy.spool_root, _is_spool, policy.spool_age_s)
    spools = await asyncio.to_thread(_remove, stale_spools)
    candidates = await asyncio.to_thread(_stale, policy.inputs_root, _is_task, policy.inputs_age_s)
    busy: set[str] = set()
    names = [path.name for path in candidates]
    for start in range(0, len(names), _BATCH):
        busy.update(await active(names[start : start + _BATCH]))
    inputs = await asyncio.to_thread(_remove, [path for path in candidates if path.name not in busy])
    return Swept(spools=spools, inputs=inputs)


async def sweep_forever(policy: SweepPolicy, active: ActiveTasks, *, interval_s: float) -> None:
    """Sweep at start (what a crash left) and then every ``interval_s``, until cancelled."""
    while True:
        try:
            swept = await sweep(policy, active)
            if swept.spools or swept.inputs:
                log.warning(
                    "removed orphaned upload folders",
                    extra={"fields": {"spools": swept.spools, "task_inputs": swept.inputs}},
                )
        except Exception:
            log.exception("orphan sweep failed; retrying later")
        await asyncio.sleep(interval_s)


def _is_spool(name: str) -> bool:
    return name.startswith(SPOOL_PREFIX)


def _is_task(name: str) -> bool:
    return _TASK_ID.fullmatch(name) is not None


def _stale(root: Path, ours: Callable[[str], bool], age_s: float) -> list[Path]:
    """Our folders directly under ``root`` with nothing changed in them for ``age_s``."""
    cutoff = time.time() - age_s
    try:
        with os.scandir(root) as entries:
            folders = [
                Path(entry.path)
                for entry in entries
                if ours(entry.name) and entry.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []
    return [folder for folder in folders if _last_change(folder) < cutoff]


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
