"""Adapter for Replicate's predictions API on official models: create a prediction, waiting for
it (``Prefer: wait``), poll it if it is not done yet, download its output.

    POST {base_url}/models/{owner}/{name}/predictions     Authorization: Bearer <key>
      Prefer: wait                                         base_url default DEFAULT_BASE_URL
      {"input": {"prompt", "aspect_ratio", "num_outputs", "output_format", …}}
      → a prediction {"id", "status": "starting" | "processing" | "succeeded" | "failed" |
         "canceled", "output": ["https://replicate.delivery/…"] | "…", "error", "urls": {"get"}}
    GET {urls.get}                                         → the same prediction, later
    GET {output[i]}                                        (no key)
  Edits: the same prediction with ``input_image`` (``input_image_2``… for models taking more):
  a ``data:`` URI up to 1 MB; a larger image is first uploaded
    POST {base_url}/files   multipart ``content``          → {"id", "urls": {"get"}}
  and named by its ``urls.get``.

Read before writing it (public documentation, read not copied):
- Creating predictions, sync mode with ``Prefer: wait`` (the request held open, 60 s by default;
  the prediction returned as it stands when the time is up) and async mode:
  https://replicate.com/docs/topics/predictions/create-a-prediction
- The prediction object (status values, ``output``, ``error``, ``urls.get`` / ``cancel``):
  the JSON schema at https://raw.githubusercontent.com/api-evangelist/replicate/refs/heads/main/
  json-schema/replicate-prediction-schema.json and the client libraries' references
  (https://hexdocs.pm/replicate/Replicate.Predictions.html).
- Input files (a hosted URL, an upload, or a data URI, "only recommended if the file is less than
  1MB"): https://replicate.com/docs/topics/predictions/input-files
- FLUX Kontext [pro] inputs (``input_image``, ``aspect_ratio`` with ``match_input_image`` the
  default, ``output_format`` jpg/png, ``safety_tolerance`` 0–6 and at most 2 with an input image,
  ``seed``; one image per prediction), from the model page as mirrored by API resellers
  (docs.kkiai.com, v98store.com) of https://replicate.com/black-forest-labs/flux-kontext-pro.
Inferred, not read: FLUX [schnell]'s inputs (``aspect_ratio`` among the catalog's ratios,
``num_outputs`` 1–4, ``output_format`` webp/jpg/png, ``seed``) from the model's published schema
as third parties quote it; that a safety refusal is a failed prediction whose ``error`` names
NSFW content; that images come from ``replicate.delivery``. The Files API
(``POST /v1/files``, multipart ``content``, the file's ``urls.get`` usable as an input) is inferred
from the client libraries' ``files.create`` and the File object they document, not from an HTTP
reference page; that a model ignores no input it does not know (so ``num_outputs`` is sent only
for n > 1, and one-image models have ``n_max: 1`` in the catalog).

Translation:
- ``size`` → ``aspect_ratio``, the catalog's nearest; ``n`` → ``num_outputs`` (one prediction).
- ``output_format``: the catalog's ``native_formats`` (png, ``jpg``, webp for [schnell]; png, jpg
  for Kontext) are made by the model; others are re-encoded by the gateway from png.
- Edits: small images inline, larger ones uploaded to Replicate itself; the gateway never hands
  Replicate a URL of the client's. An edit at ``size=auto`` sends no ratio (Kontext then keeps the
  input's).
- ``failed`` with an NSFW error → 400 ``moderation_blocked`` (output), not charged; another
  ``failed`` or ``canceled`` → 502 (the router may fail over: nothing was produced).
- Resuming: a resumable call (a task: ``call.on_submitted`` set) creates its prediction without
  ``Prefer: wait``, so the prediction (``{"upstream", "prediction": {"id", "get"}}``) is recorded
  at once, before any wait; a call carrying it back in ``resume`` polls it instead of creating
  another. (A wait held open when the worker dies would lose the id, and the prediction is paid.)
- Polling (not done within the wait), budget and trust: ``polling.PollingMixin`` and BFL's rules
  (the key only to ``base_url``'s origin or ``polling_hosts``; output only from
  ``delivery_hosts``).
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from app.core.errors import UpstreamError
from app.domain.catalog import parse_size
from app.domain.jobs import ImageJob, ImageResult, InputImage
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

DEFAULT_BASE_URL = "https://api.replicate.com/v1"
DEFAULT_POLLING_HOSTS = ("api.replicate.com",)
DEFAULT_DELIVERY_HOSTS = ("replicate.delivery", "*.replicate.delivery")
FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
JOB_FAILED = "The upstream service failed to generate the image."
# Replicate: a data URI "is only recommended if the file is less than 1MB"; larger ones are uploaded.
DATA_URI_MAX_BYTES = 1024 * 1024


class ReplicateProvider(PollingMixin, NativeProvider):
    """An ``ImageProvider`` over Replicate's official-model predictions."""

    default_polling_hosts = DEFAULT_POLLING_HOSTS
    default_delivery_hosts = DEFAULT_DELIVERY_HOSTS

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult:
        return await self._run(job, upstream_model, request_input(job), call)

    async def edit(self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT) -> ImageResult:
        spec = job.caps.provider
        if spec is not None and upstream_model == spec.model:
            upstream_model = spec.edit_model_for(len(job.images))
        data = request_input(job)
        for index, image in enumerate(job.images if self._resumed(call) is None else ()):
            # FLUX Kontext's ``input_image``; models taking several name them ``input_image_2``…
            name = "input_image" if index == 0 else f"input_image_{index + 1}"
            data[name] = await self._file_input(image, job, call)
        return await self._run(job, upstream_model, data, call)

    async def _file_input(self, image: InputImage, job: ImageJob, call: UpstreamCall) -> str:
        """An input image as Replicate takes files: inline as a data URI when it is small, else
        uploaded to its Files API and named by the file's URL (which only Replicate reads: the
        gateway never hands it a URL of the client's)."""
        raw = await asyncio.to_thread(image.path.read_bytes)
        if len(raw) <= DATA_URI_MAX_BYTES:
            return f"data:{image.content_type};base64,{base64.b64encode(raw).decode()}"
        form = aiohttp.FormData(default_to_multipart=True)
        # A stream, not bytes: aiohttp warns that a body over 1 MB sent as bytes blocks the loop.
        form.add_field(
            "content", io.BytesIO(raw), filename=f"input.{image.format}", content_type=image.content_type
        )
        answer, _ = await self._send(
            "POST", f"{self._base_url}/files", request_id=job.request_id, call=call, form=form
        )
        urls = json_object(answer).get("urls")
        url = urls.get("get") if isinstance(urls, Mapping) else None
        if not isinstance(url, str) or not url:
            raise UpstreamError(INVALID_RESPONSE)
        return url  # handed back to Replicate only: the gateway never fetches it

    async def _run(self, job: ImageJob, model: str, data: dict[str, Any], call: UpstreamCall) -> ImageResult:
        resumed = self._resumed(call)
        ref = resumed.get("prediction") if resumed is not None else None
        output: list[str] | None = None
        if isinstance(ref, Mapping):
            poll_url = self._trusted(str(ref.get("get", "")))
        else:
            owner, _, name = model.partition("/")
            url = f"{self._base_url}/models/{quote(owner, safe='')}/{quote(name, safe='')}/predictions"
            # Sync mode (the answer waits up to 60 s for the prediction) unless the job is
            # resumable: a task records its prediction at once, before it is done, so a worker
            # that dies meanwhile leaves a prediction to poll, not one to pay for twice.
            wait = {} if call.resumable else {"prefer": "wait"}
            raw, _ = await self._send(
                "POST",
                url,
                request_id=job.request_id,
                call=call,
                json_body={"input": data},
                extra_headers=wait,
            )
            prediction = json_object(raw)
            urls = prediction.get("urls")
            get = urls.get("get") if isinstance(urls, Mapping) else None
            if isinstance(get, str) and get:
                await self._submitted(call, prediction={"id": prediction.get("id"), "get": get})
            output = _finished(prediction)
            if output is None:
                if not isinstance(get, str):
                    raise UpstreamError(INVALID_RESPONSE)
                poll_url = self._trusted(get)
        if output is None:

            async def step() -> list[str] | None:
                answer = await self._transient_ok(
                    partial(self._send, "GET", poll_url, request_id=job.request_id, call=call)
                )
                if answer is None:
                    return None
                try:
                    return _finished(json_object(answer[0]))
                except UpstreamError as exc:
                    if exc.message == INVALID_RESPONSE:
                        return None  # an answer that did not parse: poll again
                    raise

            output = await self._poll_until(step, self._poll_deadline())
        made = await asyncio.gather(*(self._download(self._deliverable(u), job, call) for u in output))
        return images_response([await deliver(image, job) for image in made])

    async def _download(self, url: URL, job: ImageJob, call: UpstreamCall) -> Produced:
        download = partial(
            self._send,
            "GET",
            str(url),
            request_id=job.request_id,
            call=call,
            auth=False,
            max_bytes=MAX_IMAGE_BYTES,
        )
        # The images are made (and billed): a download that fails in transit is tried again.
        answer = await self._poll_until(partial(self._transient_ok, download), self._poll_deadline())
        return produced(answer[0])

    def _deliverable(self, value: str) -> URL:
        url = absolute_url(value)
        if not (self._scheme_ok(url) and host_allowed(url, self._delivery_hosts)):
            raise UpstreamError(UNTRUSTED_URL)
        return url

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> UpstreamError:
        """Replicate's errors are problem details: ``{"title", "detail", "status"}``."""
        try:
            detail = json_object(raw).get("detail")
        except UpstreamError:
            detail = None
        return rejected(status, detail if isinstance(detail, str) else None, headers, secrets=self._secrets)


