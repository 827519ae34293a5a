"""Group commit: writes that arrive together share one transaction.

An async submission writes one task row and answers 202 once it is committed. Committed one by one,
every submission paid a transaction of its own: on SQLite the WAL frames of every page the insert
touched (the tasks table and its four indexes, ~300 µs measured), on PostgreSQL a pool checkout, a
ping, BEGIN, COMMIT and its WAL flush, each a round trip. Under a burst (issue 16: 2,000 tasks
submitted at once) that was most of the time a submission took.

A ``Batcher`` collects the items handed to it while a batch is being written and writes them all
in the next transaction with one function over the whole list, which can use multi-row statements
(one INSERT for the batch, one COUNT per key instead of one per item). Nothing waits on a timer:
the batch is whatever arrived while the previous one was written, plus whatever reached the batcher
in the same turn of the event loop. Each caller is answered only after its batch has committed, so
nothing is acknowledged that is not durable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy import Connection

from app.db.writer import Writer

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - an item, as in the standard library's typing examples
R = TypeVar("R")

# What a batch function returns for each item, in order: its result, or the exception its caller
# gets (a refusal decided inside the transaction, such as a full queue).
BatchWork = Callable[[Connection, Sequence[I]], Sequence["R | BaseException"]]

# Items per transaction at most: bounds how long one transaction holds the write lock (SQLite) or
# its row locks (PostgreSQL), and the size of its statements.
MAX_BATCH = 256


class Batcher(Generic[I, R]):
    """Writes items in batches through ``writer`` with ``work(connection, items)``.

    ``work`` must return one outcome per item, in order, and must not leave a refused item's writes
    behind: it decides every item before it writes (there are no savepoints between items). If the
    batch's transaction fails as a whole, each of its items is written again alone, so one bad item
    cannot fail the others.
    """

    def __init__(self, writer: Writer, work: BatchWork[I, R], *, max_batch: int = MAX_BATCH) -> None:
        self._writer = writer
        self._work = work
        self._max = max_batch
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Committed batches and the items they carried (tests and /metrics read them).
        self.batches = 0
        self.items = 0

    async def submit(self, item: I) -> R:
        """Write ``item`` with the next batch; returns once that batch has committed.

        A caller cancelled meanwhile does not take its item out: the batch is written regardless
        (the caller decides what a cancelled submission means for it)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # Read by no one if the caller was cancelled: retrieved here so asyncio does not log it.
        future.add_done_callback(_retrieve)
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        # One more turn of the loop first: the requests being parsed in this turn join the batch.
        await asyncio.sleep(0)
        while self._pending:
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            await self._write(batch)

    async def _write(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            outcomes = await self._writer.run(lambda c: self._checked(c, items))
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            log.warning(
                "group commit failed; writing its items one by one",
                extra={"fields": {"items": len(batch), "error": type(exc).__name__}},
            )
            for one in batch:
                await self._write([one])
            return
        self.batches += 1
        self.items += len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            _settle(future, outcome)

    def _checked(self, c: Connection, items: list[I]) -> Sequence[R | BaseException]:
        outcomes = self._work(c, items)
        if len(outcomes) != len(items):
            raise RuntimeError("a batch function must return one outcome per item")
        return outcomes


def _retrieve(future: asyncio.Future[R]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[R], outcome: R | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
