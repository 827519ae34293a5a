"""A fake fal.ai queue on 127.0.0.1, speaking the documented wire format: ``POST /{model_id}``
(``Authorization: Key …``) → ``{request_id, status_url, response_url, cancel_url}``;
``GET /{model_id}/requests/{id}/status`` → ``{status: IN_QUEUE | IN_PROGRESS | COMPLETED}``;
``GET /{model_id}/requests/{id}`` → ``{images: [{url, width, height, content_type}],
has_nsfw_concepts, seed, prompt}``; each image's URL is on the same server (``/media/{id}-{i}``,
no key, as fal's CDN needs none).

Submissions are validated as the models' schemas do, with a 422 ``{"detail": [{loc, msg, type}]}``:
``num_images`` 1–4, ``image_size`` width/height multiples of 8, ``aspect_ratio`` among Kontext's.
Edits (``…/kontext`` with ``image_url``, ``…/kontext/multi`` with ``image_urls``): each input
must be a ``data:image/…;base64,`` URI of a decodable image (this fake fetches no URL, so a
gateway that sent one fails here); the decoded inputs are kept in ``Request.inputs``. Without
``image_size`` or ``aspect_ratio`` the output keeps the first input's size. Scripted outcomes at submission
(``Outcome.kind``), beyond ``status`` / ``malformed``: ``slow`` (IN_QUEUE then IN_PROGRESS for
``detail`` polls), ``nsfw`` (the first ``detail`` images flagged), ``result_error`` (the result
answers ``status``/``body`` of the outcome), ``foreign_media`` (image URLs on a host nobody allowed).
``hold`` (an Event) keeps every request ``IN_PROGRESS`` while it is set.
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

FOREIGN_MEDIA = "http://169.254.169.254/latest/meta-data/iam"
KONTEXT_RATIOS = {"21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"}


@dataclass
class Request:
    id: str
    model: str
    width: int
    height: int
    fmt: str
    count: int
    kind: str = "ok"
    pending_polls: int = 0
    polls: int = 0
    detail: Any = None
    error: Outcome | None = None
    flagged: list[bool] = field(default_factory=list)
    inputs: list[bytes] = field(default_factory=list)


class FakeFal(ProviderFake):
    name = "fake-fal"

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self._ids = itertools.count(1)
        self.jobs: dict[str, Request] = {}
        self.hold = threading.Event()  # set: every request stays IN_PROGRESS

    def reset(self) -> None:
        self.jobs.clear()
        self.hold.clear()

    def authorized(self, recorded: Recorded) -> bool:
        if recorded.path.startswith("/media/"):
            return True
        return recorded.headers.get("authorization") == f"Key {self.api_key}"

    def unauthorized(self) -> Response:
        return json_answer({"detail": "Unauthorized"}, 401)

    @property
    def submissions(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST"]

    async def answer(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        path = recorded.path
        if recorded.method == "POST":
            return self._submit(recorded, outcome)
        if path.startswith("/media/"):
            job_id, _, index = path.rsplit("/", 1)[-1].rpartition("-")
            job = self.jobs.get(job_id)
            if job is None:
                return Response(b"", 404)
            return Response(render_image(job.width, job.height, job.fmt), 200, media_type=f"image/{job.fmt}")
        if "/requests/" in path:
            rest = path.split("/requests/", 1)[1]
            job = self.jobs.get(rest.split("/", 1)[0])
            if job is None:
                return json_answer({"detail": "Request not found"}, 404)
            return self._status(job) if rest.endswith("/status") else self._result(job)
        return json_answer({"detail": "Not Found"}, 404)

    def _submit(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        body: dict[str, Any] = recorded.json or {}
        problems = []
        count = body.get("num_images", 1)
        if not isinstance(count, int) or not 1 <= count <= 4:
            problems.append(("num_images", "Input should be less than or equal to 4"))
        inputs, bad_input = _inputs(recorded.path, body)
        if bad_input:
            problems.append(bad_input)
        size = body.get("image_size")
        ratio = body.get("aspect_ratio")
        if size is None and ratio is not None:
            if ratio not in KONTEXT_RATIOS:
                problems.append(("aspect_ratio", "Input should be one of the listed ratios"))
            else:
                w, _, h = ratio.partition(":")
                scale = (1024 * 1024 / (int(w) * int(h))) ** 0.5
                size = {"width": round(int(w) * scale / 16) * 16, "height": round(int(h) * scale / 16) * 16}
        if size is None:
            first = image_size_of(inputs[0]) if inputs else None
            size = {"width": first[0], "height": first[1]} if first else {"width": 1024, "height": 1024}
        for edge in ("width", "height"):
            if not isinstance(size.get(edge), int) or size[edge] % 8:
                problems.append((f"image_size.{edge}", "Input should be a multiple of 8"))
        if problems:
            detail = [{"loc": ["body", f], "msg": m, "type": "value_error"} for f, m in problems]
            return json_answer({"detail": detail}, 422)
        model = recorded.path.strip("/")
        job = Request(
            id=f"req-{next(self._ids)}",
            model=model,
            width=size["width"],
            height=size["height"],
            fmt=body.get("output_format", "jpeg"),
            count=count,
            inputs=inputs,
        )
        if outcome is not None:
            job.kind, job.detail = outcome.kind, outcome.detail
            job.pending_polls = int(outcome.detail or 0) if outcome.kind == "slow" else 0
            job.error = outcome if outcome.kind == "result_error" else None
        self.jobs[job.id] = job
        base = f"{self.url}/{model}/requests/{job.id}"
        return json_answer(
            {
                "request_id": job.id,
                "status_url": f"{base}/status",
                "response_url": base,
                "cancel_url": f"{base}/cancel",
            }
        )

    def _status(self, job: Request) -> Response:
        job.polls += 1
        if self.hold.is_set():
            return json_answer({"status": "IN_PROGRESS", "request_id": job.id})
        if job.polls <= job.pending_polls:
            state = "IN_QUEUE" if job.polls == 1 else "IN_PROGRESS"
            return json_answer({"status": state, "request_id": job.id, "queue_position": 0})
        return json_answer({"status": "COMPLETED", "request_id": job.id, "logs": None})

    def _result(self, job: Request) -> Response:
        if job.error is not None:
            return Response(job.error.body or b"{}", job.error.status, media_type="application/json")
        flagged = int(job.detail or 0) if job.kind == "nsfw" else 0
        images = [
            {
                "url": FOREIGN_MEDIA if job.kind == "foreign_media" else f"{self.url}/media/{job.id}-{i}",
                "width": job.width,
                "height": job.height,
                "content_type": f"image/{job.fmt}",
            }
            for i in range(job.count)
        ]
        nsfw = [i < flagged for i in range(job.count)]
        return json_answer({"images": images, "has_nsfw_concepts": nsfw, "seed": 1, "prompt": "…"})


def _inputs(path: str, body: dict[str, Any]) -> tuple[list[bytes], tuple[str, str] | None]:
    """An edit's decoded input images, or the 422 problem its inputs make."""
    if path.rstrip("/").endswith("/kontext/multi"):
        listed = body.get("image_urls")
        if not isinstance(listed, list) or not listed:
            return [], ("image_urls", "Field required")
        field_name = "image_urls"
    elif path.rstrip("/").endswith("/kontext"):
        listed = [body.get("image_url")]
        if not isinstance(listed[0], str):
            return [], ("image_url", "Field required")
        field_name = "image_url"
    else:
        return [], None
    decoded = []
    for value in listed:
        head, _, data = str(value).partition(",")
        if not (head.startswith("data:image/") and head.endswith(";base64")):
            return [], (field_name, "This fake takes data URIs only")
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error:
            return [], (field_name, "Invalid base64")
        if image_size_of(raw) is None:
            return [], (field_name, "Not an image")
        decoded.append(raw)
    return decoded, None
