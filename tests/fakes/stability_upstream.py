"""A fake Stability AI v2beta API on 127.0.0.1, speaking the documented wire format: multipart
``POST /v2beta/stable-image/generate/{core,ultra,sd3}`` and ``/v2beta/stable-image/edit/inpaint``,
``Authorization: Bearer``, ``Accept: application/json`` → ``{image, finish_reason, seed}``.

Scripted outcomes beyond ``status`` / ``malformed``: ``content_filtered`` (200, finish_reason
CONTENT_FILTERED), ``content_moderation`` (403 ``{"name": "content_moderation", "errors": [...]}``).
"""

from __future__ import annotations

import base64
import io

from PIL import Image
from starlette.responses import Response

from tests.fakes.images import render_image
from tests.fakes.provider_fake import Outcome, ProviderFake, Recorded, json_answer

SIZES = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "2:3": (832, 1216),
    "3:2": (1216, 832),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}


class FakeStability(ProviderFake):
    name = "fake-stability"

    def authorized(self, recorded: Recorded) -> bool:
        return recorded.headers.get("authorization") == f"Bearer {self.api_key}"

    def unauthorized(self) -> Response:
        return json_answer({"id": "x", "name": "unauthorized", "errors": ["authorization: invalid key"]}, 401)

    async def answer(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        if outcome is not None and outcome.kind == "content_moderation":
            errors = ["Your request was flagged by our content moderation system."]
            return json_answer({"id": "mod-1", "name": "content_moderation", "errors": errors}, 403)
        if recorded.headers.get("accept") != "application/json":
            return json_answer(
                {"id": "x", "name": "bad_request", "errors": ["accept: must be application/json"]}, 400
            )
        fmt = recorded.form.get("output_format", ["png"])[0]
        if recorded.path.endswith("/edit/inpaint"):
            with Image.open(io.BytesIO(recorded.files["image"][0][0])) as source:
                width, height = source.size
        elif recorded.path.rsplit("/", 1)[-1] in ("core", "ultra", "sd3"):
            width, height = SIZES[recorded.form.get("aspect_ratio", ["1:1"])[0]]
        else:
            return json_answer({"id": "x", "name": "not_found", "errors": ["not found"]}, 404)
        if outcome is not None and outcome.kind == "content_filtered":
            return json_answer({"image": "", "finish_reason": "CONTENT_FILTERED", "seed": 7})
        image = base64.b64encode(render_image(width, height, fmt)).decode()
        return json_answer({"image": image, "finish_reason": "SUCCESS", "seed": 7})
