"""Adapter for Google's Gemini image models (``generateContent`` on the Gemini API).

    POST {base_url}/models/{model}:generateContent        base_url default DEFAULT_BASE_URL
    x-goog-api-key: <key>
    {"contents": [{"role": "user", "parts": [{"text": prompt}, {"inlineData": {mimeType, data}}…]}],
     "generationConfig": {"responseModalities": ["TEXT", "IMAGE"],
                          "imageConfig": {"aspectRatio": "3:2", "imageSize": "2K"}}}

Read before writing it (public documentation, read not copied):
- Gemini API reference: generateContent / streamGenerateContent, the ``x-goog-api-key`` header:
  https://ai.google.dev/api and the GenerationConfig reference (responseModalities, imageConfig),
  https://ai.google.dev/api/rest/v1beta/GenerationConfig
- ImageConfig (aspectRatio, imageSize): https://firebase.google.com/docs/reference/js/ai.imageconfig.md.txt
- FinishReason values (SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII, IMAGE_SAFETY, …)
  and promptFeedback.blockReason: the Vertex AI BlockedReason / PromptFeedback references,
  https://cloud.google.com/vertex-ai/generative-ai/docs/reference/nodejs/latest/vertexai/blockedreason
  and a promptFeedback / usageMetadata answer quoted in https://github.com/vercel/ai/issues/4235
- FinishReason ``NO_IMAGE`` / ``IMAGE_OTHER`` and ``finishMessage`` ("You will not be charged"):
  the google-genai FinishReason enum (https://googleapis.github.io/kotlin-genai/…/-finish-reason/)
  and an answer quoted in https://docs.apiyi.com/faq/gemini-image-other.md; that Google does not
  bill NO_IMAGE is inferred from the same finishMessage, not read in Google's own pages.
- Aspect ratios and resolution tiers of the image models (1K only for 2.5 Flash; 1K/2K/4K for
  3 Pro), and per-modality usage: Google's image-generation guide
  (https://ai.google.dev/gemini-api/docs/image-generation), read through the summaries of it at
  https://docs.gptproto.com/docs/allapi/Google/gemini-3-pro-image-preview/official-format/image-edit

Translation:
- ``size`` → ``imageConfig.aspectRatio``, the catalog's nearest ratio; ``imageSize`` (1K/2K/4K)
  only for models whose catalog entry lists ``resolutions`` (the 2.5 Flash model takes none).
  The answer's ``size`` is read from the returned image.
- ``n`` → ``n`` parallel calls: image models make one image per candidate, and ``candidateCount``
  is not accepted for them.
- edits: every input image as an ``inlineData`` part after the prompt. Gemini has no masks: the
  catalog refuses one (400) before anything is sent.
- ``output_format``: Gemini answers PNG; jpeg/webp (and ``output_compression``) are re-encoded
  by the gateway.
- ``usageMetadata`` → OpenAI ``usage``: prompt tokens split TEXT/IMAGE by
  ``promptTokensDetails``, output tokens by ``candidatesTokensDetails`` (IMAGE → image output,
  TEXT and ``thoughtsTokenCount`` → text output). Summed over parallel calls: token-priced.
- ``promptFeedback.blockReason`` (input) and a candidate's ``finishReason`` SAFETY, IMAGE_SAFETY,
  PROHIBITED_CONTENT, … (output) → 400 ``moderation_blocked``, not charged. ``NO_IMAGE`` and
  ``IMAGE_OTHER`` (the model made no image for this prompt, or could not show the one it made;
  the answer's ``finishMessage`` says the request is not charged) → 400
  ``image_generation_failed`` (``prompt_rejected``): a property of the prompt, so not retried on
  another upstream, not charged. A candidate that ends without an image for another reason (STOP
  with text only, OTHER) is an unusable answer (502, retried elsewhere).
- Gemini 3 Pro takes up to 14 reference images (the catalog's ``max_images``); inline data shares
  the 20 MB request (``max_total_bytes``).
- Google's error bodies ``{"error": {code, message, status}}`` keep their HTTP status; the message
  is scrubbed like any upstream's.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from app.core.errors import GatewayError, UpstreamError
from app.domain.jobs import ImageJob, ImageResult, TokenUsage
from app.upstream.base import ImageProvider
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.config import ProviderKind, UpstreamSettings, common_options, register_kind
from app.upstream.errors import INVALID_RESPONSE
from app.upstream.providers.native import (
    NO_IMAGE,
    NativeProvider,
    Produced,
    decode_b64,
    deliver,
    images_response,
    in_parallel,
    json_object,
    moderation_blocked,
    nearest_ratio,
    nearest_tier,
    produced,
    prompt_rejected,
    rejected,
)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
# Finish and block reasons that are a safety refusal: the client's answer, 400 moderation_blocked.
SAFETY_REASONS = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_RECITATION",
    }
)
# Finish reasons that say this prompt yields no image: the client's answer, on any upstream.
PROMPT_REASONS = frozenset({"NO_IMAGE", "IMAGE_OTHER"})
PROMPT_NO_IMAGE = "The model did not generate an image for this prompt. Try rephrasing the prompt."


class GeminiProvider(NativeProvider):
    """An ``ImageProvider`` over the Gemini API for its image models."""

    def _auth(self) -> dict[str, str]:
        return {"x-goog-api-key": self._api_key} if self._api_key else {}

    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult:
        return await self._run(job, upstream_model, call, images=[])

    async def edit(self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT) -> ImageResult:
        inputs = await asyncio.to_thread(_read_inputs, job)
        return await self._run(job, upstream_model, call, images=inputs)

    async def _run(
        self, job: ImageJob, model: str, call: UpstreamCall, *, images: list[dict[str, Any]]
    ) -> ImageResult:
        body = request_body(job, images)
        url = f"{self._base_url}/models/{quote(model, safe='')}:generateContent"

        async def one(_: int) -> list[tuple[list[Produced], TokenUsage]]:
            raw, _headers = await self._send(
                "POST", url, request_id=job.request_id, call=call, json_body=body
            )
            return [parse_answer(raw)]

        outcomes = await in_parallel(job.n, one)
        usage = TokenUsage()
        delivered: list[Produced] = []
        for made, used in outcomes:
            usage = usage + used
            for image in made:
                delivered.append(await deliver(image, job))
        return images_response(delivered, usage)

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
        message, code = None, None
        try:
            error = orjson.loads(raw).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            error = None
        if isinstance(error, Mapping):
            message = error.get("message") if isinstance(error.get("message"), str) else None
            code = str(error["status"]).lower() if isinstance(error.get("status"), str) else None
        return rejected(status, message, headers, secrets=self._secrets, code=code)


def request_body(job: ImageJob, images: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``generateContent`` body for one image of ``job``."""
    spec = job.caps.provider
    image_config: dict[str, Any] = {}
    if spec is not None:
        image_config["aspectRatio"] = nearest_ratio(job.size, spec.aspect_ratios, spec.default_ratio)
        tier = spec.quality_resolutions.get(job.quality) or nearest_tier(job.size, spec.resolutions)
        if tier is not None:
            image_config["imageSize"] = tier
    config: dict[str, Any] = {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": image_config}
    if spec is not None:
        config.update(spec.mapped_params(job.forward))
    parts: list[dict[str, Any]] = [{"text": job.prompt}, *images]
    return {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}


def _read_inputs(job: ImageJob) -> list[dict[str, Any]]:
    """The edit's images as inline parts (the spool's bytes, base64)."""
    return [
        {
            "inlineData": {
                "mimeType": image.content_type,
                "data": base64.b64encode(image.path.read_bytes()).decode(),
            }
        }
        for image in job.images
    ]


def parse_answer(raw: bytes) -> tuple[list[Produced], TokenUsage]:
    """The images and token usage of one ``generateContent`` answer (rules in the module doc)."""
    answer = json_object(raw)
    feedback = answer.get("promptFeedback")
    if isinstance(feedback, Mapping) and feedback.get("blockReason"):
        raise moderation_blocked("input", categories=[str(feedback["blockReason"]).lower()])
    candidates = answer.get("candidates")
    if candidates is None:
        candidates = []
    if not isinstance(candidates, list):
        raise UpstreamError(INVALID_RESPONSE)
    images: list[Produced] = []
    reasons: list[str] = []
    for candidate in candidates:
        if not isinstance(candidate, Mapping):
            raise UpstreamError(INVALID_RESPONSE)
        reason = candidate.get("finishReason")
        if isinstance(reason, str):
            reasons.append(reason)
        content = candidate.get("content") or {}
        parts = content.get("parts") if isinstance(content, Mapping) else None
        for part in parts or []:
            if not isinstance(part, Mapping) or part.get("thought"):
                continue  # thinking models show draft images as thoughts: not the answer
            inline = part.get("inlineData") or part.get("inline_data")
            if isinstance(inline, Mapping):
                images.append(produced(decode_b64(inline.get("data"))))
    if not images:
        blocked = [r for r in reasons if r in SAFETY_REASONS]
        if blocked:
            raise moderation_blocked("output", categories=[r.lower() for r in blocked])
        for reason in reasons:
            if reason in PROMPT_REASONS:
                raise prompt_rejected(PROMPT_NO_IMAGE, reason)
        raise UpstreamError(NO_IMAGE)
    return images, usage_of(answer.get("usageMetadata"))


def usage_of(metadata: Any) -> TokenUsage:
    """``usageMetadata`` as the ledger's four token counts."""
    if not isinstance(metadata, Mapping):
        return TokenUsage()
    prompt = _count(metadata.get("promptTokenCount"))
    output = _count(metadata.get("candidatesTokenCount"))
    thoughts = _count(metadata.get("thoughtsTokenCount"))
    prompt_by = _by_modality(metadata.get("promptTokensDetails"))
    output_by = _by_modality(metadata.get("candidatesTokensDetails"))
    image_in = prompt_by.get("IMAGE", 0)
    text_in = prompt - image_in if prompt_by else prompt
    if output_by:
        image_out = output_by.get("IMAGE", 0)
        text_out = output - image_out
    else:
        image_out, text_out = output, 0
    return TokenUsage(
        text_input=max(text_in, 0),
        image_input=image_in,
        text_output=max(text_out, 0) + thoughts,
        image_output=image_out,
    )


def _by_modality(details: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in details if isinstance(details, list) else []:
        if isinstance(item, Mapping) and isinstance(item.get("modality"), str):
            modality = str(item["modality"])
            counts[modality] = counts.get(modality, 0) + _count(item.get("tokenCount"))
    return counts


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return GeminiProvider(base_url=upstream.base_url or DEFAULT_BASE_URL, **common_options(upstream))


register_kind(ProviderKind(name="gemini", build=_build))
