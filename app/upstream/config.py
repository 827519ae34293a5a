"""One upstream's settings (the ``upstreams:`` list of the config file).

It lives with the upstream package, as ``storage/config.py`` and ``moderation/config.py`` do with
theirs, so that the adapters read their own section without importing the settings root above them.

The upstream kinds: each adapter module registers its kind once, here (``register_kind``), and
nothing else in the gateway names it. A kind says how to build its adapter from an upstream's
settings and how the registry treats it: which catalog models ``"*"`` stands for (``catalog``:
the models whose ``provider.kind`` is this kind; ``unclaimed``: the models no provider claims, for
OpenAI-compatible kinds; ``all``: every model), whether it needs a ``base_url`` or a key, whether
it follows OpenAI's retirements, and whether it is the built-in stand-in. ``UpstreamSettings``
checks a configured ``kind`` against this table, ``registry.py`` reads its rules, and the
catalog's ``provider.kind`` names the kind that serves a model: adding a provider is its module,
its catalog entries and its tests.

Settings: ``UpstreamSettings`` holds what every upstream has (name, kind, key, models, routing,
timeouts, caps); each kind registers the model of its own settings (``ProviderKind.settings``, a
``KindSettings``: BFL's polling budget and allowed hosts, `local`'s pace and ``fallback_for``, …).
The config file stays flat, as before: an upstream entry's fields that are not common are
validated by its kind's model at load, and a field of another kind, or of none, is refused naming
the field and the kinds that take it. The adapter reads them with ``upstream.options_as(Model)``.

The table is filled by importing every module of ``app.upstream.providers`` (``provider_kinds``):
the list of kinds is not written anywhere, it is what the package holds.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from app.core.security import is_placeholder

if TYPE_CHECKING:
    from app.upstream.base import ImageProvider


Serves = Literal["catalog", "unclaimed", "all"]
K = TypeVar("K", bound="KindSettings")


class KindSettings(BaseModel):
    """The settings one kind takes beyond the common ones: none, unless its adapter declares a
    subclass as its ``ProviderKind.settings``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def stands_in_for(self, model: str) -> bool:  # noqa: ARG002
        """Whether a stand-in kind may serve ``model`` beside a real upstream for it."""
        return False


@dataclass(frozen=True, slots=True)
class ProviderKind:
    """One upstream kind and the rules the registry applies to it."""

    name: str
    build: Callable[[UpstreamSettings], ImageProvider]
    serves: Serves = "catalog"
    base_url_required: bool = False
    # Whether an upstream of this kind works without an api_key (the in-process renderer).
    keyless: bool = False
    # Whether it stops serving a model on OpenAI's retirement date unless configured otherwise.
    follows_retirements: bool = False
    # The built-in stand-in: serves a model beside real upstreams only where ``fallback_for`` says.
    stand_in: bool = False
    # Configured when the operator configures no upstream at all.
    default: bool = False
    # The model of the settings only this kind takes (validated at config load).
    settings: type[KindSettings] = KindSettings


_KINDS: dict[str, ProviderKind] = {}
_lock = threading.RLock()
_loaded = False


