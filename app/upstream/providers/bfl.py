"""Adapter for Black Forest Labs' FLUX API: submit a job, poll it, download its result.

    POST {base_url}/v1/{model}            x-key: <key>      base_url default DEFAULT_BASE_URL
      {"prompt", "width", "height" | "aspect_ratio", "output_format", "input_image"?, …}
      → {"id": "…", "polling_url": "https://api.…bfl.ai/v1/get_result?id=…"}
    GET {polling_url}                     x-key: <key>
      → {"id", "status": "Pending" | "Ready" | "Request Moderated" | "Content Moderated" |
         "Error" | "Failed" | "Task not found", "result": {"sample": "https://delivery-….bfl.ai/…"}}
    GET {result.sample}                   (no key: a signed URL, valid for 10 minutes)

Read before writing it (public documentation, read not copied):
- Generating images, the asynchronous design, global and regional endpoints, "always use the
  polling_url returned": https://docs.bfl.ai/quick_start/generating_images
- FLUX1.1 [pro] (width/height, polling loop, result.sample signed URL valid 10 minutes):
  https://docs.bfl.ai/flux_models/flux_1_1_pro
- Kontext image editing (input_image base64, aspect_ratio 3:7 to 7:3, output_format jpeg/png,
  safety_tolerance, seed): https://docs.bfl.ai/kontext/kontext_image_editing
- FLUX.2 [pro] / [flex] (``POST /v1/flux-2-pro``, ``/v1/flux-2-flex``; width/height from 64,
  up to 4 MP; ``input_image`` … ``input_image_8``; ``safety_tolerance`` 0–5; [flex] ``steps``
  1–50 and ``guidance`` 1.5–10): https://docs.bfl.ai/flux_2/flux2_text_to_image and the API
  reference pages "Generate or edit an image with FLUX.2 [pro]" / "[flex]"
  (https://docs.bfl.ml/api-reference/models/generate-or-edit-an-image-with-flux2-%5Bpro%5D.md).
  Inferred, not read: width/height in multiples of 16 (the fake enforces it; the reference only
  states the minimum), that an edit without width/height keeps the first input's size, and
  [pro]'s 8-image limit (read for [flex]).
- Errors and get_result response types (Ready, Pending, Request Moderated, Content Moderated,
  Task not found, Error; HTTP 402 / 403 / 422 / 429 / 5xx): https://docs.bfl.ai/api_integration/errors

Translation:
- ``size`` → ``width``/``height`` (models with catalog ``dimensions``: the asked ratio, scaled into
  bounds and rounded to the multiple) or ``aspect_ratio`` (nearest of the catalog's list; an edit at
  ``size=auto`` sends none, so Kontext keeps the input's ratio). The answer's ``size`` is read
  from the downloaded image.
- ``n`` → ``n`` jobs, submitted one after the other, polled together.
- Edits (Kontext and FLUX.2 models): the first image as ``input_image`` (base64), further ones
  as ``input_image_2``… up to the catalog's ``max_images``. No masks (refused by the catalog).
  A FLUX.2 edit at ``size=auto`` sends no width/height: the output keeps the first input's size.
- Errors: BFL's 422 (``{"detail": [{"msg"}]}``, a value its schema refuses) is the client's 400
  ``invalid_request_error`` (``native.rejected``); the catalog's ``params`` rules catch the known
  fields before any call, so a 422 means a rule the catalog does not know yet.
- ``output_format``: FLUX makes jpeg and png; webp, and jpeg at an asked ``output_compression``,
  are re-encoded by the gateway.

Polling (``polling.PollingMixin``, shared with other submit/poll providers): every
``poll_interval_s``, growing ×1.5 up to ``poll_max_interval_s``, until the job is ``Ready`` or
``poll_budget_s`` has passed. A poll or download that fails in transit (connection,
429, 5xx) or a poll answer that does not parse is tried again within the budget: once a job is
submitted, going back to the router (which would submit it again) is never the answer. The budget
exhausted → 504 ``upstream_timeout`` (``UpstreamJobTimeout``, not retried). ``Request Moderated`` /
``Content Moderated`` → 400 ``moderation_blocked`` (input / output), not charged; ``Error`` /
``Failed`` / ``Task not found`` → 502, which the router may retry with a new submission (the failed
job produced nothing).

Trust: the key goes to ``polling_url``, so it must be on ``base_url``'s own origin or a host of
``polling_hosts``; the image is fetched only from a host of ``delivery_hosts`` (patterns like
``delivery-eu1.bfl.ai``, ``*.bfl.ai``, ``127.0.0.1:8080``), over https unless ``base_url`` itself is
plain http (a local test setup). An upstream is never trusted to name an arbitrary URL: the gateway
would fetch it from inside the operator's network. Neither URL is ever logged or relayed.

Resuming: the submitted jobs (``{"upstream", "jobs": [{"id", "polling_url"}]}``) are handed to
``call.on_submitted`` (a task records them); a call carrying ``resume`` polls those instead of
submitting, so a task whose worker died between submit and ``Ready`` finishes without a second
submission.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import quote

import orjson
from yarl import URL

from app.core.errors import GatewayError, UpstreamError
from app.domain.catalog import parse_size
from app.domain.jobs import ImageJob, ImageResult
from app.upstream.base import ImageProvider
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.config import ProviderKind, UpstreamSettings, register_kind
from app.upstream.errors import INVALID_RESPONSE
from app.upstream.providers.native import (
    MAX_IMAGE_BYTES,
    NativeProvider,
    Produced,
    deliver,
    images_response,
    in_parallel,
    json_object,
    moderation_blocked,
    nearest_ratio,
    produced,
    rejected,
)
from app.upstream.providers.polling import (
    UNTRUSTED_URL,
    PollingMixin,
    PollingSettings,
    absolute_url,
    host_allowed,
    polling_options,
)

DEFAULT_BASE_URL = "https://api.bfl.ai"
DEFAULT_POLLING_HOSTS = ("api.bfl.ai", "*.bfl.ai")
DEFAULT_DELIVERY_HOSTS = ("*.bfl.ai",)
NATIVE_FORMATS = ("jpeg", "png")
FAILED = frozenset({"Error", "Failed", "Task not found"})
JOB_FAILED = "The upstream service failed to generate the image."


class FluxProvider(PollingMixin, NativeProvider):
    """An ``ImageProvider`` over the FLUX API (one per configured upstream)."""

    default_polling_hosts = DEFAULT_POLLING_HOSTS
    default_delivery_hosts = DEFAULT_DELIVERY_HOSTS

    def _auth(self) -> dict[str, str]:
        return {"x-key": self._api_key} if self._api_key else {}

    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult:
        return await self._run(job, upstream_model, call, inputs={})

    async def edit(self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT) -> ImageResult:
        inputs = await asyncio.to_thread(_read_inputs, job)
        return await self._run(job, upstream_model, call, inputs=inputs)

    async def _run(
        self, job: ImageJob, model: str, call: UpstreamCall, *, inputs: dict[str, str]
    ) -> ImageResult:
        refs = self._resumable(call)
        if refs is None:
            body = {**request_body(job), **inputs}
            url = f"{self._base_url}/v1/{quote(model, safe='')}"
            refs = [await self._submit(url, body, job, call) for _ in range(job.n)]
            await self._submitted(call, jobs=refs)
        deadline = self._poll_deadline()

        async def finish(index: int) -> list[Produced]:
            image = await self._await_image(refs[index], job, call, deadline)
            return [await deliver(image, job)]

        return images_response(await in_parallel(len(refs), finish))

    def _resumable(self, call: UpstreamCall) -> list[dict[str, str]] | None:
        """The jobs an earlier run recorded for this upstream, if any (else None: submit)."""
        resume = self._resumed(call)
        jobs = resume.get("jobs") if resume is not None else None
        if not isinstance(jobs, list) or not jobs:
            return None
        return [
            {"id": str(j.get("id", "")), "polling_url": str(j.get("polling_url", ""))}
            for j in jobs
            if isinstance(j, Mapping)
        ]

    async def _submit(
        self, url: str, body: dict[str, Any], job: ImageJob, call: UpstreamCall
    ) -> dict[str, str]:
        raw, _ = await self._send("POST", url, request_id=job.request_id, call=call, json_body=body)
        answer = json_object(raw)
        job_id, polling_url = answer.get("id"), answer.get("polling_url")
        if not isinstance(job_id, str) or not job_id:
            raise UpstreamError(INVALID_RESPONSE)
        if not isinstance(polling_url, str) or not polling_url:
            # Older deployments answered only the id: the result is read from the base URL.
            polling_url = f"{self._base_url}/v1/get_result?id={quote(job_id, safe='')}"
        return {"id": job_id, "polling_url": polling_url}

    async def _await_image(
        self, ref: Mapping[str, str], job: ImageJob, call: UpstreamCall, deadline: float
    ) -> Produced:
        """Poll one job until it is Ready and download its image (rules in the module doc)."""
        polling_url = self._trusted(ref.get("polling_url", ""))

        async def step() -> Produced | None:
            answer = await self._transient_ok(
                partial(self._send, "GET", polling_url, request_id=job.request_id, call=call)
            )
            status = _status(answer[0]) if answer is not None else None
            if status == "Ready":
                sample = self._trusted_sample(json_object(answer[0]))
                image: Produced | None = await self._transient_ok(partial(self._download, sample, job, call))
                return image
            if status == "Request Moderated":
                raise moderation_blocked("input")
            if status == "Content Moderated":
                raise moderation_blocked("output")
            if status in FAILED:
                raise UpstreamError(JOB_FAILED)
            return None  # Pending, or an answer that did not parse: still the job to wait for

        return await self._poll_until(step, deadline)

    async def _download(self, url: URL, job: ImageJob, call: UpstreamCall) -> Produced:
        raw, _ = await self._send(
            "GET", str(url), request_id=job.request_id, call=call, auth=False, max_bytes=MAX_IMAGE_BYTES
        )
        return produced(raw)

    def _trusted_sample(self, answer: Mapping[str, Any]) -> URL:
        result = answer.get("result")
        sample = result.get("sample") if isinstance(result, Mapping) else None
        if not isinstance(sample, str) or not sample:
            raise UpstreamError(INVALID_RESPONSE)
        url = absolute_url(sample)
        if not (self._scheme_ok(url) and host_allowed(url, self._delivery_hosts)):
            raise UpstreamError(UNTRUSTED_URL)
        return url

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
        """BFL's errors: ``{"detail": "text"}`` or, for 422, ``{"detail": [{"msg": …}, …]}``."""
        message = None
        try:
            detail = orjson.loads(raw).get("detail")
        except (orjson.JSONDecodeError, AttributeError):
            detail = None
        if isinstance(detail, str):
            message = detail
        elif isinstance(detail, list):
            message = (
                "; ".join(
                    str(d.get("msg"))
                    for d in detail
                    if isinstance(d, Mapping) and isinstance(d.get("msg"), str)
                )
                or None
            )
        code = "invalid_value" if status in (400, 422) else None
        return rejected(status, message, headers, secrets=self._secrets, code=code)


