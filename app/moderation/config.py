"""Moderation configuration: the ``moderation:`` settings section and the policy file's schema.

The settings (``ModerationSettings``) say which checkers run and where the policy file is; the
policy file (``app/defaults/moderation.yaml`` unless configured) holds the word and phrase lists.
Both are validated at start, so a typo in a category name or a threshold fails the boot with a
message naming the field, rather than silently letting content through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from app.moderation.base import CheckerName, Level, Severity

Threshold = Literal["low", "medium", "high", "never"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _default_upstream_thresholds() -> dict[Level, dict[str, float]]:
    # ``low`` looks only at the categories whose cost of a miss is highest; ``auto`` at all of them.
    return {
        "low": {"sexual/minors": 0.3, "self-harm/instructions": 0.7, "illicit/violent": 0.8},
        "auto": {"*": 0.5, "sexual/minors": 0.2},
    }


class UpstreamModerationSettings(_Strict):
    """An OpenAI-compatible ``/moderations`` endpoint (omni-moderation-latest reads text and images).

    ``thresholds``: per level, category → minimum score that blocks; ``"*"`` is the default for
    categories not named. A category absent at a level (and no ``"*"``) never blocks there.
    ``fail_open``: when the call fails or times out, let the request through (the built-in checks
    have already run) instead of answering 503 ``moderation_unavailable``."""

    enabled: bool = True
    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    model: str = "omni-moderation-latest"
    timeout_s: float = Field(default=5.0, gt=0)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    fail_open: bool = True
    moderate_images: bool = True
    thresholds: dict[Level, dict[str, float]] = Field(default_factory=_default_upstream_thresholds)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("thresholds")
    @classmethod
    def _scores_are_probabilities(cls, value: dict[Level, dict[str, float]]) -> dict[Level, dict[str, float]]:
        for level, table in value.items():
            for category, score in table.items():
                if not 0.0 <= score <= 1.0:
                    raise ValueError(f"thresholds.{level}.{category}: {score} is not between 0 and 1")
        return value

    @property
    def active(self) -> bool:
        """Without a key the upstream is skipped, so the default config works with no account."""
        return self.enabled and self.api_key is not None


DEFAULT_POLICY_FILE = str(Path(__file__).resolve().parents[1] / "defaults" / "moderation.yaml")


def _default_checkers() -> list[CheckerName]:
    return ["blocklist", "classifier", "upstream"]


class ModerationSettings(_Strict):
    """The ``moderation:`` section of the gateway config."""

    enabled: bool = True
    # The policy shipped in the package unless set; in a config file, relative to that file.
    policy_file: str = DEFAULT_POLICY_FILE
    # Run in this order; the first checker that blocks decides. "upstream" is skipped when not configured.
    checkers: list[CheckerName] = Field(default_factory=_default_checkers)
    # Global operator lists (per-key lists live on the key). Entries are matched as whole words after
    # the same normalisation as prompts; ``{a,b}`` expands (``kill{,s,ing}``).
    blocklist: list[str] = Field(default_factory=list)
    allowlist: list[str] = Field(default_factory=list)
    # Keep the raw prompt in audit events (otherwise only its SHA-256).
    store_prompts: bool = False
    upstream: UpstreamModerationSettings | None = None

    @field_validator("policy_file", mode="before")
    @classmethod
    def _shipped_policy(cls, value: Any) -> Any:
        return DEFAULT_POLICY_FILE if value in (None, "") else value

    @field_validator("checkers")
    @classmethod
    def _unique(cls, value: list[CheckerName]) -> list[CheckerName]:
        if len(set(value)) != len(value):
            raise ValueError("checkers: each checker may appear once")
        return value


# -- the policy file ---------------------------------------------------------------------------------


class CategoryTerms(_Strict):
    """A category's terms, grouped by the severity that each entry carries."""

    high: list[str] = Field(default_factory=list)
    medium: list[str] = Field(default_factory=list)
    low: list[str] = Field(default_factory=list)

    def by_severity(self) -> list[tuple[Severity, list[str]]]:
        return [("high", self.high), ("medium", self.medium), ("low", self.low)]


class RuleClause(_Strict):
    """One side of a co-occurrence rule: any term of the named groups, or any term of the named
    categories at or above the given severity."""

    groups: list[str] = Field(default_factory=list)
    categories: dict[str, Severity] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _not_empty(self) -> RuleClause:
        if not self.groups and not self.categories:
            raise ValueError("a rule clause needs at least one group or category")
        return self


class RuleSpec(_Strict):
    """Block ``category`` at ``severity`` when every clause has a match within ``window_chars``
    (of normalised text) of the others, or within ``cross_sentence_chars`` when a sentence ends
    between them: context that no single word carries. The shorter reach across sentences keeps
    "A child. Naked." together while long prompts that mention children in one sentence and a
    "sensual perfume" three sentences later stay apart."""

    name: str = Field(min_length=1)
    category: str = Field(min_length=1)
    severity: Severity = "high"
    window_chars: int = Field(default=200, ge=1)
    cross_sentence_chars: int = Field(default=40, ge=0)
    all_of: list[RuleClause] = Field(min_length=2)


class PolicyFile(_Strict):
    version: Literal[1] = 1
    # Per level: "default" and category names → the lowest entry severity that blocks.
    levels: dict[Level, dict[str, Threshold]]
    # Phrases whose span suppresses any category match inside it ("breast cancer").
    allow: list[str] = Field(default_factory=list)
    # Terms that mean nothing alone but matter in rules (e.g. words that denote a minor).
    groups: dict[str, list[str]] = Field(default_factory=dict)
    categories: dict[str, CategoryTerms]
    rules: list[RuleSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_exist(self) -> PolicyFile:
        known = set(self.categories) | {rule.category for rule in self.rules}
        for level in ("low", "auto"):
            if level not in self.levels:
                raise ValueError(f"levels.{level} is missing")
            unknown = set(self.levels[level]) - known - {"default"}
            if unknown:
                raise ValueError(f"levels.{level}: unknown categories {sorted(unknown)}")
        for rule in self.rules:
            for clause in rule.all_of:
                missing_groups = set(clause.groups) - set(self.groups)
                missing_categories = set(clause.categories) - set(self.categories)
                if missing_groups or missing_categories:
                    raise ValueError(
                        f"rule '{rule.name}': unknown groups {sorted(missing_groups)} "
                        f"or categories {sorted(missing_categories)}"
                    )
        return self

    def threshold(self, level: Level, category: str) -> Threshold:
        table = self.levels[level]
        return table.get(category, table.get("default", "never"))


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file and the field."""


def load_policy(path: Path) -> PolicyFile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"moderation policy: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"moderation policy: {path} is not valid YAML: {exc}") from exc
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise PolicyError(f"moderation policy {path}: {problems}") from exc
