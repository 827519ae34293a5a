"""Internal request and result types: neither wire models nor table rows.

A validated request becomes an ``ImageJob``; a provider answers with an ``ImageResult``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from app.domain.catalog import ModelCapabilities

# "variations": the legacy dall-e-2 endpoint, forwarded where an upstream still serves dall-e-2.
Endpoint = Literal["generations", "edits", "variations"]
ResponseFormat = Literal["url", "b64_json"]

# Fields the gateway decides itself and never forwards as the client sent them.
_GATEWAY_FIELDS = frozenset({"model", "response_format", "stream"})


@dataclass(frozen=True, slots=True)
class InputImage:
    """An uploaded edit input, spooled to disk and inspected (type, size and alpha from its bytes)."""

    path: Path
    filename: str | None
    format: str
    width: int
    height: int
    has_alpha: bool
    size: int

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


@dataclass(frozen=True, slots=True)
class ImageJob:
    """One validated image request, with effective (defaulted) settings."""

    request_id: str
    endpoint: Endpoint
    model: str
    caps: ModelCapabilities
    prompt: str
    n: int
    size: str  # as asked, may be "auto"
    quality: str  # as asked or the model's default, may be "auto"
    background: str | None
    output_format: str
    output_compression: int | None
    moderation: str
    stream: bool
    partial_images: int
    response_format: ResponseFormat
    # Everything the client sent that goes upstream unchanged, known fields and unknown ones alike.
    forward: Mapping[str, Any] = field(default_factory=dict)
    # Edits only: the input images in the order sent, and the optional mask.
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    input_fidelity: str | None = None
    # Edits only: the transparent PNG overlaid on the first image to guide the edit.
    markup: InputImage | None = None
    complexity: str | None = None
    # GIF output: effective frame count and per-frame delay (the catalog's defaults when not asked).
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    # SVG output: the `svg` object as sent ({"model", "reasoning": {"effort"}}), if any.
    svg: Mapping[str, Any] | None = None
    # The model's lifecycle, as admission found it: a scheduled retirement (answers carry
    # ``Sunset``) and the retirement of a model served past it (``Deprecation``); the headers
    # are written from these by ``app/images/admission/lifecycle.py``.
    sunset_at: dt.datetime | None = None
    deprecated_at: dt.datetime | None = None
    # The model the client asked for, when the gateway serves another (a remapped retirement).
    requested_model: str | None = None
    # Past its retirement date: only upstreams that do not follow OpenAI's retirements get it.
    retired: bool = False

    @property
    def safety_identifier(self) -> str | None:
        """The effective identifier, as the SDK documents it: a non-empty ``safety_identifier``,
        else the deprecated ``user``."""
        for name in ("safety_identifier", "user"):
            value = self.forward.get(name)
            if isinstance(value, str) and value:
                return value
        return None

    def upstream_body(self, upstream_model: str) -> dict[str, Any]:
        """The JSON body for an OpenAI-compatible upstream.

        The client's own fields go unchanged (forward compatibility). The gateway always asks for
        base64 so it can meter, store and relay the bytes itself; GPT-Image models reject
        ``response_format`` and always answer base64, so it is only sent to dall-e.
        """
        body = {k: v for k, v in self.forward.items() if k not in _GATEWAY_FIELDS}
        for name in self.caps.drop_fields:
            body.pop(name, None)
        body["model"] = upstream_model
        if self.caps.family != "gpt-image":
            body["response_format"] = "b64_json"
        return body


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one request, split by kind as the ledger stores them."""

    text_input: int = 0
    image_input: int = 0
    text_output: int = 0
    image_output: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.text_input + self.image_input + self.text_output + self.image_output

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            text_input=self.text_input + other.text_input,
            image_input=self.image_input + other.image_input,
            text_output=self.text_output + other.text_output,
            image_output=self.image_output + other.image_output,
            estimated=self.estimated or other.estimated,
        )

    @classmethod
    def from_openai(cls, usage: Mapping[str, Any]) -> TokenUsage:
        """Split an OpenAI ``usage`` object.

        The totals (``input_tokens``, ``output_tokens``) are what the upstream billed; the details
        only say how they split. So a detail that is missing is the total minus the details that
        are there (``{"reasoning_tokens": 0}`` alone leaves all output as image tokens), and
        details that add up to less than their total leave the rest to the dearer kind (image
        tokens): an upstream's partial answer must never make a request cheaper than it was.
        Without any details, input is text and output is image tokens, as image models produce.
        """
        text_in, image_in = _split(
            _int(usage.get("input_tokens")), usage.get("input_tokens_details"), rest_to_image=False
        )
        text_out, image_out = _split(
            _int(usage.get("output_tokens")), usage.get("output_tokens_details"), rest_to_image=True
        )
        return cls(text_input=text_in, image_input=image_in, text_output=text_out, image_output=image_out)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``usage`` object for these counts."""
        return {
            "input_tokens": self.text_input + self.image_input,
            "input_tokens_details": {"text_tokens": self.text_input, "image_tokens": self.image_input},
            "output_tokens": self.text_output + self.image_output,
            "output_tokens_details": {"text_tokens": self.text_output, "image_tokens": self.image_output},
            "total_tokens": self.total,
        }


# Token counts are stored in 32-bit columns; an upstream reporting more is clamped (and so is its
# price), rather than failing the ledger write and losing the row.
MAX_TOKENS = 2**31 - 1


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, MAX_TOKENS)
    return 0


def _known(details: Mapping[str, Any], name: str) -> int | None:
    value = details.get(name)
    return _int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _split(total: int, details: Any, *, rest_to_image: bool) -> tuple[int, int]:
    """(text, image) tokens of one side of a usage object; see ``TokenUsage.from_openai``."""
    if not isinstance(details, Mapping):
        return (0, total) if rest_to_image else (total, 0)
    text, image = _known(details, "text_tokens"), _known(details, "image_tokens")
    if text is None and image is None:
        return (0, total) if rest_to_image else (total, 0)
    if text is None:
        assert image is not None
        return max(0, total - image), image
    if image is None:
        return text, max(0, total - text)
    return text, image + max(0, total - text - image)


class ImageResult:
    """A provider's answer: an ImagesResponse, relayed as is, plus parsed usage.

    ``raw`` is the upstream's own JSON when there is one (the provider has validated it and read
    its usage and image count). Relaying those bytes spares decoding and re-encoding megabytes of
    base64, so ``body`` is only parsed from them when something needs the images themselves (URL
    delivery, task storage, a replayed stream); a provider that builds its answer passes ``body``.
    """

    __slots__ = ("_body", "_count", "raw", "raw_usage", "usage")

    def __init__(
        self,
        body: dict[str, Any] | None = None,
        usage: TokenUsage | None = None,
        raw_usage: Mapping[str, Any] | None = None,
        *,
        raw: bytes | None = None,
        image_count: int | None = None,
    ) -> None:
        if body is None and raw is None:
            raise ValueError("an ImageResult needs a body or its raw JSON")
        self._body = body
        self._count = image_count
        self.raw = raw
        self.usage = usage
        self.raw_usage = raw_usage

    @property
    def body(self) -> dict[str, Any]:
        if self._body is None:
            assert self.raw is not None
            parsed = orjson.loads(self.raw)
            if not isinstance(parsed, dict):
                raise TypeError("the raw JSON of an ImageResult is not an object")
            self._body = parsed
        return self._body

    @property
    def image_count(self) -> int:
        if self._count is None:
            data = self.body.get("data")
            self._count = len(data) if isinstance(data, list) else 0
        return self._count

    def __repr__(self) -> str:
        size = f"{len(self.raw)} bytes" if self.raw is not None else "built"
        return f"ImageResult({self.image_count} images, {size}, usage={self.usage!r})"


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One streamed event from a provider, relayed to the client as ``event: <type>``.

    ``raw`` is the upstream's own JSON text when there is one, so the relay writes the bytes it
    received instead of re-encoding megabytes of base64; ``data`` is the parsed form, for metering.
    """

    type: str
    data: dict[str, Any]
    raw: bytes | None = None

    @property
    def is_completed(self) -> bool:
        return self.type.endswith(".completed")

    @property
    def usage(self) -> TokenUsage | None:
        usage = self.data.get("usage")
        return TokenUsage.from_openai(usage) if isinstance(usage, Mapping) and usage else None


