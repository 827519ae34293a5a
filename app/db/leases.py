"""Named leases in the database: which node runs a cluster-wide chore.

Housekeeping (purging finished tasks and expired images, releasing holds of dead requests) must
run somewhere in the cluster, whichever nodes are up, but once: N nodes purging the same rows at
once only contend. The database every node already shares decides, with no consensus of our own:
one row per chore, taken by a single atomic statement,

    INSERT … ON CONFLICT (name) DO UPDATE SET holder, expires_at
        WHERE leases.holder = me OR leases.expires_at < now   RETURNING holder

which either inserts (nobody held it), renews (we hold it), takes over (the holder let it lapse:
it died, or stalled past the lease) or changes nothing (someone else holds it). The holder renews
it on every run; when it dies, another node takes it once ``expires_at`` has passed.

Times come from ``clock`` (the nodes' clocks: keep them in NTP sync, as leases of the task queue
already require); tests inject one.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Connection, Table, delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from app.db.tables import Lease, utcnow
from app.db.writer import Writer


class Leases:
    def __init__(self, writer: Writer, *, holder: str, clock: Callable[[], datetime] = utcnow) -> None:
        self._writer = writer
        self.holder = holder
        self._now = clock

    async def take(self, name: str, ttl: timedelta) -> bool:
        """Take, renew or take over ``name`` until now + ``ttl``; False while another holds it."""
        return await self._writer.run(lambda c: self.take_in(c, name, ttl))

    def take_in(self, c: Connection, name: str, ttl: timedelta) -> bool:
        now = self._now()
        insert = pg_insert if c.dialect.name == "postgresql" else sqlite_insert
        table = Lease.__table__
        assert isinstance(table, Table)
        statement = (
            insert(table)
            .values(name=name, holder=self.holder, expires_at=now + ttl)
            .on_conflict_do_update(
                index_elements=[table.c.name],
                set_={"holder": self.holder, "expires_at": now + ttl},
                where=(table.c.holder == self.holder) | (table.c.expires_at < now),
            )
            .returning(table.c.holder)
        )
        return c.execute(statement).first() is not None

    async def release(self, name: str) -> None:
        """Give ``name`` up (a clean shutdown), so another node takes it at its next try."""
        await self._writer.run(
            lambda c: c.execute(delete(Lease).where(Lease.name == name, Lease.holder == self.holder))
        )

    async def holder_of(self, name: str) -> str | None:
        """Who holds ``name`` now (None: nobody, or it lapsed)."""

        def read(c: Connection) -> str | None:
            row = c.execute(
                Lease.__table__.select().where(Lease.name == name, Lease.expires_at >= self._now())
            ).first()
            return None if row is None else str(row.holder)

        return await self._writer.run(read)
