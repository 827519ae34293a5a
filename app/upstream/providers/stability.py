"""Adapter for Stability AI's v2beta Stable Image API.

    POST {base_url}/v2beta/stable-image/generate/{core|ultra|sd3}     base_url default DEFAULT_BASE_URL
    POST {base_url}/v2beta/stable-image/edit/inpaint
    Authorization: Bearer <key>        Accept: application/json        multipart/form-data
    → {"image": "<base64>", "finish_reason": "SUCCESS" | "CONTENT_FILTERED", "seed": 123}

Read before writing it (public documentation, read not copied):
- The v2beta Generate operations (Core, Ultra, SD3: multipart, ``accept: application/json`` for a
  base64 JSON answer ``{image, finish_reason: SUCCESS | CONTENT_FILTERED, seed}``, aspect_ratio
  16:9 1:1 21:9 2:3 3:2 4:5 5:4 9:16 9:21, output_format, seed, negative_prompt, SD3's ``model``),
  https://platform.stability.ai/docs/api-reference, read through its OpenAPI document mirrored at
  https://apis.apis.io/apis/stability-ai/stable-image-generate/ and
  https://raw.githubusercontent.com/api-evangelist/stability-ai/refs/heads/main/json-structure/stability-ai-image-generation-structure.json
- Inpaint (image, mask: white is repainted, black kept; without a mask the image's alpha channel
  is used; grow_mask): https://schemas.apis.io/schemas/stability-ai/stability-ai-inpaintrequest/
  and https://glitch9inc.github.io/DocFx.AIDevKit/api/Glitch9.AIDevKit.Stability.StabilityInpaintRequest.html
- Errors: ``{"id", "name", "errors": [...]}``, and 403 ``content_moderation`` for a flagged request,
  as the API reference lists them (from the reference itself; no mirror above shows them).

Translation:
- The catalog's provider model is the endpoint: ``core`` and ``ultra`` post to their own;
  ``sd3.5-large`` (any ``sd3…``) posts to ``sd3`` with ``model`` set.
- ``size`` → ``aspect_ratio``, nearest of the catalog's list; the answer's ``size`` is read from
  the image. ``n`` → ``n`` parallel calls (one image each).
- ``output_format``: png, jpeg and webp are made by Stability (SD3: png and jpeg; webp re-encoded);
  ``output_compression`` has no Stability setting: jpeg/webp are re-encoded at that quality.
- Edits go to inpaint, with the first image. OpenAI's mask marks what to edit with *transparent*
  pixels; Stability's with *white* ones: the mask is converted (white where the alpha is 0, grey
  in between) before it is sent. An edit without a mask sends the image alone, so its own alpha
  channel marks the area, as OpenAI's edits read it; an image without alpha and without a mask
  has nothing to repaint and is refused (400) before anything is sent.
- 403 ``content_moderation`` → 400 ``moderation_blocked`` (stage input); ``CONTENT_FILTERED`` →
  400 ``moderation_blocked`` (stage output); neither is charged. Other 403s are the gateway's key
  (502, fail over), like any upstream's.
- Priced per image (the catalog turns Stability's credits into a price).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from PIL import Image

from app.core.errors import GatewayError, InvalidRequestError, UpstreamError
from app.domain.jobs import ImageJob, ImageResult
from app.upstream.base import ImageProvider
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.config import ProviderKind, UpstreamSettings, common_options, register_kind
from app.upstream.errors import INVALID_RESPONSE
from app.upstream.multipart import form_value
from app.upstream.providers.native import (
    NativeProvider,
    Produced,
    decode_b64,
    deliver,
    images_response,
    in_parallel,
    json_object,
    moderation_blocked,
    nearest_ratio,
    produced,
    rejected,
)

DEFAULT_BASE_URL = "https://api.stability.ai"
_OWN_ENDPOINTS = frozenset({"core", "ultra"})


class StabilityProvider(NativeProvider):
    """An ``ImageProvider`` over Stability AI's Stable Image API."""

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult:
        if upstream_model in _OWN_ENDPOINTS:
            url, fields = f"{self._base_url}/v2beta/stable-image/generate/{upstream_model}", {}
        else:
            url, fields = f"{self._base_url}/v2beta/stable-image/generate/sd3", {"model": upstream_model}
        fields.update(generate_fields(job))
        return await self._run(job, url, fields, call, files=[])

    async def edit(
        self,
        job: ImageJob,
        *,
        upstream_model: str,  # noqa: ARG002
        call: UpstreamCall = DIRECT,
    ) -> ImageResult:
        first = job.images[0]
        # Validation refuses this first (the catalog's `needs_area`); kept for a models file that
        # routes an edit here without declaring it, so the upstream is never sent a blank inpaint.
        if job.mask is None and not first.has_alpha:
            raise InvalidRequestError(
                "This model edits the area a mask marks: send a mask, or an image whose transparent "
                "pixels mark the area to edit.",
                param="mask",
                code="invalid_value",
            )
        files = await asyncio.to_thread(_edit_files, job)
        url = f"{self._base_url}/v2beta/stable-image/edit/inpaint"
        return await self._run(job, url, edit_fields(job), call, files=files)

    async def _run(
        self,
        job: ImageJob,
        url: str,
        fields: dict[str, Any],
        call: UpstreamCall,
        *,
        files: list[tuple[str, bytes, str]],
    ) -> ImageResult:
        async def one(_: int) -> list[Produced]:
            # A form is consumed by sending it: one per call.
            form = aiohttp.FormData(default_to_multipart=True)
            for name, value in fields.items():
                form.add_field(name, form_value(value))
            for name, data, content_type in files:
                form.add_field(name, data, filename=f"{name}.png", content_type=content_type)
            answer, _headers = await self._send("POST", url, request_id=job.request_id, call=call, form=form)
            return [await deliver(parse_answer(answer), job)]

        return images_response(await in_parallel(job.n, one))

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
        """``{"id", "name", "errors": [...]}``; ``content_moderation`` is the client's answer."""
        name, message = None, None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, Mapping):
            name = body.get("name") if isinstance(body.get("name"), str) else None
            errors = body.get("errors")
            if isinstance(errors, list):
                message = "; ".join(str(e) for e in errors if isinstance(e, str)) or None
        if name == "content_moderation":
            return moderation_blocked("input")
        code = "invalid_value" if status in (400, 413, 422) else None
        return rejected(status, message, headers, secrets=self._secrets, code=code)


