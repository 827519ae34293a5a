"""The model catalog: what each public model accepts, and what it costs.

Read once from the ``models_file`` (default ``app/defaults/models.yaml``) into frozen dataclasses,
so adding a model is a YAML edit.
Prices are kept in integer micro-units of the price unit (per 1M tokens, or per image), because
money must never pass through floats.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml

from app.domain.money import MoneyError
from app.domain.money import to_micros as _to_micros
from app.domain.provider_spec import ProviderSpec, ProviderSpecError

Family = Literal["gpt-image", "dall-e-2", "dall-e-3", "gemini", "imagen", "flux", "stability"]
FAMILIES: tuple[str, ...] = ("gpt-image", "dall-e-2", "dall-e-3", "gemini", "imagen", "flux", "stability")
LifecycleState = Literal["active", "legacy", "deprecated", "retired"]
RESPONSE_FORMATS = ("url", "b64_json")


class CatalogError(ValueError):
    """The models file is malformed; the message names the model and the field."""


def to_micros(value: Any, *, where: str) -> int:
    """A price from YAML as exact micro-units; a malformed one is a catalog error naming its field."""
    try:
        return _to_micros(value, where=where)
    except MoneyError as exc:
        raise CatalogError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class FreeSizeRule:
    """Models that take any ``WxH``: each edge a multiple, bounded ratio and pixel count."""

    multiple: int = 16
    max_ratio: int = 3
    min_pixels: int = 655_360
    max_pixels: int = 8_294_400
    max_edge: int = 3840

    def check(self, width: int, height: int) -> str | None:
        """None when allowed, else which rule the size breaks (one message per rule)."""
        if width % self.multiple or height % self.multiple:
            return f"width and height must both be divisible by {self.multiple}"
        if max(width, height) > self.max_edge or width * height > self.max_pixels:
            return (
                f"the maximum resolution is {self.max_edge}x{self.max_pixels // self.max_edge} "
                f"(at most {self.max_pixels} pixels and {self.max_edge} pixels per edge)"
            )
        if max(width, height) > self.max_ratio * min(width, height):
            return f"the aspect ratio must be between 1:{self.max_ratio} and {self.max_ratio}:1"
        if width * height < self.min_pixels:
            return (
                f"this model needs at least {self.min_pixels} pixels ({width}x{height} has {width * height})"
            )
        return None


@dataclass(frozen=True, slots=True)
class GifRule:
    """Animated GIF output: frame count and per-frame delay bounds, and the model's GIF size limit."""

    min_frames: int = 2
    max_frames: int = 16
    default_frames: int = 9
    default_frame_duration_ms: int = 200
    # Longer delays are capped (not refused) by the API, at what a GIF's 16-bit delay can encode.
    max_frame_duration_ms: int = 655_350
    max_pixels: int = 1536 * 1024


@dataclass(frozen=True, slots=True)
class SvgAuthorPrice:
    """Micro-units per 1M tokens for a model that authors SVG output (``svg.model``)."""

    input: int
    output: int


