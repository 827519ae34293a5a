"""Adapter for Google Imagen on the Gemini API (``:predict``).

    POST {base_url}/models/{model}:predict                base_url default DEFAULT_BASE_URL
    x-goog-api-key: <key>
    {"instances": [{"prompt": prompt}],
     "parameters": {"sampleCount": n, "aspectRatio": "16:9", "imageSize": "2K", "includeRaiReason": true}}
    → {"predictions": [{"bytesBase64Encoded": …, "mimeType": "image/png"} | {"raiFilteredReason": …}]}

Read before writing it (public documentation, read not copied):
- Imagen on the Gemini API (models, ``:predict``, sampleCount 1–4, aspectRatio 1:1 3:4 4:3 9:16
  16:9, imageSize 1K/2K for Standard and Ultra only, personGeneration), as summarised from
  https://ai.google.dev/gemini-api/docs/imagen in
  https://gitea.arisingmedia.us/AM-WEB/arisingmedia-web-sops/src/branch/main/image-gen-workflow/imagen-api-reference.json
  and https://doc.routescope.ai/en/docs/api/images/imagen
- The Vertex AI Imagen reference for the predictions' fields (bytesBase64Encoded, mimeType,
  raiFilteredReason) and the aspect-ratio guide:
  https://cloud.google.com/vertex-ai/generative-ai/docs/reference/rest/Shared.Types/VisionGenerativeModelResult
  https://cloud.google.com/vertex-ai/generative-ai/docs/image/configure-aspect-ratio
- Filtered images (fewer images than asked, a filtered reason): the Firebase
  ImagenGenerationResponse reference, https://firebase.google.com/docs/reference/js/vertexai.imagengenerationresponse

Translation:
- ``size`` → ``aspectRatio`` (nearest of the catalog's list) and, for models with
  ``resolutions``, ``imageSize`` nearest the asked long edge; ``quality`` picks the tier where the
  catalog maps it (``hd`` → 2K, ``standard`` → 1K).
- ``n`` → ``sampleCount`` (the catalog's ``n_max`` is Imagen's 4): one call.
- ``output_format``: Imagen on the Gemini API answers PNG; jpeg/webp are re-encoded by the gateway.
- Edits: Imagen on the Gemini API has none; the catalog says so (400 before anything is sent).
- Filtering: a prediction carrying ``raiFilteredReason`` is a filtered image. Some images
  filtered → the others are returned and charged; all filtered, or an empty answer (what the API
  returns when every image was filtered) → 400 ``moderation_blocked`` (stage output), not charged.
- Priced per image; no token usage is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from app.core.errors import UpstreamError
from app.domain.jobs import ImageJob, ImageResult
from app.upstream.base import ImageProvider
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.config import ProviderKind, UpstreamSettings, common_options, register_kind
from app.upstream.errors import INVALID_RESPONSE
from app.upstream.providers.gemini import DEFAULT_BASE_URL, GeminiProvider
from app.upstream.providers.native import (
    Produced,
    decode_b64,
    deliver,
    images_response,
    json_object,
    moderation_blocked,
    nearest_ratio,
    nearest_tier,
    produced,
)

__all__ = ["DEFAULT_BASE_URL", "ImagenProvider"]


class ImagenProvider(GeminiProvider):
    """An ``ImageProvider`` over the Gemini API's Imagen ``:predict`` endpoint (auth and error
    bodies as Gemini's)."""

    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult:
        url = f"{self._base_url}/models/{quote(upstream_model, safe='')}:predict"
        raw, _ = await self._send(
            "POST", url, request_id=job.request_id, call=call, json_body=request_body(job)
        )
        delivered = [await deliver(image, job) for image in parse_answer(raw)]
        return images_response(delivered)

    async def edit(
        self,
        job: ImageJob,  # noqa: ARG002
        *,
        upstream_model: str,  # noqa: ARG002
        call: UpstreamCall = DIRECT,  # noqa: ARG002
    ) -> ImageResult:
        raise UpstreamError("Imagen does not edit images.")  # the catalog refuses edits first


def request_body(job: ImageJob) -> dict[str, Any]:
    spec = job.caps.provider
    parameters: dict[str, Any] = {"sampleCount": job.n, "includeRaiReason": True}
    if spec is not None:
        parameters["aspectRatio"] = nearest_ratio(job.size, spec.aspect_ratios, spec.default_ratio)
        tier = spec.quality_resolutions.get(job.quality) or nearest_tier(job.size, spec.resolutions)
        if tier is not None:
            parameters["imageSize"] = tier
        parameters.update(spec.mapped_params(job.forward))
    return {"instances": [{"prompt": job.prompt}], "parameters": parameters}


def parse_answer(raw: bytes) -> list[Produced]:
    answer = json_object(raw)
    predictions = answer.get("predictions")
    if predictions is None or predictions == []:
        raise moderation_blocked("output")
    if not isinstance(predictions, list):
        raise UpstreamError(INVALID_RESPONSE)
    images: list[Produced] = []
    filtered: list[str] = []
    for prediction in predictions:
        if not isinstance(prediction, Mapping):
            raise UpstreamError(INVALID_RESPONSE)
        if prediction.get("raiFilteredReason"):
            filtered.append(str(prediction["raiFilteredReason"]))
            continue
        images.append(produced(decode_b64(prediction.get("bytesBase64Encoded"))))
    if not images:
        # The reason is Google's prose (it may quote policy codes): not relayed as categories.
        raise moderation_blocked("output")
    return images


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return ImagenProvider(base_url=upstream.base_url or DEFAULT_BASE_URL, **common_options(upstream))


register_kind(ProviderKind(name="imagen", build=_build))
