"""What every moderation checker shares: levels, the verdict, the audit event.

A checker looks at one request and answers a ``Verdict``. The service (``policy.py``) runs the
configured checkers in order, stops at the first block, and turns a block into an ``AuditEvent``
(for the lead's audit table and per-key/per-category counters) and, at the request path, into a
``ModerationBlockedError`` (400 ``moderation_blocked``, SPEC §1.4). The two moderation errors live
in ``app.core.errors`` with every other error a client can see; they are re-exported here for checkers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from app.core.errors import ModerationBlockedError, ModerationStage
from app.core.errors import ModerationUnavailableError as ModerationUnavailableError
from app.moderation.normalize import NormalizedText

Level = Literal["low", "auto"]
EffectiveLevel = Literal["low", "auto", "off"]
KeyPolicy = Literal["default", "strict", "off"]
Stage = ModerationStage
Severity = Literal["low", "medium", "high"]
CheckerName = Literal["blocklist", "classifier", "upstream"]

LEVELS: tuple[Level, ...] = ("low", "auto")
SEVERITY_RANK: Mapping[str, int] = {"low": 1, "medium": 2, "high": 3}


@dataclass(frozen=True, slots=True)
class Verdict:
    """One checker's (or the whole pipeline's) answer for one request.

    ``rules`` names the policy entries that fired (``"violence/graphic:beheading"``, a blocklist
    term, an upstream category): identifiers from the operator's own lists, never the user's text,
    so they may be audited even when prompts are not stored. ``degraded`` marks an upstream
    check that failed and was skipped under ``fail_open``.
    """

    blocked: bool
    level: EffectiveLevel
    categories: tuple[str, ...] = ()
    stage: Stage = "input"
    checker: str | None = None
    rules: tuple[str, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)
    degraded: bool = False

    @classmethod
    def allow(cls, level: EffectiveLevel, *, checker: str | None = None, degraded: bool = False) -> Verdict:
        return cls(blocked=False, level=level, checker=checker, degraded=degraded)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """A record of one block. The prompt itself is kept only with ``moderation.store_prompts: true``;
    otherwise its SHA-256 lets an operator match a complaint ("my prompt X was blocked") to the event."""

    key_id: str
    stage: Stage
    level: EffectiveLevel
    checker: str
    categories: tuple[str, ...]
    rules: tuple[str, ...]
    prompt_sha256: str | None
    prompt: str | None = None
    image_sha256: tuple[str, ...] = ()
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class ModerationOutcome:
    """What ``ModerationService.check_*`` returns: the effective level, the verdict, and the audit
    event to persist when the verdict is a block (else None)."""

    level: EffectiveLevel
    verdict: Verdict
    audit: AuditEvent | None = None

    @property
    def blocked(self) -> bool:
        return self.verdict.blocked

    def raise_if_blocked(self) -> None:
        """Raise the client-facing error for a block; the caller persists ``audit`` first."""
        if self.verdict.blocked:
            raise ModerationBlockedError(self.verdict.categories, stage=self.verdict.stage)


@dataclass(frozen=True, slots=True)
class TextInput:
    """A prompt as every text checker sees it: normalised once, plus the key's own lists."""

    prompt: str
    text: NormalizedText
    level: Level
    key_allow: tuple[str, ...] = ()
    key_block: tuple[str, ...] = ()


class TextChecker(Protocol):
    """A checker of prompts. Built-in checkers are CPU-only; the upstream one does I/O."""

    name: CheckerName

    async def check_text(self, request: TextInput) -> Verdict: ...


class ImageChecker(Protocol):
    """A checker of edit input images (only the upstream model can look at pixels)."""

    name: CheckerName

    async def check_images(self, images: Sequence[bytes], *, level: Level) -> Verdict: ...