def _finished(prediction: Mapping[str, Any]) -> list[str] | None:
    """The output URLs of a succeeded prediction; None while it runs; raised when it ended badly."""
    status = prediction.get("status")
    if status in ("starting", "processing"):
        return None
    if status == "succeeded":
        output = prediction.get("output")
        urls = [output] if isinstance(output, str) else output
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise UpstreamError(INVALID_RESPONSE)
        return urls
    if status == "failed" and "nsfw" in str(prediction.get("error") or "").lower():
        raise moderation_blocked("output")
    if status in ("failed", "canceled"):
        raise UpstreamError(JOB_FAILED)
    raise UpstreamError(INVALID_RESPONSE)


def request_input(job: ImageJob) -> dict[str, Any]:
    """The prediction's ``input`` for ``job`` (all ``n`` images in one prediction). ``num_outputs``
    only when more than one is asked: models that make one image (Kontext) have no such input, and
    the catalog's ``n_max: 1`` keeps them at one."""
    spec = job.caps.provider
    native = spec.native_formats if spec is not None else tuple(FORMATS)
    fmt = job.output_format if job.output_format in native else "png"  # others re-encoded
    body: dict[str, Any] = {"prompt": job.prompt, "output_format": FORMATS[fmt]}
    if job.n > 1:
        body["num_outputs"] = job.n
    if spec is not None:
        # An edit at size=auto sends no ratio: Kontext's default keeps the input image's.
        if not (job.endpoint == "edits" and parse_size(job.size) is None):
            body["aspect_ratio"] = nearest_ratio(job.size, spec.aspect_ratios, spec.default_ratio)
        body.update(spec.mapped_params(job.forward))
    return body


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return ReplicateProvider(**polling_options(upstream, DEFAULT_BASE_URL))


register_kind(ProviderKind(name="replicate", build=_build, settings=PollingSettings))
