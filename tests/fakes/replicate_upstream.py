"""A fake Replicate API on 127.0.0.1, speaking the documented wire format: ``POST
/v1/models/{owner}/{name}/predictions`` (``Authorization: Bearer``, ``Prefer: wait``) → a
prediction; ``GET /v1/predictions/{id}`` → the same prediction later; each output URL is on the
same server (``/delivery/{id}-{i}.{ext}``, no key).

Inputs are validated as the model's schema does (422 problem details): ``num_outputs`` 1–4,
``output_format`` webp/jpg/png, ``aspect_ratio`` among FLUX [schnell]'s. Scripted outcomes at
creation (``Outcome.kind``), beyond ``status`` / ``malformed``: ``slow`` (the wait ends with the
prediction ``starting``; ``detail`` polls answer ``processing`` before it succeeds), ``nsfw`` and
``failed`` (a failed prediction, its error naming NSFW content or not), ``single`` (``output`` a
string, not a list), ``foreign_output`` (an output URL on a host nobody allowed).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from tests.fakes.images import render_image
from tests.fakes.provider_fake import Outcome, ProviderFake, Recorded, json_answer

FOREIGN_OUTPUT = "http://169.254.169.254/latest/meta-data/iam"
RATIOS = {"1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"}
EXTENSIONS = {"webp": "webp", "jpg": "jpeg", "png": "png"}


@dataclass
class Prediction:
    id: str
    width: int
    height: int
    fmt: str
    count: int
    kind: str = "ok"
    pending_polls: int = 0
    polls: int = 0


class FakeReplicate(ProviderFake):
    name = "fake-replicate"

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self._ids = itertools.count(1)
        self.predictions: dict[str, Prediction] = {}

    def reset(self) -> None:
        self.predictions.clear()

    def authorized(self, recorded: Recorded) -> bool:
        if recorded.path.startswith("/delivery/"):
            return True
        return recorded.headers.get("authorization") == f"Bearer {self.api_key}"

    def unauthorized(self) -> Response:
        return json_answer(
            {"title": "Unauthenticated", "detail": "You did not pass a valid token", "status": 401}, 401
        )

    @property
    def creations(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST"]

    async def answer(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        if recorded.method == "POST" and recorded.path.endswith("/predictions"):
            return self._create(recorded, outcome)
        if recorded.path.startswith("/v1/predictions/"):
            found = self.predictions.get(recorded.path.rsplit("/", 1)[-1])
            if found is None:
                return json_answer({"title": "Not found", "detail": "Not found", "status": 404}, 404)
            found.polls += 1
            return json_answer(self._object(found, running=found.polls <= found.pending_polls))
        if recorded.path.startswith("/delivery/"):
            found = self.predictions.get(recorded.path.rsplit("/", 1)[-1].rsplit("-", 1)[0])
            if found is None:
                return Response(b"", 404)
            fmt = EXTENSIONS[found.fmt]
            return Response(render_image(found.width, found.height, fmt), 200, media_type=f"image/{fmt}")
        return json_answer({"title": "Not found", "detail": "Not found", "status": 404}, 404)

    def _create(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        data: dict[str, Any] = (recorded.json or {}).get("input", {})
        ratio = data.get("aspect_ratio", "1:1")
        count = data.get("num_outputs", 1)
        fmt = data.get("output_format", "webp")
        invalid = [
            name
            for name, ok in (
                ("aspect_ratio", ratio in RATIOS),
                ("num_outputs", isinstance(count, int) and 1 <= count <= 4),
                ("output_format", fmt in EXTENSIONS),
            )
            if not ok
        ]
        if invalid:
            detail = f"- input.{invalid[0]}: value is not allowed"
            return json_answer({"title": "Input validation failed", "detail": detail, "status": 422}, 422)
        w, _, h = ratio.partition(":")
        scale = (1024 * 1024 / (int(w) * int(h))) ** 0.5
        found = Prediction(
            id=f"p{next(self._ids)}",
            width=round(int(w) * scale / 16) * 16,
            height=round(int(h) * scale / 16) * 16,
            fmt=fmt,
            count=count,
        )
        if outcome is not None:
            found.kind = outcome.kind
            found.pending_polls = int(outcome.detail or 0) if outcome.kind == "slow" else 0
        self.predictions[found.id] = found
        return json_answer(self._object(found, running=found.kind == "slow"), 201)

    def _object(self, found: Prediction, *, running: bool) -> dict[str, Any]:
        ext = found.fmt
        urls = [
            FOREIGN_OUTPUT if found.kind == "foreign_output" else f"{self.url}/delivery/{found.id}-{i}.{ext}"
            for i in range(found.count)
        ]
        status, output, error = "succeeded", urls, None
        if running:
            status, output = "starting" if found.polls == 0 else "processing", None
        elif found.kind == "nsfw":
            status, output, error = "failed", None, "NSFW content detected. Try running it again."
        elif found.kind == "failed":
            status, output, error = "failed", None, "CUDA out of memory"
        elif found.kind == "single":
            output = urls[0]
        return {
            "id": found.id,
            "model": "black-forest-labs/flux-schnell",
            "status": status,
            "output": output,
            "error": error,
            "urls": {
                "get": f"{self.url}/v1/predictions/{found.id}",
                "cancel": f"{self.url}/v1/predictions/{found.id}/cancel",
            },
        }