def event_type(endpoint: Endpoint, kind: Literal["partial_image", "completed"]) -> str:
    """``image_generation.partial_image``, ``image_edit.completed``, …"""
    prefix = "image_generation" if endpoint == "generations" else "image_edit"
    return f"{prefix}.{kind}"


def completed_events(job: ImageJob, result: ImageResult) -> list[ProviderEvent]:
    """The stream contract for an upstream that cannot stream: one completed event per image.

    The response's usage covers all images. The SDKs' types require ``usage`` on every completed
    event, and a client (or the ledger) sums them, so each event gets an even share of every
    count (the remainder on the first ones): the events add up exactly to the response's usage.
    """
    body = result.body
    settings: dict[str, Any] = {
        k: body[k] for k in ("background", "output_format", "quality", "size") if k in body
    }
    created = body.get("created")
    items = list(body.get("data") or [])
    shares = split_usage(result.raw_usage, len(items)) if result.raw_usage else None
    events: list[ProviderEvent] = []
    for index, item in enumerate(items):
        data: dict[str, Any] = {
            "type": event_type(job.endpoint, "completed"),
            "b64_json": item.get("b64_json") if isinstance(item, Mapping) else None,
            "created_at": created,
            **settings,
        }
        if shares is not None:
            data["usage"] = shares[index]
        events.append(ProviderEvent(type=data["type"], data=data))
    return events


def split_usage(usage: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """``usage`` cut into ``parts`` usage objects whose integer counts add up to it exactly."""

    def share(value: Any, index: int) -> Any:
        if isinstance(value, Mapping):
            return {k: share(v, index) for k, v in value.items()}
        if isinstance(value, int) and not isinstance(value, bool):
            whole, rest = divmod(value, parts)
            return whole + (1 if index < rest else 0)
        return value

    return [share(usage, index) for index in range(max(parts, 1))]
