"""One upstream's settings (the ``upstreams:`` list of the config file).

It lives with the upstream package, as ``storage/config.py`` and ``moderation/config.py`` do with
theirs, so that the adapters read their own section without importing the settings root above them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from app.security import is_placeholder


class UpstreamModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    upstream_model: str | None = None


def _all_models() -> list[str | UpstreamModelSettings]:
    return ["*"]


class UpstreamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    # gemini | imagen | bfl | stability: image providers with their own wire formats (issue 19).
    kind: Literal["openai", "azure", "local", "gemini", "imagen", "bfl", "stability"]
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_version: str | None = None
    models: list[str | UpstreamModelSettings] = Field(default_factory=_all_models)
    weight: int = Field(default=1, ge=1)
    # Lower numbers are tried first; the same number forms one weighted tier.
    priority: int = 0
    timeout_s: float = Field(default=300.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Calls in flight from one process; null (the default) means no cap at all, not even the
    # HTTP client's pool. With a cap, a call waits up to `queue_timeout_s` for a slot, then gets
    # `busy_status` (429 or 503) with retry-after, unless another upstream can take it.
    max_concurrency: int | None = Field(default=None, ge=1)
    queue_timeout_s: float = Field(default=30.0, ge=0)
    busy_status: Literal[429, 503] = 503
    enabled: bool = True
    # Whether the upstream can stream SSE; when False, streams are answered with completed events.
    stream: bool = True
    # `local` only: pause before each streamed event, to mimic a real upstream's pace.
    stream_pace_s: float = Field(default=0.0, ge=0, le=60)
    # `bfl` only: how long a submitted job is polled (first interval, growing x1.5 to the max), and
    # the hosts the key may be sent to (polling_url) and images fetched from (result.sample):
    # `host`, `host:port` or `*.domain`. None: BFL's own (api.bfl.ai, *.bfl.ai).
    poll_budget_s: float = Field(default=300.0, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0)
    poll_max_interval_s: float = Field(default=5.0, gt=0)
    polling_hosts: list[str] | None = None
    delivery_hosts: list[str] | None = None
    # Whether this upstream stops serving a model on OpenAI's retirement date (the catalog's
    # `retired_at`). Unset: true for the openai and azure kinds, false for local. Set false for a
    # compatible server that still serves a retired model.
    follows_retirements: bool | None = None
    # `local` only: the models it stands in for when a real upstream serving them is configured
    # (``"*"``: every model). Empty by default, so `local` never serves a placeholder in place of a
    # configured provider that failed or retired the model (SPEC §2); it still serves every model
    # that no active real upstream lists.
    fallback_for: list[str] = Field(default_factory=list)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check(self) -> UpstreamSettings:
        if self.kind in ("openai", "azure") and not self.base_url:
            raise ValueError(f"upstream '{self.name}': base_url is required for kind {self.kind}")
        if self.api_key is not None and is_placeholder(self.api_key.get_secret_value()):
            raise ValueError(f"upstream '{self.name}': api_key is a placeholder; set a real key")
        if self.fallback_for and self.kind != "local":
            raise ValueError(f"upstream '{self.name}': fallback_for is only for kind local")
        return self

    def stands_in_for(self, model: str) -> bool:
        """Whether this (`local`) upstream may serve ``model`` beside a real upstream for it."""
        return "*" in self.fallback_for or model in self.fallback_for

    @property
    def follows_openai_retirements(self) -> bool:
        if self.follows_retirements is not None:
            return self.follows_retirements
        return self.kind in ("openai", "azure")

    @property
    def active(self) -> bool:
        """Remote upstreams without a key are skipped, so a default config works with no account."""
        if not self.enabled:
            return False
        return self.kind == "local" or self.api_key is not None

    def model_map(self, catalog_names: list[str]) -> dict[str, str]:
        """Public model name → name sent upstream, with ``*`` expanded to the catalog."""
        mapping: dict[str, str] = {}
        for entry in self.models:
            if isinstance(entry, str):
                names = catalog_names if entry == "*" else [entry]
                for name in names:
                    mapping.setdefault(name, name)
            else:
                mapping[entry.name] = entry.upstream_model or entry.name
        return mapping
