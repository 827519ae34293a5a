"""Model lifecycle: what a request for a deprecated or retired model gets.

The catalog records each model's ``retired_at`` and ``replacement`` as OpenAI published them.

- Scheduled (a future date): served as usual; every answer carries ``Sunset`` (RFC 8594) with
  the retirement instant.
- Retired (the date has come): upstreams that follow OpenAI's retirements (``openai`` and
  ``azure`` by default) never get it. If another upstream still serves it, it is served there,
  with a ``Deprecation`` header (RFC 9745). Otherwise, when the operator remaps it
  (``lifecycle.remap_retired``), its replacement serves it, billed at the replacement's prices,
  with ``x-gateway-model`` naming what served it and ``Deprecation``. Otherwise the answer is
  OpenAI's 404 ``model_not_found`` naming the date and the replacement, raised while the request
  is validated: before any reservation or upstream call.

The clock is injected so tests can stand on either side of a date.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import format_datetime

from app.core.errors import ModelRetiredError
from app.domain.catalog import Catalog, LifecycleState, ModelCapabilities

# How many replacements may be followed (gpt-image-1 -> 2.5 -> ...); a loop in the catalog stops here.
MAX_HOPS = 3


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sunset_header(at: dt.datetime) -> str:
    """RFC 8594: an HTTP-date."""
    return format_datetime(at.astimezone(dt.UTC), usegmt=True)


def deprecation_header(at: dt.datetime) -> str:
    """RFC 9745: a structured-field date, ``@<unix seconds>``."""
    return f"@{int(at.timestamp())}"


@dataclass(frozen=True, slots=True)
class Resolution:
    """The model a request is served as, and the lifecycle headers of its answers."""

    caps: ModelCapabilities
    headers: dict[str, str] = field(default_factory=dict)
    retired: bool = False
    # The model the client asked for, when its replacement serves it.
    requested: str | None = None


class Lifecycle:
    def __init__(
        self,
        catalog: Catalog,
        *,
        serves_retired: Callable[[str], bool],
        remaps: Callable[[str], bool],
        now: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        """``serves_retired(model)``: whether an upstream that ignores retirements serves it;
        ``remaps(model)``: whether the operator has a retired model served by its replacement."""
        self._catalog = catalog
        self._serves_retired = serves_retired
        self._remaps = remaps
        self._now = now

    def state(self, caps: ModelCapabilities) -> LifecycleState:
        return caps.state(self._now())

    def describe(self, name: str) -> dict[str, str | None]:
        """A model's lifecycle as ``/v1/models`` shows it."""
        caps = self._catalog.get(name)
        if caps is None:
            return {"state": "active", "retired_at": None, "replacement": None, "alias_of": None}
        return {
            "state": self.state(caps),
            "retired_at": caps.retired_at.isoformat() if caps.retired_at else None,
            "replacement": caps.replacement,
            "alias_of": caps.alias_of,
        }

    def resolve(self, caps: ModelCapabilities) -> Resolution:
        """Where a request for ``caps`` goes; raises 404 ``model_not_found`` for a retired model
        nothing can serve."""
        requested = caps
        for _ in range(MAX_HOPS):
            state = caps.state(self._now())
            retires = caps.retires
            if state == "active" or retires is None:
                return self._served(requested, caps)
            if state == "deprecated":
                return self._served(requested, caps, {"Sunset": sunset_header(retires)})
            if self._serves_retired(caps.name):
                return self._served(
                    requested, caps, {"Deprecation": deprecation_header(retires)}, retired=True
                )
            replacement = self._catalog.get(caps.replacement) if caps.replacement else None
            if replacement is None or not self._remaps(requested.name):
                break
            caps = replacement
        raise ModelRetiredError(requested.retirement_message())

    def _served(
        self,
        requested: ModelCapabilities,
        caps: ModelCapabilities,
        headers: dict[str, str] | None = None,
        *,
        retired: bool = False,
    ) -> Resolution:
        headers = dict(headers or {})
        if caps.name == requested.name:
            return Resolution(caps=caps, headers=headers, retired=retired)
        retires = requested.retires
        assert retires is not None  # only a retired model is remapped
        headers["Deprecation"] = deprecation_header(retires)
        headers["x-gateway-model"] = caps.name
        return Resolution(caps=caps, headers=headers, retired=retired, requested=requested.name)
