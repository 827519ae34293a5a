"""Rules of today's Images API that the seed did not have: GIF and SVG output, ``complexity``,
``markup``. Split from ``validation.py`` so each stays one screenful of rules; the messages and
codes follow validation's (OpenAI's wording where OpenAI has one).

Each rule comes from the openai SDK's docstrings (3.57, ``image_generate_params.py``):

- GIF: ``frame_count`` 2-16 (default 9), ``frame_duration_ms`` (default 200, capped, not refused,
  at 655,350); both only with ``output_format=gif``; no streaming, partial images, mask or
  ``output_compression``; the size within the model's GIF limit.
- SVG: ``svg`` only with ``output_format=svg``; ``n=1``; no streaming, partial images or
  compression; ``svg.reasoning.effort`` one of the SDK's values; ``svg.model`` any author name
  (the SDK types it as a string): priced from the catalog's author table when listed, otherwise
  at its default author rate and marked estimated (``billing/svg.py``).
- ``complexity``: ``low``, ``medium`` or ``high``, where the model lists it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from app.core.errors import InvalidRequestError
from app.domain.catalog import ModelCapabilities, parse_size

SVG_AUTHOR_MAX_CHARS = 100  # the ledger's svg_model column
SVG_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


@dataclass(frozen=True, slots=True)
class OutputOptions:
    """The effective format options of a request."""

    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: Mapping[str, Any] | None = None


def _error(message: str, param: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _quoted(values: Collection[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def check_complexity(value: str | None, caps: ModelCapabilities) -> None:
    if value is None:
        return
    if not caps.complexity:
        raise _error(
            f"Unsupported parameter: 'complexity' is not supported with the model '{caps.name}'.",
            "complexity",
            "unsupported_parameter",
        )
    if value not in caps.complexity:
        raise _error(
            f"Invalid value: '{value}'. Supported values are: {_quoted(caps.complexity)}.", "complexity"
        )


def _bounded(param: str, value: int, low: int, high: int | None) -> None:
    if value < low:
        raise _error(
            f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.",
            param,
            "integer_below_min_value",
        )
    if high is not None and value > high:
        raise _error(
            f"Invalid '{param}': integer above maximum value. Expected a value <= {high}, "
            f"but got {value} instead.",
            param,
            "integer_above_max_value",
        )


def _not_with(fmt: str, param: str, what: str) -> InvalidRequestError:
    return _error(f"{fmt.upper()} output does not support {what}: remove '{param}'.", param)


def check_output_options(
    *,
    caps: ModelCapabilities,
    output_format: str,
    n: int,
    size: str,
    stream: bool,
    partial_images: int | None,
    compression: int | None,
    frame_count: int | None,
    frame_duration_ms: int | None,
    svg: Mapping[str, Any] | None,
    has_mask: bool = False,
) -> OutputOptions:
    """The GIF and SVG rules; returns the effective options (GIF defaults filled in)."""
    if output_format != "gif":
        for param, value in (("frame_count", frame_count), ("frame_duration_ms", frame_duration_ms)):
            if value is not None:
                raise _error(f"'{param}' is only supported with output_format 'gif'.", param)
    if output_format != "svg" and svg is not None:
        raise _error("'svg' is only supported with output_format 'svg'.", "svg")

    if output_format == "gif":
        return _gif(caps, size, stream, partial_images, compression, frame_count, frame_duration_ms, has_mask)
    if output_format == "svg":
        return _svg(n, stream, partial_images, compression, svg)
    return OutputOptions()


def _gif(
    caps: ModelCapabilities,
    size: str,
    stream: bool,
    partial_images: int | None,
    compression: int | None,
    frame_count: int | None,
    frame_duration_ms: int | None,
    has_mask: bool,
) -> OutputOptions:
    rule = caps.gif
    assert rule is not None  # the catalog refuses gif output without its rule
    if stream:
        raise _not_with("gif", "stream", "streaming")
    if partial_images:
        raise _not_with("gif", "partial_images", "partial images")
    if has_mask:
        raise _not_with("gif", "mask", "masks")
    if compression is not None:
        raise _not_with("gif", "output_compression", "custom output compression")
    frames = rule.default_frames if frame_count is None else frame_count
    _bounded("frame_count", frames, rule.min_frames, rule.max_frames)
    duration = rule.default_frame_duration_ms if frame_duration_ms is None else frame_duration_ms
    # Longer delays are capped by the API, not refused; only a non-positive delay is meaningless.
    _bounded("frame_duration_ms", duration, 1, None)
    dims = parse_size(caps.resolve_size(size))
    if dims is not None and dims[0] * dims[1] > rule.max_pixels:
        raise _error(
            f"Invalid size '{size}' for GIF output: the model '{caps.name}' renders GIFs of at most "
            f"{rule.max_pixels} pixels.",
            "size",
        )
    return OutputOptions(frame_count=frames, frame_duration_ms=min(duration, rule.max_frame_duration_ms))


def _svg(
    n: int,
    stream: bool,
    partial_images: int | None,
    compression: int | None,
    svg: Mapping[str, Any] | None,
) -> OutputOptions:
    if n != 1:
        raise _error(f"SVG output requires n=1, but got n={n}.", "n")
    if stream:
        raise _not_with("svg", "stream", "streaming")
    if partial_images:
        raise _not_with("svg", "partial_images", "partial images")
    if compression is not None:
        raise _not_with("svg", "output_compression", "output compression")
    if svg is None:
        return OutputOptions()
    author = svg.get("model")
    if author is not None and not 0 < len(author) <= SVG_AUTHOR_MAX_CHARS:
        # Any name: a new author model must not wait for a catalog edit. Bounded, as the ledger
        # records it.
        raise _error(
            f"Invalid 'svg.model': expected a model name of 1 to {SVG_AUTHOR_MAX_CHARS} characters.",
            "svg.model",
        )
    reasoning = svg.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, Mapping) else None
    if effort is not None and effort not in SVG_EFFORTS:
        raise _error(
            f"Invalid value: '{effort}'. Supported values are: {_quoted(SVG_EFFORTS)}.",
            "svg.reasoning.effort",
        )
    return OutputOptions(svg=dict(svg))
