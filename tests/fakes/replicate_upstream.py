"""A fake Replicate API on 127.0.0.1, speaking the documented wire format: ``POST
/v1/models/{owner}/{name}/predictions`` (``Authorization: Bearer``, ``Prefer: wait``) → a
prediction; ``GET /v1/predictions/{id}`` → the same prediction later; each output URL is on the
same server (``/delivery/{id}-{i}.{ext}``, no key).

Inputs are validated as the model's schema does (422 problem details): ``num_outputs`` 1–4,
``output_format`` webp/jpg/png, ``aspect_ratio`` among the model's. FLUX Kontext [pro]
(``black-forest-labs/flux-kontext-pro``) makes one image and has no ``num_outputs`` (refused here,
strictly); its ``input_image`` must be a ``data:image/…;base64,`` URI or the URL of a file uploaded
to this fake's Files API (``POST /v1/files``, multipart ``content`` → ``{id, urls: {get}}``): any
other URL is refused, as this fake fetches nothing. Without ``aspect_ratio`` the output keeps the
input's size. The decoded inputs are kept in ``Prediction.inputs``. A creation without
``Prefer: wait`` answers at once with the prediction ``starting`` (as Replicate's async mode does);
``hold`` (an Event) keeps every prediction ``processing`` while it is set. Scripted outcomes at
creation (``Outcome.kind``), beyond ``status`` / ``malformed``: ``slow`` (the wait ends with the
prediction ``starting``; ``detail`` polls answer ``processing`` before it succeeds), ``nsfw`` and
``failed`` (a failed prediction, its error naming NSFW content or not), ``single`` (``output`` a
string, not a list), ``foreign_output`` (an output URL on a host nobody allowed).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

from tests.fakes.images import image_size_of, render_image
from tests.fakes.provider_fake import Outcome, ProviderFake, Recorded, json_answer

FOREIGN_OUTPUT = "http://169.254.169.254/latest/meta-data/iam"
RATIOS = {"1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"}
KONTEXT = "black-forest-labs/flux-kontext-pro"
KONTEXT_RATIOS = RATIOS | {"2:1", "1:2"}
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
    inputs: list[bytes] = field(default_factory=list)


class FakeReplicate(ProviderFake):
    name = "fake-replicate"

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self._ids = itertools.count(1)
        self.predictions: dict[str, Prediction] = {}
        self.files: dict[str, bytes] = {}
        self.hold = threading.Event()  # set: every prediction stays processing

    def reset(self) -> None:
        self.predictions.clear()
        self.files.clear()
        self.hold.clear()

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
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/predictions")]

    async def answer(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        if recorded.method == "POST" and recorded.path.endswith("/predictions"):
            return self._create(recorded, outcome)
        if recorded.method == "POST" and recorded.path == "/v1/files":
            ((content, content_type),) = recorded.files.get("content") or [(b"", None)]
            file_id = f"f{next(self._ids)}"
            self.files[file_id] = content
            get = f"{self.url}/v1/files/{file_id}"
            return json_answer({"id": file_id, "content_type": content_type, "urls": {"get": get}}, 201)
        if recorded.path.startswith("/v1/predictions/"):
            found = self.predictions.get(recorded.path.rsplit("/", 1)[-1])
            if found is None:
                return json_answer({"title": "Not found", "detail": "Not found", "status": 404}, 404)
            found.polls += 1
            running = self.hold.is_set() or found.polls <= found.pending_polls
            return json_answer(self._object(found, running=running))
        if recorded.path.startswith("/delivery/"):
            found = self.predictions.get(recorded.path.rsplit("/", 1)[-1].rsplit("-", 1)[0])
            if found is None:
                return Response(b"", 404)
            fmt = EXTENSIONS[found.fmt]
            return Response(render_image(found.width, found.height, fmt), 200, media_type=f"image/{fmt}")
        return json_answer({"title": "Not found", "detail": "Not found", "status": 404}, 404)

    def _create(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        data: dict[str, Any] = (recorded.json or {}).get("input", {})
        kontext = recorded.path.startswith(f"/v1/models/{KONTEXT}/")
        ratio = data.get("aspect_ratio")
        count = data.get("num_outputs", 1)
        fmt = data.get("output_format", "png" if kontext else "webp")
        inputs = [self._file(data[k]) for k in ("input_image",) if k in data]
        invalid = [
            name
            for name, ok in (
                ("aspect_ratio", ratio is None or ratio in (KONTEXT_RATIOS if kontext else RATIOS)),
                ("num_outputs", isinstance(count, int) and 1 <= count <= 4),
                ("num_outputs", not (kontext and "num_outputs" in data)),
                ("output_format", fmt in EXTENSIONS and not (kontext and fmt == "webp")),
                ("input_image", all(i is not None for i in inputs)),
            )
            if not ok
        ]
        if invalid:
            detail = f"- input.{invalid[0]}: value is not allowed"
            return json_answer({"title": "Input validation failed", "detail": detail, "status": 422}, 422)
        first = image_size_of(inputs[0]) if inputs and inputs[0] else None
        if ratio is None and first is not None:
            width, height = first
        else:
            w, _, h = (ratio or "1:1").partition(":")
            scale = (1024 * 1024 / (int(w) * int(h))) ** 0.5
            width, height = round(int(w) * scale / 16) * 16, round(int(h) * scale / 16) * 16
        found = Prediction(
            id=f"p{next(self._ids)}",
            width=width,
            height=height,
            fmt=fmt,
            count=count,
            inputs=[i for i in inputs if i is not None],
        )
        if outcome is not None:
            found.kind = outcome.kind
            found.pending_polls = int(outcome.detail or 0) if outcome.kind == "slow" else 0
        self.predictions[found.id] = found
        waited = recorded.headers.get("prefer") == "wait"
        running = found.kind == "slow" or not waited or self.hold.is_set()
        return json_answer(self._object(found, running=running), 201)

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

    def _file(self, value: Any) -> bytes | None:
        """An input file's bytes: a data URI, or a file uploaded here; None for anything else."""
        text = str(value)
        if text.startswith(f"{self.url}/v1/files/"):
            return self.files.get(text.rsplit("/", 1)[-1])
        head, _, data = text.partition(",")
        if not (head.startswith("data:image/") and head.endswith(";base64")):
            return None
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error:
            return None
        return raw if image_size_of(raw) is not None else None
