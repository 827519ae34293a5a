"""A fake Google Gemini API (Gemini image models and Imagen) on 127.0.0.1, speaking the documented
wire format: ``POST /v1beta/models/{model}:generateContent`` and ``…:predict``, ``x-goog-api-key``.

Images are real PNGs at the size the asked aspect ratio and tier produce (``dims``). Scripted
outcomes (``Outcome.kind``) beyond ``status`` / ``malformed``:
- Gemini: ``block`` (promptFeedback.blockReason = detail), ``finish`` (a candidate ending with
  finishReason = detail and no image, e.g. NO_IMAGE), ``no_image`` (STOP with text only);
- Imagen: ``filtered`` (detail = how many of the asked images come back filtered), ``empty``
  (``{}``, what the API answers when every image was filtered).
"""

from __future__ import annotations

import base64
import math
from typing import Any

from starlette.responses import Response

from tests.fakes.images import render_image
from tests.fakes.provider_fake import Outcome, ProviderFake, Recorded, json_answer

TIERS = {"1K": 1024, "2K": 2048, "4K": 4096}
PROMPT_TEXT_TOKENS = 12
INPUT_IMAGE_TOKENS = 258
IMAGE_TOKENS = {"1K": 1290, "2K": 1290, "4K": 2000}
TEXT_OUT_TOKENS = 7


# Reference images per request (Google's image-generation guide: 3 for 2.5 Flash, 14 for 3 Pro).
MAX_INPUT_IMAGES = {"gemini-2.5-flash-image": 3, "gemini-3-pro-image-preview": 14}
PERSON_GENERATION = ("dont_allow", "allow_adult", "allow_all")


def dims(ratio: str, tier: str = "1K") -> tuple[int, int]:
    """The produced pixel size for an aspect ratio at a tier: about tier² pixels, edges of 16."""
    w, _, h = ratio.partition(":")
    r = int(w) / int(h)
    edge = TIERS[tier]
    return round(edge * math.sqrt(r) / 16) * 16, round(edge / math.sqrt(r) / 16) * 16


class FakeGoogle(ProviderFake):
    name = "fake-google"

    def authorized(self, recorded: Recorded) -> bool:
        return recorded.headers.get("x-goog-api-key") == self.api_key

    def unauthorized(self) -> Response:
        error = {
            "code": 403,
            "message": "Method doesn't allow unregistered callers.",
            "status": "PERMISSION_DENIED",
        }
        return json_answer({"error": error}, 403)

    async def answer(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        if recorded.path.endswith(":generateContent"):
            return self._generate_content(recorded, outcome)
        if recorded.path.endswith(":predict"):
            return self._predict(recorded, outcome)
        return json_answer({"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}}, 404)

    def _generate_content(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        body: dict[str, Any] = recorded.json or {}
        parts = body["contents"][0]["parts"]
        inputs = [p for p in parts if "inlineData" in p]
        model = recorded.path.rsplit("/", 1)[-1].split(":")[0]
        if len(inputs) > MAX_INPUT_IMAGES.get(model, 3):
            error = {"code": 400, "message": "Too many input images.", "status": "INVALID_ARGUMENT"}
            return json_answer({"error": error}, 400)
        usage = {
            "promptTokenCount": PROMPT_TEXT_TOKENS + INPUT_IMAGE_TOKENS * len(inputs),
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": PROMPT_TEXT_TOKENS}]
            + ([{"modality": "IMAGE", "tokenCount": INPUT_IMAGE_TOKENS * len(inputs)}] if inputs else []),
        }
        if outcome is not None and outcome.kind == "block":
            return json_answer({"promptFeedback": {"blockReason": outcome.detail}, "usageMetadata": usage})
        if outcome is not None and outcome.kind == "finish":
            candidate = {
                "content": {"parts": [], "role": "model"},
                "finishReason": outcome.detail,
                "index": 0,
            }
            return json_answer({"candidates": [candidate], "usageMetadata": usage})
        if outcome is not None and outcome.kind == "no_image":
            candidate = {"content": {"parts": [{"text": "I cannot draw that."}]}, "finishReason": "STOP"}
            return json_answer({"candidates": [candidate], "usageMetadata": usage})
        config = body.get("generationConfig", {}).get("imageConfig", {})
        tier = config.get("imageSize", "1K")
        width, height = dims(config.get("aspectRatio", "1:1"), tier)
        image = base64.b64encode(render_image(width, height, "png")).decode()
        out = IMAGE_TOKENS[tier]
        usage.update(
            candidatesTokenCount=out + TEXT_OUT_TOKENS,
            candidatesTokensDetails=[{"modality": "IMAGE", "tokenCount": out}],
            totalTokenCount=usage["promptTokenCount"] + out + TEXT_OUT_TOKENS,
        )
        content = {
            "parts": [{"text": "Here it is."}, {"inlineData": {"mimeType": "image/png", "data": image}}]
        }
        candidate = {"content": {**content, "role": "model"}, "finishReason": "STOP", "index": 0}
        return json_answer({"candidates": [candidate], "usageMetadata": usage, "modelVersion": "fake"})

    def _predict(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        if outcome is not None and outcome.kind == "empty":
            return json_answer({})
        parameters: dict[str, Any] = (recorded.json or {}).get("parameters", {})
        if parameters.get("personGeneration", "allow_adult") not in PERSON_GENERATION:
            error = {"code": 400, "message": "Invalid personGeneration.", "status": "INVALID_ARGUMENT"}
            return json_answer({"error": error}, 400)
        count = int(parameters.get("sampleCount", 4))
        filtered = int(outcome.detail) if outcome is not None and outcome.kind == "filtered" else 0
        width, height = dims(parameters.get("aspectRatio", "1:1"), parameters.get("imageSize", "1K"))
        image = base64.b64encode(render_image(width, height, "png")).decode()
        predictions: list[dict[str, Any]] = [
            {"raiFilteredReason": "Unable to show generated images. (support code 58061214)"}
            for _ in range(filtered)
        ]
        predictions += [
            {"bytesBase64Encoded": image, "mimeType": "image/png"} for _ in range(count - filtered)
        ]
        return json_answer({"predictions": predictions})
