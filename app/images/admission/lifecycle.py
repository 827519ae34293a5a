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
from dataclasses import dataclass
from email.utils import format_datetime

from app.core.errors import ModelRetiredError
from app.domain.catalog import Catalog, LifecycleState, ModelCapabilities
from app.domain.jobs import ImageJob

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


def lifecycle_headers(
    *, sunset_at: dt.datetime | None, deprecated_at: dt.datetime | None, served_as: str | None
) -> dict[str, str]:
    """The headers every answer about a model in its lifecycle carries (module docstring)."""
    headers: dict[str, str] = {}
    if sunset_at is not None:
        headers["Sunset"] = sunset_header(sunset_at)
    if deprecated_at is not None:
        headers["Deprecation"] = deprecation_header(deprecated_at)
    if served_as is not None:
        headers["x-gateway-model"] = served_as
    return headers


def job_headers(job: ImageJob) -> dict[str, str]:
    """A job's lifecycle headers, from what admission recorded on it."""
    return lifecycle_headers(
        sunset_at=job.sunset_at,
        deprecated_at=job.deprecated_at,
        served_as=job.model if job.requested_model is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Resolution:
    """The model a request is served as, and where it stands in its lifecycle."""

    caps: ModelCapabilities
    # A scheduled retirement (``Sunset``), and the retirement of a model served past it
    # (``Deprecation``).
    sunset_at: dt.datetime | None = None
    deprecated_at: dt.datetime | None = None
    retired: bool = False
    # The model the client asked for, when its replacement serves it.
    requested: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        served_as = self.caps.name if self.requested is not None else None
        return lifecycle_headers(
            sunset_at=self.sunset_at, deprecated_at=self.deprecated_at, served_as=served_as
        )


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
                return self._served(requested, caps, sunset_at=retires)
            if self._serves_retired(caps.name):
                return self._served(requested, caps, deprecated_at=retires, retired=True)
            replacement = self._catalog.get(caps.replacement) if caps.replacement else None
            if replacement is None or not self._remaps(requested.name):
                break
            caps = replacement
        raise ModelRetiredError(requested.retirement_message())

    def _served(
        self,
        requested: ModelCapabilities,
        caps: ModelCapabilities,
        *,
        sunset_at: dt.datetime | None = None,
        deprecated_at: dt.datetime | None = None,
        retired: bool = False,
    ) -> Resolution:
        if caps.name == requested.name:
            return Resolution(caps=caps, sunset_at=sunset_at, deprecated_at=deprecated_at, retired=retired)
        # Remapped: the answer says the model asked for is retired, and names what served it.
        assert requested.retires is not None  # only a retired model is remapped
        return Resolution(
            caps=caps,
            sunset_at=sunset_at,
            deprecated_at=requested.retires,
            retired=retired,
            requested=requested.name,
        )
