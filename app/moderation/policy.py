"""The moderation service: the effective level, the checker pipeline, and audit events.

Levels (SPEC §4): the request asks ``low`` or ``auto`` (default); the key's policy bounds it:

    key policy   request low   request auto
    default      low           auto
    strict       auto          auto           (a strict key cannot loosen its moderation)
    off          off           off            (trusted internal keys: no gateway-side checks)

The prompt runs through the configured checkers in order (``moderation.checkers``, by default
blocklist → classifier → upstream); the first block decides, so the paid upstream call is skipped
when a local list already blocks. Edit input images go to the upstream model only: nothing local
can read pixels. A block yields an ``AuditEvent``; the caller persists it, counts it, and raises
``outcome.raise_if_blocked()``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path

from app.core.errors import InvalidRequestError
from app.moderation.base import (
    AuditEvent,
    EffectiveLevel,
    ModerationOutcome,
    TextChecker,
    TextInput,
    Verdict,
)
from app.moderation.classifier import Classifier
from app.moderation.config import ModerationSettings, PolicyError, load_policy
from app.moderation.lists import BlocklistChecker, TermCache, validate_terms
from app.moderation.normalize import normalize
from app.moderation.thumbnails import thumbnail
from app.moderation.upstream import UpstreamModerator
from app.upstream.client import Session

_KEY_POLICIES = ("default", "strict", "off")


def effective_level(requested: str | None, key_policy: str) -> EffectiveLevel:
    """The level a request is moderated at. An unknown requested level is the client's error (400,
    param ``moderation``); an unknown key policy is a data error and raises ``ValueError``."""
    if key_policy not in _KEY_POLICIES:
        raise ValueError(f"unknown key moderation policy {key_policy!r}")
    level = "auto" if requested is None else requested
    if level not in ("low", "auto"):
        raise InvalidRequestError(
            f"Invalid value: '{requested}'. Supported values are: 'low' and 'auto'.",
            param="moderation",
            code="invalid_value",
        )
    if key_policy == "off":
        return "off"
    if key_policy == "strict" or level == "auto":
        return "auto"
    return "low"


def sha256_hex(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


class ModerationService:
    """Built once at start (the lifespan owns it and calls ``aclose``); safe to share across requests."""

    def __init__(
        self,
        *,
        settings: ModerationSettings,
        classifier: Classifier | None,
        blocklist: BlocklistChecker | None,
        upstream: UpstreamModerator | None,
    ) -> None:
        self.settings = settings
        self.classifier = classifier
        self.blocklist = blocklist
        self.upstream = upstream
        available: dict[str, TextChecker | None] = {
            "blocklist": blocklist,
            "classifier": classifier,
            "upstream": upstream,
        }
        self._text_checkers = [c for name in settings.checkers if (c := available[name]) is not None]

    @classmethod
    def from_settings(
        cls, settings: ModerationSettings, *, base_dir: Path, client: Session | None = None
    ) -> ModerationService:
        """Load and compile the policy file and lists; raises ``PolicyError`` naming what is wrong.
        ``client`` is for tests: an aiohttp session for the upstream model, left open here."""
        try:
            validate_terms(settings.blocklist)
            validate_terms(settings.allowlist)
        except ValueError as exc:
            raise PolicyError(f"moderation: {exc}") from exc
        cache = TermCache()
        classifier = None
        if "classifier" in settings.checkers:
            path = Path(settings.policy_file)
            policy = load_policy(path if path.is_absolute() else base_dir / path)
            try:
                classifier = Classifier(policy, allowlist=settings.allowlist, cache=cache)
            except ValueError as exc:
                raise PolicyError(f"moderation policy {path}: {exc}") from exc
        blocklist = (
            BlocklistChecker(settings.blocklist, cache=cache) if "blocklist" in settings.checkers else None
        )
        upstream = None
        if settings.upstream is not None and settings.upstream.active and "upstream" in settings.checkers:
            upstream = UpstreamModerator(settings.upstream, client=client)
        return cls(settings=settings, classifier=classifier, blocklist=blocklist, upstream=upstream)

    async def aclose(self) -> None:
        if self.upstream is not None:
            await self.upstream.aclose()

    def _level(self, requested: str | None, key_policy: str) -> EffectiveLevel:
        level = effective_level(requested, key_policy)
        return level if self.settings.enabled else "off"

    async def check_prompt(
        self,
        *,
        prompt: str,
        requested_level: str | None,
        key_policy: str,
        key_id: str,
        allow: Sequence[str] = (),
        block: Sequence[str] = (),
    ) -> ModerationOutcome:
        level = self._level(requested_level, key_policy)
        if level == "off":
            return ModerationOutcome(level=level, verdict=Verdict.allow(level))
        request = TextInput(prompt, normalize(prompt), level, tuple(allow), tuple(block))
        degraded = False
        for checker in self._text_checkers:
            verdict = await checker.check_text(request)
            if verdict.blocked:
                return ModerationOutcome(
                    level=level, verdict=verdict, audit=self._audit(key_id, verdict, prompt)
                )
            degraded = degraded or verdict.degraded
        return ModerationOutcome(level=level, verdict=Verdict.allow(level, degraded=degraded))

    async def check_images(
        self, *, images: Sequence[bytes | Path], requested_level: str | None, key_policy: str, key_id: str
    ) -> ModerationOutcome:
        level = self._level(requested_level, key_policy)
        if level == "off" or self.upstream is None or not images:
            return ModerationOutcome(level=level, verdict=Verdict.allow(level))
        data: list[bytes] = []
        hashes: list[str] = []
        for item in images:  # one at a time: a single decoded image in memory
            if isinstance(item, bytes):
                data.append(item)
                hashes.append(sha256_hex(item))
            else:
                small = await asyncio.to_thread(thumbnail, item)
                data.append(small.data)
                hashes.append(small.original_sha256)
        verdict = await self.upstream.check_images(data, level=level)
        if not verdict.blocked:
            return ModerationOutcome(level=level, verdict=verdict)
        audit = self._audit(key_id, verdict, None, image_hashes=hashes)
        return ModerationOutcome(level=level, verdict=verdict, audit=audit)

    def _audit(
        self, key_id: str, verdict: Verdict, prompt: str | None, *, image_hashes: Sequence[str] = ()
    ) -> AuditEvent:
        return AuditEvent(
            key_id=key_id,
            stage=verdict.stage,
            level=verdict.level,
            checker=verdict.checker or "unknown",
            categories=verdict.categories,
            rules=verdict.rules,
            prompt_sha256=sha256_hex(prompt) if prompt is not None else None,
            prompt=prompt if self.settings.store_prompts else None,
            image_sha256=tuple(image_hashes),
        )