def register_kind(kind: ProviderKind) -> ProviderKind:
    """Called once by the adapter module that implements ``kind``."""
    existing = _KINDS.get(kind.name)
    if existing is not None and existing is not kind:
        raise ValueError(f"upstream kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def provider_kinds() -> dict[str, ProviderKind]:
    """Every registered kind, after importing every adapter module once."""
    global _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                # By name, as a plugin table is filled: the adapters import this module (to
                # register), so this one must not import them back statically.
                package = importlib.import_module(f"{__package__}.providers")
                for module in pkgutil.iter_modules(package.__path__):
                    importlib.import_module(f"{package.__name__}.{module.name}")
                _loaded = True
    return dict(_KINDS)


def provider_kind(name: str) -> ProviderKind:
    """The registered kind ``name``; ValueError naming the known ones otherwise."""
    kinds = provider_kinds()
    kind = kinds.get(name)
    if kind is None:
        raise ValueError(f"unknown upstream kind {name!r}: one of {', '.join(sorted(kinds))}")
    return kind


def common_options(upstream: UpstreamSettings) -> dict[str, Any]:
    """The constructor options every HTTP adapter takes (name, key, timeouts, pool size)."""
    return {
        "name": upstream.name,
        "api_key": upstream.api_key.get_secret_value() if upstream.api_key else None,
        "timeout_s": upstream.timeout_s,
        "connect_timeout_s": upstream.connect_timeout_s,
        "max_connections": upstream.max_concurrency,
    }


class UpstreamModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    upstream_model: str | None = None


def _all_models() -> list[str | UpstreamModelSettings]:
    return ["*"]


class UpstreamSettings(BaseModel):
    """One upstream: the fields every kind has, and ``options``, its kind's own settings (written
    flat beside these in the config file)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    # One of the kinds the adapter modules register (``register_kind``), checked below.
    kind: str = Field(min_length=1)
    base_url: str | None = None
    api_key: SecretStr | None = None
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
    # Whether this upstream stops serving a model on OpenAI's retirement date (the catalog's
    # `retired_at`). Unset: the kind's default (true for OpenAI-compatible kinds). Set false for a
    # compatible server that still serves a retired model.
    follows_retirements: bool | None = None
    # The kind's own settings (``ProviderKind.settings``), split from the flat entry at load.
    # SerializeAsAny: dumped with the kind's fields, not the (empty) declared base's.
    options: SerializeAsAny[KindSettings] = Field(default_factory=KindSettings)

    @model_validator(mode="before")
    @classmethod
    def _split_kind_settings(cls, data: Any) -> Any:
        """The fields of the flat entry that are not common go to the kind's settings model."""
        if not isinstance(data, Mapping) or isinstance(data.get("options"), KindSettings):
            return data
        flat = dict(data)
        nested = flat.pop("options", None)
        if isinstance(nested, Mapping):  # a dumped UpstreamSettings read back
            flat.update(nested)
        try:
            kind = provider_kind(str(flat.get("kind")))
        except ValueError:
            return data  # the kind's own validator names the known kinds
        own = {k: v for k, v in flat.items() if k not in cls.model_fields}
        common = {k: v for k, v in flat.items() if k in cls.model_fields}
        try:
            common["options"] = kind.settings.model_validate(own)
        except ValidationError as exc:
            raise ValueError(_kind_settings_error(flat.get("name"), kind, exc)) from None
        return common

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        provider_kind(value)  # ValueError naming the known kinds
        return value

    @model_validator(mode="after")
    def _check(self) -> UpstreamSettings:
        kind = provider_kind(self.kind)
        if kind.base_url_required and not self.base_url:
            raise ValueError(f"upstream '{self.name}': base_url is required for kind {self.kind}")
        if self.api_key is not None and is_placeholder(self.api_key.get_secret_value()):
            raise ValueError(f"upstream '{self.name}': api_key is a placeholder; set a real key")
        if not isinstance(self.options, kind.settings):
            raise ValueError(f"upstream '{self.name}': options are not those of kind {self.kind}")
        return self

    def options_as(self, model: type[K]) -> K:
        """The kind's settings, as the adapter that declared ``model`` reads them."""
        if not isinstance(self.options, model):
            raise TypeError(f"upstream '{self.name}' (kind {self.kind}) has no {model.__name__}")
        return self.options

    def stands_in_for(self, model: str) -> bool:
        """Whether this (stand-in) upstream may serve ``model`` beside a real upstream for it."""
        return self.options.stands_in_for(model)

    @property
    def follows_openai_retirements(self) -> bool:
        if self.follows_retirements is not None:
            return self.follows_retirements
        return provider_kind(self.kind).follows_retirements

    @property
    def active(self) -> bool:
        """Remote upstreams without a key are skipped, so a default config works with no account."""
        if not self.enabled:
            return False
        return provider_kind(self.kind).keyless or self.api_key is not None

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


def _kind_settings_error(name: Any, kind: ProviderKind, exc: ValidationError) -> str:
    """One line per refused field, naming it, and for a field of other kinds, which take it."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            takers = sorted(k.name for k in provider_kinds().values() if field in k.settings.model_fields)
            where = f"only for kind {', '.join(takers)}" if takers else "not an upstream setting"
            problems.append(f"{field} is {where}")
        else:
            problems.append(f"{field}: {error['msg']}")
    return f"upstream '{name}' (kind {kind.name}): " + "; ".join(problems)


def default_upstreams() -> list[UpstreamSettings]:
    """The upstreams of a configuration that names none: each default kind (the built-in renderer),
    named after itself."""
    return [UpstreamSettings(name=k.name, kind=k.name) for k in provider_kinds().values() if k.default]