def _common(job: ImageJob) -> dict[str, Any]:
    spec = job.caps.provider
    native = spec.native_formats if spec is not None else ("png",)
    fields: dict[str, Any] = {
        "prompt": job.prompt,
        "output_format": job.output_format if job.output_format in native else "png",
    }
    if spec is not None:
        fields.update(spec.mapped_params(job.forward))
    return fields


def generate_fields(job: ImageJob) -> dict[str, Any]:
    fields = _common(job)
    spec = job.caps.provider
    if spec is not None and spec.aspect_ratios:
        fields["aspect_ratio"] = nearest_ratio(job.size, spec.aspect_ratios, spec.default_ratio)
    return fields


def edit_fields(job: ImageJob) -> dict[str, Any]:
    return _common(job)


def _edit_files(job: ImageJob) -> list[tuple[str, bytes, str]]:
    first = job.images[0]
    files = [("image", first.path.read_bytes(), first.content_type)]
    if job.mask is not None:
        files.append(("mask", stability_mask(job.mask.path.read_bytes()), "image/png"))
    return files


def stability_mask(openai_mask: bytes) -> bytes:
    """OpenAI's mask (transparent = edit) as Stability's (white = edit): the inverted alpha, as a
    greyscale PNG, so partial transparency becomes partial strength."""
    with Image.open(io.BytesIO(openai_mask)) as mask:
        alpha = mask.convert("RGBA").getchannel("A")
    inverted = alpha.point(lambda a: 255 - a)
    buffer = io.BytesIO()
    inverted.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_answer(raw: bytes) -> Produced:
    answer = json_object(raw)
    reason = answer.get("finish_reason")
    if reason == "CONTENT_FILTERED":
        raise moderation_blocked("output")
    if reason not in (None, "SUCCESS"):
        raise UpstreamError(INVALID_RESPONSE)
    return produced(decode_b64(answer.get("image")))


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return StabilityProvider(base_url=upstream.base_url or DEFAULT_BASE_URL, **common_options(upstream))


register_kind(ProviderKind(name="stability", build=_build))
