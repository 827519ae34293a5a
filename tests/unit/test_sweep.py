"""The orphan sweep (app/images/intake/sweep.py) on real folders, with ages set through their mtimes."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from app.images.intake.sweep import SweepPolicy, Swept, sweep
from app.runtime.settings import ConfigError, build_settings
from app.tasks.queue import new_task_id

HOUR = 3600.0
OLD = 2 * HOUR


class Tasks:
    """The queue's answer to "which of these have a row, and is it queued or in progress", recording
    the questions."""

    def __init__(self, *active: str, finished: tuple[str, ...] = (), failures: int = 0) -> None:
        self.rows = {task_id: True for task_id in active} | {task_id: False for task_id in finished}
        self.failures = failures
        self.asked: list[list[str]] = []

    async def __call__(self, task_ids: list[str]) -> dict[str, bool]:
        self.asked.append(list(task_ids))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the database is away")
        return {task_id: self.rows[task_id] for task_id in task_ids if task_id in self.rows}


@pytest.fixture
def policy(tmp_path: Path) -> SweepPolicy:
    return SweepPolicy(
        spool_root=tmp_path / "spool",
        inputs_root=tmp_path / "task_inputs",
        spool_age_s=HOUR,
        inputs_age_s=HOUR,
    )


def folder(root: Path, name: str, *, age_s: float = 0.0, files: int = 1) -> Path:
    """A folder with files, everything last changed ``age_s`` ago."""
    path = root / name
    path.mkdir(parents=True)
    for index in range(files):
        (path / f"{index:03d}-image").write_bytes(b"\x89PNG" + secrets.token_bytes(16))
    set_age(path, age_s)
    return path


def set_age(path: Path, age_s: float) -> None:
    """Set ``path`` and its entries (links themselves, not their targets) to ``age_s`` old."""
    when = time.time() - age_s
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            os.utime(child, (when, when), follow_symlinks=False)
    os.utime(path, (when, when), follow_symlinks=False)


async def test_fresh_spools_stay_and_old_ones_go(policy: SweepPolicy) -> None:
    fresh = folder(policy.spool_root, "upload-fresh123", age_s=60)
    old = folder(policy.spool_root, "upload-old45678", age_s=OLD, files=3)
    empty_old = folder(policy.spool_root, "upload-empty999", age_s=OLD, files=0)
    swept = await sweep(policy, Tasks())
    assert swept == Swept(spools=2, inputs=0)
    assert fresh.is_dir() and not old.exists() and not empty_old.exists()


async def test_a_spool_still_being_written_is_fresh_whatever_its_folder_mtime(policy: SweepPolicy) -> None:
    # A long upload: the folder was made (its mtime) long ago, but a file in it was written just now.
    spool = folder(policy.spool_root, "upload-longone1", age_s=OLD, files=2)
    os.utime(spool / "001-image")
    assert await sweep(policy, Tasks()) == Swept(spools=0, inputs=0)
    assert spool.is_dir()


async def test_an_active_tasks_inputs_stay_however_old(policy: SweepPolicy) -> None:
    queued, running, finished, fresh_finished, unknown, fresh_unknown = (new_task_id() for _ in range(6))
    kept = [
        folder(policy.inputs_root, queued, age_s=10 * OLD),
        folder(policy.inputs_root, running, age_s=OLD),
        # Not known to the queue yet (moved in, row not committed), but too young to judge.
        folder(policy.inputs_root, fresh_unknown, age_s=5),
    ]
    gone = [
        folder(policy.inputs_root, finished, age_s=OLD),  # its worker died before removing it
        # Killed between its outcome commit and the removal: finished, so it goes however young.
        folder(policy.inputs_root, fresh_finished, age_s=5),
        folder(policy.inputs_root, unknown, age_s=OLD),  # purged, or the submission never committed
    ]
    tasks = Tasks(queued, running, finished=(finished, fresh_finished))
    assert await sweep(policy, tasks) == Swept(spools=0, inputs=3)
    assert all(path.is_dir() for path in kept)
    assert not any(path.exists() for path in gone)
    assert sorted(tasks.asked[0]) == sorted(
        [queued, running, finished, fresh_finished, unknown, fresh_unknown]
    )


async def test_unrelated_files_and_folders_are_left_alone(policy: SweepPolicy) -> None:
    strangers = [
        folder(policy.spool_root, "operator-notes", age_s=10 * OLD),
        folder(policy.spool_root, "tmp", age_s=10 * OLD),
        folder(policy.inputs_root, "task_123", age_s=10 * OLD),  # not a task id of ours
        folder(policy.inputs_root, "TASK_" + "A" * 32, age_s=10 * OLD),
        folder(policy.inputs_root, "backup", age_s=10 * OLD),
    ]
    plain_files = [policy.spool_root / "upload-not-a-folder", policy.inputs_root / new_task_id()]
    for path in plain_files:
        path.write_bytes(b"x")
        set_age(path, 10 * OLD)
    tasks = Tasks()
    assert await sweep(policy, tasks) == Swept(spools=0, inputs=0)
    assert all(path.is_dir() for path in strangers)
    assert all(path.is_file() for path in plain_files)
    assert tasks.asked == []


async def test_symlinks_are_never_followed(policy: SweepPolicy, tmp_path: Path) -> None:
    outside = folder(tmp_path, "elsewhere", age_s=10 * OLD, files=2)
    secret = tmp_path / "secret.txt"
    secret.write_text("keep me")
    policy.spool_root.mkdir()
    policy.inputs_root.mkdir()
    # Links named like our folders, pointing at a folder outside: neither link nor target is touched.
    links = [policy.spool_root / "upload-linked12", policy.inputs_root / new_task_id()]
    for link in links:
        link.symlink_to(outside, target_is_directory=True)
        set_age(link, 10 * OLD)
    # A real orphan holding links out: the orphan goes, what its links point at stays.
    orphan = folder(policy.spool_root, "upload-orphan12", age_s=0)
    (orphan / "to-secret").symlink_to(secret)
    (orphan / "to-elsewhere").symlink_to(outside, target_is_directory=True)
    set_age(orphan, OLD)
    assert await sweep(policy, Tasks()) == Swept(spools=1, inputs=0)
    assert not orphan.exists()
    assert all(link.is_symlink() for link in links)
    assert sorted(p.name for p in outside.iterdir()) == ["000-image", "001-image"]
    assert secret.read_text() == "keep me"


async def test_missing_roots_are_nothing_to_sweep(policy: SweepPolicy) -> None:
    assert await sweep(policy, Tasks()) == Swept(spools=0, inputs=0)


async def test_many_candidates_are_asked_about_in_batches(policy: SweepPolicy) -> None:
    ids = [new_task_id() for _ in range(1203)]
    for name in ids:
        folder(policy.inputs_root, name, age_s=OLD, files=0)
    tasks = Tasks(*ids[::2])
    assert await sweep(policy, tasks) == Swept(spools=0, inputs=601)
    assert [len(batch) for batch in tasks.asked] == [500, 500, 203]
    assert sorted(p.name for p in policy.inputs_root.iterdir()) == sorted(ids[::2])


async def test_spools_are_swept_while_the_database_is_away(policy: SweepPolicy) -> None:
    spool = folder(policy.spool_root, "upload-old45678", age_s=OLD)
    inputs = folder(policy.inputs_root, new_task_id(), age_s=OLD)
    with pytest.raises(ConnectionError):
        await sweep(policy, Tasks(failures=1))
    assert not spool.exists()
    assert inputs.is_dir()  # unknown whether its task still runs: kept until the queue can answer


def test_the_default_ages_outlive_any_live_request(tmp_path: Path) -> None:
    settings = build_settings({"data_dir": str(tmp_path)})
    longest = (
        settings.server.body_deadline_s
        + settings.retry.deadline_s
        + max(u.timeout_s for u in settings.upstreams)
        + settings.server.shutdown_grace_s
    )
    assert settings.uploads.orphan_age_s > longest
    assert settings.server.body_deadline_s > settings.server.body_read_timeout_s


def test_a_spool_age_a_live_request_could_reach_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"uploads\.orphan_age_s must be above"):
        build_settings({"data_dir": str(tmp_path), "uploads": {"orphan_age_s": 1200}})
    with pytest.raises(ConfigError, match=r"uploads\.orphan_age_s must be above"):
        build_settings({"data_dir": str(tmp_path), "retry": {"deadline_s": 30_000}})
    with pytest.raises(ConfigError, match="inputs_orphan_age_s"):
        build_settings({"data_dir": str(tmp_path), "tasks": {"inputs_orphan_age_s": 5}})


def test_task_ids_are_recognised_as_the_queue_makes_them() -> None:
    from app.images.intake.sweep import _is_task

    assert all(_is_task(new_task_id()) for _ in range(50))
