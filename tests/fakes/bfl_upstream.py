"""A fake Black Forest Labs FLUX API on 127.0.0.1, speaking the documented wire format:
``POST /v1/{model}`` (``x-key``) → ``{id, polling_url}``; ``GET /v1/get_result?id=`` → ``{id,
status, result}``; the result's ``sample`` is a URL on the same server (``/delivery/{id}.{fmt}``,
no key, as BFL's signed URLs need none).

Scripted outcomes at submission (``Outcome.kind``), beyond ``status`` / ``malformed``, decide how
the job's polls answer: ``slow`` (Pending for ``detail`` polls, then Ready), ``never`` (Pending for
ever), ``request_moderated``, ``content_moderated``, ``job_error`` (status Error),
``poll_malformed`` (the first poll answers garbage), ``foreign_polling`` (a polling_url on another
host), ``foreign_sample`` (Ready, with a sample URL
on a host nobody allowed). ``hold`` keeps every job Pending until it is set False.

Submissions are validated as BFL's OpenAPI schema does, with its 422 ``{"detail": [{"loc", "msg",
"type"}]}``: ``safety_tolerance`` 0–6 (FLUX.1) or 0–5 (FLUX.2), FLUX.2's width/height multiples of
16 from 64, at most ``input_image_8``. A FLUX.2 edit without width/height keeps the first input
image's size.
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image
from starlette.responses import Response

from tests.fakes.images import render_image
from tests.fakes.provider_fake import Outcome, ProviderFake, Recorded, json_answer

FOREIGN_SAMPLE = "http://169.254.169.254/latest/meta-data/iam"


@dataclass
class Job:
    id: str
    width: int
    height: int
    fmt: str
    kind: str = "ok"
    pending_polls: int = 0
    polls: int = 0


class FakeBFL(ProviderFake):
    name = "fake-bfl"

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self._ids = itertools.count(1)
        self.jobs: dict[str, Job] = {}
        self.hold = threading.Event()  # set: every job stays Pending

    def reset(self) -> None:
        self.jobs.clear()
        self.hold.clear()

    def authorized(self, recorded: Recorded) -> bool:
        if recorded.path.startswith("/delivery/"):
            return True
        return recorded.headers.get("x-key") == self.api_key

    def unauthorized(self) -> Response:
        return json_answer({"detail": "Not authenticated - Invalid Authentication"}, 403)

    @property
    def submissions(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path.startswith("/v1/")]

    @property
    def polls(self) -> int:
        return self.count("/v1/get_result")

    async def answer(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        if recorded.method == "POST" and recorded.path.startswith("/v1/"):
            return self._submit(recorded, outcome)
        if recorded.path == "/v1/get_result":
            return self._poll(recorded, outcome)
        if recorded.path.startswith("/delivery/"):
            job = self.jobs.get(recorded.path.rsplit("/", 1)[-1].split(".")[0])
            if job is None:
                return Response(b"", 404)
            return Response(render_image(job.width, job.height, job.fmt), 200, media_type=f"image/{job.fmt}")
        return json_answer({"detail": "Not Found"}, 404)

    def _submit(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        body: dict[str, Any] = recorded.json or {}
        model = recorded.path.rsplit("/", 1)[-1]
        problems = _invalid(model, body)
        if problems:
            detail = [{"loc": ["body", f], "msg": m, "type": "value_error"} for f, m in problems]
            return json_answer({"detail": detail}, 422)
        if "width" not in body and model.startswith("flux-2") and "input_image" in body:
            with Image.open(io.BytesIO(base64.b64decode(body["input_image"]))) as first:
                body = {**body, "width": first.width, "height": first.height}
        if "width" in body:
            width, height = int(body["width"]), int(body["height"])
        else:
            w, _, h = str(body.get("aspect_ratio", "1:1")).partition(":")
            ratio = int(w) / int(h)
            width, height = round(1024 * ratio**0.5 / 32) * 32, round(1024 / ratio**0.5 / 32) * 32
        job = Job(
            id=f"job-{next(self._ids)}", width=width, height=height, fmt=body.get("output_format", "jpeg")
        )
        if outcome is not None:
            job.kind = outcome.kind
            job.pending_polls = int(outcome.detail or 0) if outcome.kind == "slow" else 0
        self.jobs[job.id] = job
        if job.kind == "foreign_polling":
            return json_answer(
                {"id": job.id, "polling_url": f"https://collector.example/v1/get_result?id={job.id}"}
            )
        return json_answer({"id": job.id, "polling_url": f"{self.url}/v1/get_result?id={job.id}"})

    def _poll(self, recorded: Recorded, outcome: Outcome | None) -> Response:
        job = self.jobs.get(recorded.query.get("id", ""))
        if job is None:
            return json_answer({"id": recorded.query.get("id"), "status": "Task not found"})
        job.polls += 1
        pending = {"id": job.id, "status": "Pending", "result": None, "progress": 0.5}
        if self.hold.is_set() or job.kind == "never" or job.polls <= job.pending_polls:
            return json_answer(pending)
        if job.kind == "poll_malformed" and job.polls == 1:
            return Response(b"<html>busy</html>", 200, media_type="text/html")
        status = {
            "request_moderated": "Request Moderated",
            "content_moderated": "Content Moderated",
            "job_error": "Error",
        }.get(job.kind)
        if status is not None:
            return json_answer(
                {"id": job.id, "status": status, "result": None, "details": {"Moderation Reasons": []}}
            )
        sample = FOREIGN_SAMPLE if job.kind == "foreign_sample" else f"{self.url}/delivery/{job.id}.{job.fmt}"
        result = {"sample": sample, "prompt": "…", "seed": 1, "start_time": 0, "end_time": 1, "duration": 1}
        return json_answer({"id": job.id, "status": "Ready", "result": result})


def _invalid(model: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, message)`` for each value BFL's schema refuses."""
    flux2 = model.startswith("flux-2")
    problems: list[tuple[str, str]] = []
    tolerance = body.get("safety_tolerance")
    top = 5 if flux2 else 6
    if tolerance is not None and (not isinstance(tolerance, int) or not 0 <= tolerance <= top):
        problems.append(("safety_tolerance", f"Input should be less than or equal to {top}"))
    if flux2:
        for edge in ("width", "height"):
            value = body.get(edge)
            if value is not None and (value < 64 or value % 16):
                problems.append((edge, "Input should be a multiple of 16, at least 64"))
    limit = 8 if flux2 else 4
    extra = [k for k in body if k.startswith("input_image_") and int(k.rsplit("_", 1)[1]) > limit]
    problems.extend((k, "Extra inputs are not permitted") for k in extra)
    return problems
