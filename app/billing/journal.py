"""Settlements the database refused, kept in a file until the database takes them (issue 23).

The ledger retries a refused settlement in its process until it is written (app/billing/ledger.py).
That alone would lose the charge if the process died meanwhile, so the settlement is also appended
here, one JSON line each, flushed to disk before the retries begin. Every reconciler tick replays
the file: a line whose ledger row exists (the retries got there first) is dropped, any other is
written (its row, its charge, its hold released) in one transaction, and the file is rewritten
with what is still refused. Replaying is idempotent, so several processes sharing ``data_dir`` may
replay the same file; a lock file keeps two of them from rewriting it at once.

It is a second line of defence, on the node's own disk: put ``data_dir`` on a persistent volume
where nodes come and go. When the journal cannot be written either (the same full disk as SQLite's)
the in-process retries are all that is left, and that is logged as an error.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Journaled:
    """One refused settlement: its hold (None: it had none) and its ledger row's values."""

    hold: dict[str, Any] | None
    entry: dict[str, Any]


# Writes one journaled settlement; True once its row exists (written now or before).
Apply = Callable[[Journaled], Awaitable[bool]]


class Journal(Protocol):
    """Where refused settlements are kept: this node's file, and Redis's copy where configured."""

    async def append(self, hold: Any, entry: dict[str, Any]) -> bool: ...

    async def replay(self, apply: Apply) -> int: ...


class Journals:
    """The file and the shared copy as one journal: a settlement is kept if either took it, and a
    replay walks both (the second finds the first's rows written and only drops its lines)."""

    def __init__(self, *parts: Journal) -> None:
        self.parts = parts

    async def append(self, hold: Any, entry: dict[str, Any]) -> bool:
        kept = [await part.append(hold, entry) for part in self.parts]
        return any(kept)

    async def replay(self, apply: Apply) -> int:
        return sum([await part.replay(apply) for part in self.parts])


class SettlementJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = path.with_name(path.name + ".lock")

    async def append(self, hold: Any, entry: dict[str, Any]) -> bool:
        """Keep one settlement on disk (flushed and synced); False if the disk refused it too."""
        line = encode_line(hold, entry)
        try:
            await asyncio.to_thread(self._append, line)
        except OSError as exc:
            log.error(
                "a refused settlement could not be journaled either; it is retried in this process only",
                extra={"fields": {"request_id": entry.get("request_id"), "error": exc.strerror}},
            )
            return False
        return True

    def _append(self, line: bytes) -> None:
        with self._locked(wait=True):
            with open(self.path, "ab") as journal:
                journal.write(line)
                journal.flush()
                os.fsync(journal.fileno())

    async def replay(self, apply: Apply) -> int:
        """Write what the journal holds; returns how many settlements it wrote or found written.
        Skipped while another process replays."""
        if not self.path.exists():
            return 0
        lock = await asyncio.to_thread(self._try_lock)
        if lock is None:
            return 0
        try:
            items = await asyncio.to_thread(self._read)
            done, kept = 0, []
            for raw, item in items:
                try:
                    written = item is not None and await apply(item)
                except Exception:
                    log.warning("a journaled settlement is still refused; kept for the next tick")
                    written = False
                if written:
                    done += 1
                elif item is not None:
                    kept.append(raw)
            await asyncio.to_thread(self._rewrite, kept)
            return done
        finally:
            await asyncio.to_thread(self._unlock, lock)

    def _read(self) -> list[tuple[bytes, Journaled | None]]:
        items: list[tuple[bytes, Journaled | None]] = []
        with open(self.path, "rb") as journal:
            for raw in journal:
                if raw.strip():
                    items.append((raw, parse_line(raw)))
        return items

    def _rewrite(self, kept: list[bytes]) -> None:
        if not kept:
            self.path.unlink(missing_ok=True)
            return
        spare = self.path.with_name(self.path.name + ".new")
        with open(spare, "wb") as journal:
            journal.writelines(kept)
            journal.flush()
            os.fsync(journal.fileno())
        os.replace(spare, self.path)

    @contextmanager
    def _locked(self, *, wait: bool) -> Iterator[None]:
        lock = self._open_lock(wait=wait)
        if lock is None:
            raise BlockingIOError("the journal is being replayed")
        try:
            yield
        finally:
            self._unlock(lock)

    def _try_lock(self) -> int | None:
        return self._open_lock(wait=False)

    def _open_lock(self, *, wait: bool) -> int | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def encode_line(hold: Any, entry: dict[str, Any]) -> bytes:
    """One settlement as a journal line (the file's and Redis's format)."""
    return orjson.dumps({"hold": asdict(hold) if hold is not None else None, "entry": entry}) + b"\n"


def parse_line(raw: bytes) -> Journaled | None:
    """A journal line, or None for one that cannot be read (a torn last line after a crash)."""
    try:
        data = orjson.loads(raw)
        entry = dict(data["entry"])
        entry["created_at"] = datetime.fromisoformat(entry["created_at"])
        hold = data.get("hold")
        return Journaled(hold=dict(hold) if isinstance(hold, dict) else None, entry=entry)
    except (ValueError, KeyError, TypeError):
        log.error("an unreadable line of the settlement journal was dropped")
        return None
