"""Server-side console sessions.

The browser holds only a random token (an ``HttpOnly`` cookie); the database holds its SHA-256,
the role, the tenant's key id and the session's CSRF token. Nothing in the cookie can be forged
into another role or key, a stolen database row cannot be replayed as a cookie, and signing out
(or expiry) ends the session everywhere at once, on every replica.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.tables import ConsoleSession, utcnow

Role = Literal["operator", "tenant"]
# Page views inside this window do not rewrite last_seen_at: one write a minute, not one a page.
_TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking at a console page."""

    session_id: str
    role: Role
    key_id: str | None
    csrf_token: str
    expires_at: datetime

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class SessionStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        ttl_s: int,
        idle_s: int,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._ttl = timedelta(seconds=ttl_s)
        self._idle = timedelta(seconds=idle_s)
        self._clock = clock

    async def open(self, role: Role, key_id: str | None) -> tuple[str, Viewer]:
        """A new session: returns the cookie token (never stored) and the viewer."""
        token = secrets.token_urlsafe(32)
        now = self._clock()
        row = ConsoleSession(
            id=_digest(token),
            role=role,
            key_id=key_id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
            expires_at=now + self._ttl,
        )
        async with self._sessions.begin() as session:
            session.add(row)
            # Sign-in is the rare write that can afford to sweep what has expired.
            await session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
        return token, _viewer(row)

    async def find(self, token: str | None) -> Viewer | None:
        """The live session for a cookie token, or None (unknown, expired, or idle too long)."""
        if not token or len(token) > 200:
            return None
        session_id = _digest(token)
        now = self._clock()
        async with self._sessions() as session:
            row = (
                await session.execute(select(ConsoleSession).where(ConsoleSession.id == session_id))
            ).scalar_one_or_none()
        if row is None:
            return None
        if row.expires_at <= now or row.last_seen_at + self._idle <= now:
            await self.close(token)
            return None
        if now - row.last_seen_at >= _TOUCH_EVERY:
            async with self._sessions.begin() as session:
                await session.execute(
                    update(ConsoleSession).where(ConsoleSession.id == session_id).values(last_seen_at=now)
                )
        return _viewer(row)

    async def close(self, token: str) -> None:
        async with self._sessions.begin() as session:
            await session.execute(delete(ConsoleSession).where(ConsoleSession.id == _digest(token)))

    async def close_for_key(self, key_id: str) -> None:
        """End a tenant's sessions (their key was revoked)."""
        async with self._sessions.begin() as session:
            await session.execute(delete(ConsoleSession).where(ConsoleSession.key_id == key_id))


def _viewer(row: ConsoleSession) -> Viewer:
    role: Role = "operator" if row.role == "operator" else "tenant"
    return Viewer(
        session_id=row.id,
        role=role,
        key_id=row.key_id,
        csrf_token=row.csrf_token,
        expires_at=row.expires_at,
    )
