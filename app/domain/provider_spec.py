"""How a catalog model served by a non-OpenAI provider maps onto that provider (``provider:`` in
``app/defaults/models.yaml``).

The OpenAI Images API asks for a ``size`` in pixels, a ``quality`` and an ``output_format``; Gemini,
Imagen, FLUX and Stability ask for an aspect ratio, a resolution tier or pixel dimensions with
their own rules, and make only some formats. This part of the catalog says, per model, what the
provider takes, so the adapters translate from data rather than from per-model code, and adding a
model of a known provider stays a YAML edit:

    provider:
      kind: gemini                      # the upstream kind that serves it (app.upstream.kinds)
      model: gemini-2.5-flash-image     # the provider's model id (an upstream's default rename)
      aspect_ratios: ["1:1", "3:2", …]  # what ``size`` maps to, nearest on a log scale
      resolutions: {1K: 1024, 2K: 2048} # resolution tiers by nominal long edge (Gemini imageSize,
                                        #   Imagen imageSize); nearest to the asked long edge
      quality_resolutions: {hd: 2K}     # a quality that picks a tier instead of the size
      dimensions: {multiple: 32, min: 256, max: 1440}   # FLUX width/height instead of a ratio
      native_formats: [png]             # formats the provider makes itself; others re-encoded
      edit_model: fal-ai/flux-pro/kontext        # the provider's model id for edits (default:
                                        #   ``model``), and for edits of several images
      multi_edit_model: fal-ai/flux-pro/kontext/multi
      params: {seed: seed}              # extra client fields that map: client name → provider name
      params:                           # or with the values the provider takes, checked before
        safety_tolerance: {to: safety_tolerance, type: integer, min: 0, max: 6}
        person_generation: {to: personGeneration, values: [dont_allow, allow_adult, allow_all]}

A client field the gateway does not know is forwarded unchanged to OpenAI-compatible upstreams; a
provider model has nowhere to forward it, so it is refused with 400 ``unsupported_parameter``
unless ``params`` maps it (``check_extra_fields``). Nothing is silently dropped. A mapped field
with a rule (``type``: integer, number, boolean or string; ``min``/``max``; ``values``) is checked
before any call (``ParamRule.parse``): a value the provider would refuse is the client's 400, not a
provider's 422 after a reservation. Multipart edits send every field as text, so ``"2"`` is read as
the integer 2 where the rule says ``integer``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ProviderSpecError(ValueError):
    """The ``provider`` section of a model is malformed; the message names the field."""


PARAM_TYPES = ("integer", "number", "boolean", "string")
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


@dataclass(frozen=True, slots=True)
class ParamRule:
    """What values a provider takes for one client field (nothing set: any value)."""

    type: str | None = None
    min: float | None = None
    max: float | None = None
    values: tuple[Any, ...] = ()

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], *, where: str) -> ParamRule:
        kind = spec.get("type")
        if kind is not None and kind not in PARAM_TYPES:
            raise ProviderSpecError(f"{where}.type: must be one of {', '.join(PARAM_TYPES)}")
        low, high = spec.get("min"), spec.get("max")
        return cls(
            type=kind,
            min=float(low) if low is not None else None,
            max=float(high) if high is not None else None,
            values=tuple(spec.get("values") or ()),
        )

    def parse(self, value: Any) -> tuple[Any, str | None]:
        """``(value as the provider takes it, None)``, or ``(value, why it is refused)``."""
        if self.type is not None:
            value, ok = _coerce(self.type, value)
            if not ok:
                return value, f"expected {'an' if self.type == 'integer' else 'a'} {self.type}"
        if self.values and value not in self.values:
            return value, f"expected one of {', '.join(str(v) for v in self.values)}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.min is not None and value < self.min:
                return value, f"expected a value of at least {_num(self.min)}"
            if self.max is not None and value > self.max:
                return value, f"expected a value of at most {_num(self.max)}"
        return value, None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _coerce(kind: str, value: Any) -> tuple[Any, bool]:
    """``value`` as ``kind``; text (multipart) is parsed, JSON's own types must already match."""
    if kind == "string":
        return value, isinstance(value, str)
    if kind == "boolean":
        if isinstance(value, bool):
            return value, True
        text = str(value).strip().lower() if isinstance(value, str) else None
        return (text in _TRUE, True) if text in _TRUE | _FALSE else (value, False)
    if isinstance(value, bool):
        return value, False
    if isinstance(value, str):
        try:
            value = int(value) if kind == "integer" else float(value)
        except ValueError:
            return value, False
    if kind == "integer":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return value, isinstance(value, int)
    return value, isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class DimensionRule:
    """Pixel dimensions a provider takes (FLUX ``width``/``height``)."""

    multiple: int = 32
    min: int = 256
    max: int = 1440

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The nearest allowed dimensions with the asked aspect ratio: scaled down to fit ``max``
        (or up to reach ``min``), then each edge rounded to the multiple and clamped."""
        scale = 1.0
        if max(width, height) > self.max:
            scale = self.max / max(width, height)
        elif min(width, height) < self.min:
            scale = min(self.min / min(width, height), self.max / max(width, height))
        return self._edge(width * scale), self._edge(height * scale)

    def _edge(self, value: float) -> int:
        edge = round(value / self.multiple) * self.multiple
        return max(self.min, min(self.max, edge))


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    kind: str
    model: str
    aspect_ratios: tuple[str, ...] = ()
    default_ratio: str = "1:1"
    resolutions: Mapping[str, int] = field(default_factory=dict)
    quality_resolutions: Mapping[str, str] = field(default_factory=dict)
    dimensions: DimensionRule | None = None
    native_formats: tuple[str, ...] = ("png",)
    params: Mapping[str, str] = field(default_factory=dict)
    param_rules: Mapping[str, ParamRule] = field(default_factory=dict)
    # Providers that serve edits on another model id than generations (queues with one endpoint
    # per task); None: ``model`` itself (and for several images, the one-image edit model).
    edit_model: str | None = None
    multi_edit_model: str | None = None

    @classmethod
    def from_mapping(cls, spec: Any, *, where: str) -> ProviderSpec:
        if not isinstance(spec, Mapping):
            raise ProviderSpecError(f"{where}: expected a mapping")
        kind = spec.get("kind")
        # Which kinds exist is the adapters' business (``app.upstream.kinds``), above this floor:
        # the registry checks the name when it is built.
        if not isinstance(kind, str) or not kind:
            raise ProviderSpecError(f"{where}.kind: missing")
        model = spec.get("model")
        if not isinstance(model, str) or not model:
            raise ProviderSpecError(f"{where}.model: missing")
        ratios = tuple(str(r) for r in spec.get("aspect_ratios") or ())
        for ratio in ratios:
            width, sep, height = ratio.partition(":")
            if not sep or not width.isdigit() or not height.isdigit() or not int(width) or not int(height):
                raise ProviderSpecError(f"{where}.aspect_ratios: {ratio!r} is not W:H")
        resolutions = {str(k): int(v) for k, v in (spec.get("resolutions") or {}).items()}
        quality_resolutions = {str(k): str(v) for k, v in (spec.get("quality_resolutions") or {}).items()}
        for quality, tier in quality_resolutions.items():
            if tier not in resolutions:
                raise ProviderSpecError(
                    f"{where}.quality_resolutions.{quality}: {tier!r} is not a resolution"
                )
        params: dict[str, str] = {}
        rules: dict[str, ParamRule] = {}
        for name, target in (spec.get("params") or {}).items():
            if isinstance(target, Mapping):
                if not isinstance(target.get("to"), str):
                    raise ProviderSpecError(f"{where}.params.{name}.to: missing")
                params[str(name)] = target["to"]
                rules[str(name)] = ParamRule.from_mapping(target, where=f"{where}.params.{name}")
            else:
                params[str(name)] = str(target)
        dims = spec.get("dimensions")
        default_ratio = str(spec.get("default_ratio", "1:1"))
        if ratios and default_ratio not in ratios:
            raise ProviderSpecError(f"{where}.default_ratio: {default_ratio!r} is not among aspect_ratios")
        return cls(
            kind=kind,
            model=model,
            aspect_ratios=ratios,
            default_ratio=default_ratio,
            resolutions=resolutions,
            quality_resolutions=quality_resolutions,
            dimensions=DimensionRule(**dims) if isinstance(dims, Mapping) else None,
            native_formats=tuple(str(f) for f in spec.get("native_formats") or ("png",)),
            params=params,
            param_rules=rules,
            edit_model=_optional_id(spec, "edit_model", where),
            multi_edit_model=_optional_id(spec, "multi_edit_model", where),
        )

    def edit_model_for(self, images: int) -> str:
        """The provider's model id for an edit of ``images`` input images."""
        one = self.edit_model or self.model
        return (self.multi_edit_model or one) if images > 1 else one

    def mapped_params(self, forward: Mapping[str, Any]) -> dict[str, Any]:
        """The client's extra fields that this provider takes, under the provider's names (and
        types: a rule's ``"2"`` from a multipart form is sent as 2)."""
        return {
            self.params[name]: self.parse_param(name, value)[0]
            for name, value in forward.items()
            if name in self.params
        }

    def parse_param(self, name: str, value: Any) -> tuple[Any, str | None]:
        """``ParamRule.parse`` for a mapped field; a field without a rule takes any value."""
        rule = self.param_rules.get(name)
        return rule.parse(value) if rule is not None else (value, None)


def _optional_id(spec: Mapping[str, Any], name: str, where: str) -> str | None:
    value = spec.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise ProviderSpecError(f"{where}.{name}: expected a model id")
    return value


# The OpenAI request fields every provider adapter translates (or the gateway itself consumes:
# ``moderation``, ``response_format``, ``stream``); the catalog's rules bound their values.
TRANSLATED_FIELDS = frozenset(
    {
        "prompt",
        "model",
        "n",
        "size",
        "quality",
        "background",
        "output_format",
        "output_compression",
        "moderation",
        "stream",
        "partial_images",
        "response_format",
        "input_fidelity",
    }
)


def unmapped_fields(names: Iterable[str], spec: ProviderSpec | None) -> list[str]:
    """Set client fields a provider model cannot take, sorted: any field, OpenAI's own included
    (a new one the adapters do not know would otherwise be dropped), that is neither translated
    nor mapped by ``params``. [] for OpenAI models, which forward every field upstream."""
    if spec is None:
        return []
    return sorted(name for name in names if name not in TRANSLATED_FIELDS and name not in spec.params)
