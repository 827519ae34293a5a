"""What the fake OpenAI upstream answers to an image request: `ImagesResponse` payloads and SSE events."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tests.fakes.images import parse_size, render_b64, render_gif, render_svg, size_str
from tests.fakes.openai_wire import openai_error


class InvalidParams(Exception):
    """The request cannot be served; `body` is the OpenAI error body for a 400."""

    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(message)
        self.body = openai_error(message, param=param, code=code)


@dataclass(frozen=True)
class ImageJob:
    kind: str  # "image_generation" | "image_edit": the SSE event prefix
    model: str
    prompt: str
    n: int
    size: tuple[int, int]
    output_format: str
    transparent: bool
    quality: str
    stream: bool
    partial_images: int
    response_format: str | None
    noise: bool
    frame_count: int = 9
    frame_duration_ms: int = 200
    svg_model: str | None = None
    svg_effort: str | None = None
    safety_identifier: str | None = None

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        kind: str,
        *,
        deployment: str | None = None,
        input_size: tuple[int, int] | None = None,
        noise: bool = False,
    ) -> ImageJob:
        """`params`: the JSON body, or the multipart form fields (strings). Size auto/absent: the first
        input image's size for edits, else 1024x1024. dall-e models: png only, no streaming."""
        model = str(params.get("model") or deployment or "gpt-image-1")
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidParams(
                "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter"
            )
        stream = str(params.get("stream")).lower() in {"true", "1"}
        dalle = model.startswith("dall-e")
        if dalle and stream:
            raise InvalidParams(f"Streaming is not supported for {model}.", "stream", "invalid_value")
        try:
            n = int(params.get("n") or 1)
            partial_images = int(params.get("partial_images") or 0)
        except ValueError as exc:
            raise InvalidParams(str(exc), "n", "invalid_value") from exc
        response_format = params.get("response_format")
        if response_format and not dalle:
            # Today's API: "Unsupported for GPT image models, which always return base64".
            raise InvalidParams(
                f"Unknown parameter: 'response_format' is not supported with the model '{model}'.",
                "response_format",
                "unsupported_parameter",
            )
        output_format = "png" if dalle else str(params.get("output_format") or "png").lower()
        if output_format in ("gif", "svg") and stream:
            raise InvalidParams(
                f"{output_format} output does not support streaming.", "stream", "invalid_value"
            )
        if output_format == "svg" and n != 1:
            raise InvalidParams("SVG output requires n=1.", "n", "invalid_value")
        svg = params.get("svg") if isinstance(params.get("svg"), dict) else {}
        reasoning = svg.get("reasoning") if isinstance(svg.get("reasoning"), dict) else {}
        svg_model = svg.get("model") or params.get("svg[model]")
        svg_effort = reasoning.get("effort") or params.get("svg[reasoning][effort]")
        identifier = params.get("safety_identifier") or params.get("user") or None
        return cls(
            kind=kind,
            model=model,
            prompt=prompt,
            n=n,
            size=parse_size(params.get("size"), input_size or (1024, 1024)),
            output_format=output_format,
            transparent=params.get("background") == "transparent",
            quality=str(params.get("quality") or "auto"),
            stream=stream,
            partial_images=partial_images,
            response_format=str(response_format) if response_format else None,
            noise=noise,
            frame_count=int(params.get("frame_count") or 9),
            # "caps the encoded delay at 655,350 ms per frame"
            frame_duration_ms=min(int(params.get("frame_duration_ms") or 200), 655_350),
            svg_model=str(svg_model) if svg_model else None,
            svg_effort=str(svg_effort) if svg_effort else None,
            safety_identifier=str(identifier) if identifier else None,
        )

    @property
    def dalle(self) -> bool:
        return self.model.startswith("dall-e")

    @property
    def settings(self) -> dict[str, str]:
        """The resolved settings the GPT-Image API echoes in responses and events."""
        return {
            "background": "transparent" if self.transparent else "opaque",
            "output_format": self.output_format,
            "quality": "high" if self.quality == "auto" else self.quality,
            "size": size_str(self.size),
        }

    def b64(self, variant: int) -> str:
        w, h = self.size
        if self.output_format == "gif":
            data = render_gif(w, h, self.frame_count, self.frame_duration_ms, variant)
            return base64.b64encode(data).decode()
        if self.output_format == "svg":
            return base64.b64encode(render_svg(w, h, variant)).decode()
        return render_b64(w, h, self.output_format, self.transparent, variant, self.noise)

    def svg_usage(self) -> dict[str, Any]:
        """The SVG author's usage, apart from the image's (the API's `svg_usage`)."""
        reasoning = {"low": 100, "high": 900}.get(self.svg_effort or "", 300)
        return {
            "model": self.svg_model or "gpt-5.5",
            "input_tokens": 1200,
            "output_tokens": 2400 + reasoning,
            "reasoning_tokens": reasoning,
            "total_tokens": 3600 + reasoning,
        }

    def payload(self, usage: dict[str, Any] | None, store: Callable[[int], str]) -> dict[str, Any]:
        """The `ImagesResponse`. dall-e: only `created` and `data` (`url` when asked for, via
        `store(variant)`; `revised_prompt` for dall-e-3). GPT-Image: settings and `usage` too."""
        created = int(time.time())
        if not self.dalle:
            data = [{"b64_json": self.b64(i)} for i in range(self.n)]
            payload = {"created": created, "data": data, **self.settings}
            if usage is not None:
                payload["usage"] = usage
            if self.safety_identifier:
                payload["safety_identifier"] = self.safety_identifier
            if self.output_format == "svg":
                payload["svg_usage"] = self.svg_usage()
            return payload
        items: list[dict[str, Any]] = []
        for i in range(self.n):
            item = {"url": store(i)} if self.response_format == "url" else {"b64_json": self.b64(i)}
            if self.model.startswith("dall-e-3"):
                item["revised_prompt"] = f"A detailed rendering of: {self.prompt}"
            items.append(item)
        return {"created": created, "data": items}

    def events(
        self, usage: dict[str, Any] | None, usage_on: Collection[int] | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """`partial_images` partial events (indexes 0..k-1), then one completed event per image, each
        completed event carrying `usage` (only those whose index is in `usage_on`, when given)."""
        created_at = int(time.time())
        partial, completed = f"{self.kind}.partial_image", f"{self.kind}.completed"
        for index in range(self.partial_images):
            data = {"type": partial, "b64_json": self.b64(100 + index), "partial_image_index": index}
            yield partial, {**data, **self.settings, "created_at": created_at}
        for index in range(self.n):
            data = {"type": completed, "b64_json": self.b64(index), **self.settings}
            event = {**data, "created_at": created_at}
            reports = usage is not None and (usage_on is None or index in usage_on)
            yield completed, {**event, "usage": usage} if reports else event