def _status(raw: bytes) -> str | None:
    """A poll answer's ``status``; None when the answer is not a JSON object with one."""
    try:
        status = json_object(raw).get("status")
    except UpstreamError:
        return None
    return status if isinstance(status, str) else None


def request_body(job: ImageJob) -> dict[str, Any]:
    """The submission's JSON for one image of ``job`` (without the edit's input images)."""
    spec = job.caps.provider
    body: dict[str, Any] = {
        "prompt": job.prompt,
        "output_format": job.output_format if job.output_format in NATIVE_FORMATS else "png",
    }
    if spec is None:
        return body
    dims = parse_size(job.size)
    if spec.dimensions is not None:
        # An edit at size=auto sends none: FLUX.2 then keeps the first input image's size.
        if dims is not None or job.endpoint != "edits":
            width, height = spec.dimensions.fit(*(dims or (1024, 1024)))
            body.update(width=width, height=height)
    elif spec.aspect_ratios and not (dims is None and job.endpoint == "edits"):
        body["aspect_ratio"] = nearest_ratio(job.size, spec.aspect_ratios, spec.default_ratio)
    body.update(spec.mapped_params(job.forward))
    return body


def _read_inputs(job: ImageJob) -> dict[str, str]:
    """``input_image``, ``input_image_2``, …: the edit's images, base64."""
    fields: dict[str, str] = {}
    for index, image in enumerate(job.images):
        name = "input_image" if index == 0 else f"input_image_{index + 1}"
        fields[name] = base64.b64encode(image.path.read_bytes()).decode()
    return fields


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return FluxProvider(**polling_options(upstream, DEFAULT_BASE_URL))


register_kind(ProviderKind(name="bfl", build=_build, settings=PollingSettings))