@dataclass(frozen=True, slots=True)
class EditCaps:
    max_images: int
    max_image_bytes: int
    formats: tuple[str, ...]
    mask: bool
    square_only: bool = False
    # All images of one request together (Gemini's inline data shares one 20 MB request); None:
    # only the per-image bound.
    max_total_bytes: int | None = None
    # Whether the edited area must be marked (a mask, or transparent pixels in the first image):
    # an inpainting upstream has nothing to repaint otherwise. Checked with the inputs' headers,
    # before anything is reserved.
    needs_area: bool = False
    # The ``markup`` file: a transparent PNG overlaid on the first image to guide the edit.
    markup: bool = False
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
    complexity: tuple[str, ...] = ()
    gif: GifRule | None = None
    default_response_format: str = "b64_json"
    # Lifecycle as OpenAI published it: retired from 00:00 UTC of `retired_at`.
    retired_at: dt.date | None = None
    replacement: str | None = None
    # The provider lists the model as legacy (superseded, still served, no retirement date yet):
    # shown as ``state: legacy`` in ``/v1/models``, with its ``replacement``.
    legacy: bool = False
    # Set on an alias (a dated snapshot): the entry whose rules it shares.
    alias_of: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def reports_usage(self) -> bool:
        """GPT-Image and Gemini report token usage; dall-e, Imagen, FLUX and Stability are priced
        per image."""
        return self.family in ("gpt-image", "gemini")

    @property
    def canonical(self) -> str:
        """The catalog entry's own name (an alias answers its family's)."""
        return self.alias_of or self.name

    @property
    def retires(self) -> dt.datetime | None:
        """The instant of retirement, if the catalog records one."""
        if self.retired_at is None:
            return None
        return dt.datetime.combine(self.retired_at, dt.time(0), tzinfo=dt.UTC)

    def state(self, now: dt.datetime) -> LifecycleState:
        """``retired`` from the retirement instant on, ``deprecated`` while one is scheduled."""
        retires = self.retires
        if retires is None:
            return "legacy" if self.legacy else "active"
        return "retired" if now >= retires else "deprecated"

    def retirement_message(self) -> str:
        """What a client is told about a retired model: the date and the replacement."""
        day = self.retired_at.isoformat() if self.retired_at else "an earlier date"
        message = f"The model '{self.name}' was retired on {day}"
        if self.replacement:
            return f"{message}. Use '{self.replacement}' instead."
        return f"{message} and is not served here."

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
        # A free size: the 1024x1024 entry scaled by pixel count, and never below a listed size
        # with no more pixels (a wide free size costs at least what the standard landscape does).
        base = table.get("1024x1024") or max(table.values())
        width, height = parse_size(concrete) or (1024, 1024)
        pixels = width * height
        smaller = [
            tokens
            for listed, tokens in table.items()
            if (dims := parse_size(listed)) and dims[0] * dims[1] <= pixels
        ]
        return max([math.ceil(base * pixels / (1024 * 1024)), *smaller])

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
    """All models of the models file, by public name; an alias is listed under its own name with
    its family's rules (``alias_of`` set)."""

    def __init__(
        self,
        models: Mapping[str, ModelCapabilities],
        svg_authors: Mapping[str, SvgAuthorPrice] | None = None,
        svg_author_default: SvgAuthorPrice | None = None,
    ) -> None:
        self._models = dict(models)
        self.svg_authors: Mapping[str, SvgAuthorPrice] = dict(svg_authors or {})
        self._svg_author_default = svg_author_default

    def svg_author_price(self, author: str | None) -> SvgAuthorPrice:
        """An author's rates; an unknown author is billed at ``svg_author_default``, or, when the
        models file sets none, at the dearest listed author (never under-bill)."""
        if author is not None and author in self.svg_authors:
            return self.svg_authors[author]
        if self._svg_author_default is not None:
            return self._svg_author_default
        if not self.svg_authors:
            return SvgAuthorPrice(input=0, output=0)
        return max(self.svg_authors.values(), key=lambda p: (p.output, p.input))

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
        models: dict[str, ModelCapabilities] = {}
        for name, spec in raw["models"].items():
            caps = _build(str(name), spec)
            for alias in (caps.name, *caps.aliases):
                if alias in models:
                    raise CatalogError(f"models.{caps.name}: the name {alias!r} is used twice")
            models[caps.name] = caps
            for alias in caps.aliases:
                models[alias] = replace(caps, name=alias, alias_of=caps.name, aliases=())
        for caps in models.values():
            if caps.replacement is not None and caps.replacement not in models:
                raise CatalogError(
                    f"models.{caps.name}.replacement: {caps.replacement!r} is not in the catalog"
                )
        default = raw.get("svg_author_default")
        return cls(
            models,
            _svg_authors(raw.get("svg_authors")),
            None if default is None else _author_price(default, "svg_author_default"),
        )


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
            max_total_bytes=(
                int(edit_spec["max_total_bytes"]) if edit_spec.get("max_total_bytes") is not None else None
            ),
            formats=tuple(edit_spec.get("formats", ["png"])),
            mask=bool(edit_spec.get("mask", True)),
            square_only=bool(edit_spec.get("square_only", False)),
            needs_area=bool(edit_spec.get("needs_area", False)),
            input_image_tokens={
                str(k): int(v) for k, v in (edit_spec.get("input_image_tokens") or {}).items()
            },
            markup=bool(edit_spec.get("markup", False)),
        )
    free = spec.get("free_size")
    gif = spec.get("gif")
    output_formats = tuple(str(f) for f in spec.get("output_formats", ["png"]))
    if "gif" in output_formats and not isinstance(gif, Mapping):
        raise CatalogError(f"models.{name}.gif: a model with gif output needs its gif rule")
    retired_at = spec.get("retired_at")
    if retired_at is not None and not isinstance(retired_at, dt.date):
        try:
            retired_at = dt.date.fromisoformat(str(retired_at))
        except ValueError as exc:
            raise CatalogError(
                f"models.{name}.retired_at: {retired_at!r} is not a date (YYYY-MM-DD)"
            ) from exc
    if isinstance(retired_at, dt.datetime):
        retired_at = retired_at.date()
    default_response_format = str(spec.get("default_response_format", "b64_json"))
    if default_response_format not in RESPONSE_FORMATS:
        raise CatalogError(f"models.{name}.default_response_format: must be url or b64_json")
    return ModelCapabilities(
        name=name,
        family=family,
        max_prompt_chars=int(need("max_prompt_chars")),
        sizes=sizes,
        default_size=str(spec.get("default_size", sizes[0])),
        qualities=qualities,
        default_quality=str(spec.get("default_quality", qualities[0])),
        n_max=int(spec.get("n_max", 10)),
        output_formats=output_formats,
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
        complexity=tuple(str(c) for c in spec.get("complexity") or ()),
        gif=GifRule(**gif) if isinstance(gif, Mapping) else None,
        default_response_format=default_response_format,
        retired_at=retired_at,
        replacement=str(spec["replacement"]) if spec.get("replacement") else None,
        legacy=bool(spec.get("legacy", False)),
        aliases=tuple(str(a) for a in spec.get("aliases") or ()),
    )


def _provider(name: str, spec: Any) -> ProviderSpec | None:
    if spec is None:
        return None
    try:
        return ProviderSpec.from_mapping(spec, where=f"models.{name}.provider")
    except ProviderSpecError as exc:
        raise CatalogError(str(exc)) from exc


def _svg_authors(spec: Any) -> dict[str, SvgAuthorPrice]:
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise CatalogError("svg_authors: expected a mapping of author model -> {input, output}")
    return {str(author): _author_price(prices, f"svg_authors.{author}") for author, prices in spec.items()}


def _author_price(prices: Any, where: str) -> SvgAuthorPrice:
    if not isinstance(prices, Mapping):
        raise CatalogError(f"{where}: expected {{input, output}} prices per 1M tokens")
    return SvgAuthorPrice(
        input=to_micros(prices.get("input", 0), where=f"{where}.input"),
        output=to_micros(prices.get("output", 0), where=f"{where}.output"),
    )


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
