"""Gateway-side moderation (SPEC §4): a pipeline of checkers run before any upstream is called.

The lifespan builds one ``ModerationService.from_settings(settings.moderation, base_dir=root)`` and
closes it with ``aclose()``. Per request: ``outcome = await service.check_prompt(...)`` (and
``check_images`` for edits); when ``outcome.audit`` is set, persist and count it, then
``outcome.raise_if_blocked()`` raises ``ModerationBlockedError`` (400 ``moderation_blocked``).
"""

from app.core.errors import ModerationBlockedError, ModerationUnavailableError
from app.moderation.base import AuditEvent, EffectiveLevel, KeyPolicy, Level, ModerationOutcome, Verdict
from app.moderation.config import ModerationSettings, PolicyError, UpstreamModerationSettings
from app.moderation.lists import validate_terms
from app.moderation.policy import ModerationService, effective_level

__all__ = [
    "AuditEvent",
    "EffectiveLevel",
    "KeyPolicy",
    "Level",
    "ModerationBlockedError",
    "ModerationOutcome",
    "ModerationService",
    "ModerationSettings",
    "ModerationUnavailableError",
    "PolicyError",
    "UpstreamModerationSettings",
    "Verdict",
    "effective_level",
    "validate_terms",
]
