"""The model catalog: what each public model accepts, and what it costs.

Read once from ``config/models.yaml`` into frozen dataclasses, so adding a model is a YAML edit.
Prices are kept in integer micro-units of the price unit (per 1M tokens, or per image), because
money must never pass through floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml

from app.images.provider_spec import ProviderSpec, ProviderSpecError

Family = Literal["gpt-image", "dall-e-2", "dall-e-3", "gemini", "imagen", "flux", "stability"]
FAMILIES: tuple[str, ...] = ("gpt-image", "dall-e-2", "dall-e-3", "gemini", "imagen", "flux", "stability")
MICROS = 1_000_000


class CatalogError(ValueError):
    """The models file is malformed; the message names the model and the field."""


def to_micros(value: Any, *, where: str) -> int:
    """A price from YAML (``2.5``, ``"0.016"``) as exact integer micro-units."""
    try:
        amount = Decimal(str(value)) * MICROS
    except InvalidOperation as exc:
        raise CatalogError(f"{where}: not a number: {value!r}") from exc
    if amount != amount.to_integral_value() or amount < 0:
        raise CatalogError(f"{where}: {value!r} is not a non-negative multiple of 0.000001")
    return int(amount)


@dataclass(frozen=True, slots=True)
class FreeSizeRule:
    """Models that take any ``WxH``: each edge a multiple, bounded ratio and pixel count."""

    multiple: int = 16
    max_ratio: int = 3
    min_pixels: int = 655_360
    max_pixels: int = 8_294_400
    max_edge: int = 3840

    def check(self, width: int, height: int) -> str | None:
        """None when allowed, else the reason."""
        if width % self.multiple or height % self.multiple:
            return f"both edges must be multiples of {self.multiple}"
        if width > self.max_edge or height > self.max_edge:
            return f"edges must be at most {self.max_edge}"
        if max(width, height) > self.max_ratio * min(width, height):
            return f"the aspect ratio must be at most {self.max_ratio}:1"
        if not self.min_pixels <= width * height <= self.max_pixels:
            return f"the pixel count must be between {self.min_pixels} and {self.max_pixels}"
        return None


@dataclass(frozen=True, slots=True)
class EditCaps:
    max_images: int
    max_image_bytes: int
    formats: tuple[str, ...]
    mask: bool
    square_only: bool = False
    # Image input tokens per input image, by input_fidelity: estimates, for reservations and the
    # local backend (an upstream's reported usage always wins).
    input_image_tokens: Mapping[str, int] = field(default_factory=dict)

    def input_tokens(self, fidelity: str | None, images: int) -> int:
        table = self.input_image_tokens
        per_image = table.get(fidelity or "low", max(table.values(), default=0))
        return per_image * images


@dataclass(frozen=True, slots=True)
class Prices:
    """Micro-units per 1M tokens of each kind, or per image for models without usage."""

    text_input: int = 0
    image_input: int = 0
    text_output: int = 0
    image_output: int = 0
    # quality -> size -> micro-units per image (dall-e-2/3, which report no usage)
    per_image: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelCapabilities:
    name: str
    family: Family
    max_prompt_chars: int
    sizes: tuple[str, ...]
    default_size: str
    qualities: tuple[str, ...]
    default_quality: str
    n_max: int
    output_formats: tuple[str, ...]
    transparent_background: bool
    stream: bool
    max_partial_images: int
    edit: EditCaps | None
    input_fidelity: tuple[str, ...]
    unsupported_fields: frozenset[str]
    drop_fields: frozenset[str]
    prices: Prices
    # quality -> size -> output image tokens per image
    output_token_estimate: Mapping[str, Mapping[str, int]]
    free_size: FreeSizeRule | None = None
    # Models served by a non-OpenAI provider: how OpenAI settings map onto it (provider_spec.py).
    provider: ProviderSpec | None = None

    @property
    def reports_usage(self) -> bool:
        """GPT-Image and Gemini report token usage; dall-e, Imagen, FLUX and Stability are priced
        per image."""
        return self.family in ("gpt-image", "gemini")

    def resolve_size(self, size: str) -> str:
        """The concrete size a request will be rendered at (``auto`` → the first listed size)."""
        if size != "auto":
            return size
        concrete = [s for s in self.sizes if s != "auto"]
        return concrete[0] if concrete else "1024x1024"

    def resolve_quality(self, quality: str) -> str:
        """``auto`` is priced and estimated as ``medium``, the middle of the table."""
        if quality == "auto" and "medium" in self.output_token_estimate:
            return "medium"
        return quality

    def output_tokens_per_image(self, quality: str, size: str) -> int:
        """Estimated image output tokens for one image; scales by pixels for sizes off the table."""
        table = self.output_token_estimate.get(self.resolve_quality(quality))
        if not table:
            return 0
        concrete = self.resolve_size(size)
        if concrete in table:
            return table[concrete]
        base = table.get("1024x1024") or max(table.values())
        width, height = parse_size(concrete) or (1024, 1024)
        return math.ceil(base * width * height / (1024 * 1024))

    def max_output_tokens_per_image(self, size: str) -> int:
        """Worst case over qualities, for reservations."""
        return max((self.output_tokens_per_image(q, size) for q in self.output_token_estimate), default=0)


def parse_size(size: str) -> tuple[int, int] | None:
    """``"1024x1536"`` → (1024, 1536); None when it is not ``WxH``."""
    width, sep, height = size.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return int(width), int(height)


class Catalog:
    """All models of the models file, by public name."""

    def __init__(self, models: Mapping[str, ModelCapabilities]) -> None:
        self._models = dict(models)

    def get(self, name: str) -> ModelCapabilities | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return list(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    @classmethod
    def from_file(cls, path: str | Path) -> Catalog:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise CatalogError(f"models_file: cannot read {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise CatalogError(f"models_file: {path} is not valid YAML: {exc}") from exc
        return cls.from_mapping(raw)

    @classmethod
    def from_mapping(cls, raw: Any) -> Catalog:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("models"), Mapping):
            raise CatalogError("models file: expected a top-level 'models' mapping")
        return cls({str(name): _build(str(name), spec) for name, spec in raw["models"].items()})


def _build(name: str, spec: Any) -> ModelCapabilities:
    if not isinstance(spec, Mapping):
        raise CatalogError(f"models.{name}: expected a mapping")

    def need(key: str) -> Any:
        if key not in spec:
            raise CatalogError(f"models.{name}.{key}: missing")
        return spec[key]

    family = need("family")
    if family not in FAMILIES:
        raise CatalogError(f"models.{name}.family: must be one of {', '.join(FAMILIES)}")
    sizes = tuple(str(s) for s in need("sizes"))
    for size in sizes:
        if size != "auto" and parse_size(size) is None:
            raise CatalogError(f"models.{name}.sizes: {size!r} is not WxH")
    qualities = tuple(str(q) for q in need("qualities"))
    edit_spec = spec.get("edit")
    edit = None
    if edit_spec:
        edit = EditCaps(
            max_images=int(edit_spec.get("max_images", 1)),
            max_image_bytes=int(edit_spec.get("max_image_bytes", 4 * 1024 * 1024)),
            formats=tuple(edit_spec.get("formats", ["png"])),
            mask=bool(edit_spec.get("mask", True)),
            square_only=bool(edit_spec.get("square_only", False)),
            input_image_tokens={
                str(k): int(v) for k, v in (edit_spec.get("input_image_tokens") or {}).items()
            },
        )
    free = spec.get("free_size")
    return ModelCapabilities(
        name=name,
        family=family,
        max_prompt_chars=int(need("max_prompt_chars")),
        sizes=sizes,
        default_size=str(spec.get("default_size", sizes[0])),
        qualities=qualities,
        default_quality=str(spec.get("default_quality", qualities[0])),
        n_max=int(spec.get("n_max", 10)),
        output_formats=tuple(spec.get("output_formats", ["png"])),
        transparent_background=bool(spec.get("transparent_background", False)),
        stream=bool(spec.get("stream", False)),
        max_partial_images=int(spec.get("max_partial_images", 0)),
        edit=edit,
        input_fidelity=tuple(spec.get("input_fidelity") or ()),
        unsupported_fields=frozenset(spec.get("unsupported_fields") or ()),
        drop_fields=frozenset(spec.get("drop_fields") or ()),
        prices=_prices(name, spec.get("prices") or {}),
        output_token_estimate={
            str(q): {str(s): int(t) for s, t in table.items()}
            for q, table in (spec.get("output_token_estimate") or {}).items()
        },
        free_size=FreeSizeRule(**free) if isinstance(free, Mapping) else None,
        provider=_provider(name, spec.get("provider")),
    )


def _provider(name: str, spec: Any) -> ProviderSpec | None:
    if spec is None:
        return None
    try:
        return ProviderSpec.from_mapping(spec, where=f"models.{name}.provider")
    except ProviderSpecError as exc:
        raise CatalogError(str(exc)) from exc


def _prices(name: str, spec: Mapping[str, Any]) -> Prices:
    def price(kind: str) -> int:
        value = spec.get(kind)
        return 0 if value is None else to_micros(value, where=f"models.{name}.prices.{kind}")

    per_image = {
        str(q): {str(s): to_micros(v, where=f"models.{name}.prices.per_image.{q}.{s}") for s, v in t.items()}
        for q, t in (spec.get("per_image") or {}).items()
    }
    if "credits_per_image" in spec:
        # Providers that bill credits (Stability): the per-image price is credits x credit price,
        # exact in Decimal before it becomes micro-units.
        where = f"models.{name}.prices.credits_per_image"
        try:
            amount = Decimal(str(spec["credits_per_image"])) * Decimal(str(spec.get("credit_price")))
        except InvalidOperation as exc:
            raise CatalogError(f"{where}: credits_per_image and credit_price must be numbers") from exc
        per_image = {"*": {"*": to_micros(amount, where=where)}}
    return Prices(
        text_input=price("text_input"),
        image_input=price("image_input"),
        text_output=price("text_output"),
        image_output=price("image_output"),
        per_image=per_image,
    )
