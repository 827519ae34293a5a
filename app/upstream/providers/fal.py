"""Adapter for fal.ai's queue API: submit a request, poll its status, read its result, download
the images.

    POST {base_url}/{model_id}                 Authorization: Key <key>   base_url default
      {"prompt", "image_size": {"width", "height"}, "num_images", "output_format", …}  DEFAULT_BASE_URL
      → {"request_id", "status_url", "response_url", "cancel_url"}
    GET {status_url}                           → {"status": "IN_QUEUE" | "IN_PROGRESS" | "COMPLETED"}
    GET {response_url}                         → {"images": [{"url", "width", "height",
                                                  "content_type"}], "has_nsfw_concepts": [bool], …}
                                                 or the model's error status and {"detail": …}
    GET {images[i].url}                        (no key: a public CDN URL on fal.media)
  Edits: the same submission to the catalog's ``edit_model`` with ``image_url`` (one image) or to
  its ``multi_edit_model`` with ``image_urls`` (several), each a ``data:image/…;base64,`` URI.

Read before writing it (public documentation, read not copied):
- The queue API (submit to queue.fal.run, request lifecycle IN_QUEUE → IN_PROGRESS → COMPLETED,
  status and result URLs, ``Authorization: Key``): https://docs.fal.ai/documentation/model-apis/
  inference/queue and its OpenAPI description,
  https://fal.ai/docs/api-reference/inference-api/openapi/queue.json
- The status endpoint (``GET …/requests/{id}/status``): https://fal.ai/docs/inference-api/queue/status.md
- File inputs ("models on fal accept file inputs as URLs … Models also accept base64-encoded data
  URIs"; the CDN upload as the alternative): https://docs.fal.ai/documentation/model-apis/fal-cdn
- FLUX.1 Kontext [pro] (``fal-ai/flux-pro/kontext`` with ``image_url``; ``…/kontext/multi`` with
  ``image_urls``; ``…/kontext/text-to-image``; ``aspect_ratio`` 21:9 … 9:21, ``num_images`` 1–4,
  ``output_format`` jpeg/png, ``guidance_scale`` 1–20, ``seed``):
  https://fal.ai/docs/model-api-reference/image-generation-api/flux-pro-kontext-multi, the
  ``…-kontext-max`` and ``…-kontext-text-to-image`` pages.
Inferred, not read: the FLUX [dev] and Stable Diffusion 3.5 Large input fields (``image_size`` as
``{width, height}``, ``num_images`` 1–4, ``output_format`` jpeg/png, ``seed``,
``enable_safety_checker``) and output (``images[].url``, ``has_nsfw_concepts``) come from the
models' published schemas as summarised by third-party guides (e.g. apidog's FLUX 2 API guide);
that a failed request answers its ``response_url`` with the model's error status (422 with
``{"detail": […]}`` for a validation error) is inferred from the queue page; pixel sizes in
multiples of 8 are an assumption the catalog can tighten. For Kontext edits: that a data URI is
accepted by every Kontext endpoint (the CDN page says "some models"; the Kontext input is
described as a URL "or a base64-encoded data URL" by third-party mirrors of its page), the
4-image limit of the multi endpoint (none is stated), and that without ``aspect_ratio`` the output
keeps the first input's ratio.

Translation:
- ``size`` → ``image_size: {width, height}`` from the catalog's ``dimensions`` (the ratio kept).
- ``n`` → ``num_images`` in one request (one submission, one poll loop).
- ``output_format``: jpeg and png are made by fal; webp is re-encoded by the gateway.
- Edits: the images go inline as data URIs: the gateway never hands fal a URL to fetch (a
  client's URL would make fal, not the gateway, the fetcher, and is never accepted anyway), and
  the images are not left on fal's public CDN. An edit at ``size=auto`` sends no size or ratio.
- Moderation: an image whose ``has_nsfw_concepts`` entry is true is fal's safety checker's
  refusal (the image is blanked): it is dropped and not charged; all of them → 400
  ``moderation_blocked`` (output).
- Errors: a submission's or result's 4xx/5xx goes through ``native.rejected`` (429/5xx fail over
  before the submission is accepted; 422 → 400 ``invalid_request_error``).
Resuming: the accepted request (``{"upstream", "request": {"request_id", "status_url",
"response_url"}}``) is handed to ``call.on_submitted`` before the first poll (a task stores it); a
job carrying it back in ``resume`` polls that request instead of submitting again.
Polling, budget and trust are ``polling.PollingMixin``'s and BFL's rules: the key only goes to
URLs on ``base_url``'s origin or ``polling_hosts``; images only come from ``delivery_hosts``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from functools import partial
from typing import Any

from yarl import URL

from app.core.errors import UpstreamError
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

DEFAULT_BASE_URL = "https://queue.fal.run"
DEFAULT_POLLING_HOSTS = ("queue.fal.run",)
DEFAULT_DELIVERY_HOSTS = ("fal.media", "*.fal.media")
NATIVE_FORMATS = ("jpeg", "png")


class FalProvider(PollingMixin, NativeProvider):
    """An ``ImageProvider`` over fal.ai's queue (one per configured upstream)."""

    default_polling_hosts = DEFAULT_POLLING_HOSTS
    default_delivery_hosts = DEFAULT_DELIVERY_HOSTS

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Key {self._api_key}"} if self._api_key else {}

    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult:
        return await self._run(job, upstream_model, request_body(job), call)

    async def edit(self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT) -> ImageResult:
        spec = job.caps.provider
        if spec is not None and upstream_model == spec.model:
            upstream_model = spec.edit_model_for(len(job.images))
        body = request_body(job)
        if self._resumed(call) is None:  # a resumed request has its inputs already
            uris = await asyncio.to_thread(data_uris, job)
            # Kontext takes one ``image_url``; its multi-image endpoint (and fal's newer edit
            # models) a list ``image_urls``.
            body.update({"image_url": uris[0]} if len(uris) == 1 else {"image_urls": uris})
        return await self._run(job, upstream_model, body, call)

    async def _run(self, job: ImageJob, model: str, body: dict[str, Any], call: UpstreamCall) -> ImageResult:
        resumed = self._resumed(call)
        ref = resumed.get("request") if resumed is not None else None
        if not isinstance(ref, Mapping):
            # The model id is a path ("fal-ai/flux/dev"): its slashes are the route, not escaped.
            url = f"{self._base_url}/{model.strip('/')}"
            raw, _ = await self._send("POST", url, request_id=job.request_id, call=call, json_body=body)
            submitted = json_object(raw)
            ref = {k: submitted.get(k) for k in ("request_id", "status_url", "response_url")}
            if not isinstance(ref["status_url"], str) or not isinstance(ref["response_url"], str):
                raise UpstreamError(INVALID_RESPONSE)
            await self._submitted(call, request=ref)
        status_url = self._trusted(str(ref.get("status_url", "")))
        response_url = self._trusted(str(ref.get("response_url", "")))

        async def step() -> bytes | None:
            answer = await self._transient_ok(
                partial(self._send, "GET", status_url, request_id=job.request_id, call=call)
            )
            if answer is None or _status(answer[0]) != "COMPLETED":
                return None  # queued, running, or an answer that did not parse
            result: tuple[bytes, Any] | None = await self._transient_ok(
                partial(self._send, "GET", response_url, request_id=job.request_id, call=call)
            )
            return result[0] if result is not None else None

        result = json_object(await self._poll_until(step, self._poll_deadline()))
        images = [await deliver(image, job) for image in await self._images(result, job, call)]
        return images_response(images)

    async def _images(self, result: Mapping[str, Any], job: ImageJob, call: UpstreamCall) -> list[Produced]:
        listed = result.get("images")
        if not isinstance(listed, list) or not listed:
            raise UpstreamError(INVALID_RESPONSE)
        flags = result.get("has_nsfw_concepts")
        nsfw = flags if isinstance(flags, list) else []
        kept = [item for i, item in enumerate(listed) if not (i < len(nsfw) and nsfw[i] is True)]
        if not kept:
            raise moderation_blocked("output")
        urls = []
        for item in kept:
            if not isinstance(item, Mapping) or not isinstance(item.get("url"), str):
                raise UpstreamError(INVALID_RESPONSE)
            url = absolute_url(item["url"])
            if not (self._scheme_ok(url) and host_allowed(url, self._delivery_hosts)):
                raise UpstreamError(UNTRUSTED_URL)
            urls.append(url)
        return await asyncio.gather(*(self._download(url, job, call) for url in urls))

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

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> UpstreamError:
        """fal's errors: ``{"detail": "text"}`` or a validation list ``{"detail": [{"msg"}]}``."""
        try:
            detail = json_object(raw).get("detail")
        except UpstreamError:
            detail = None
        if isinstance(detail, list):
            detail = "; ".join(str(d.get("msg")) for d in detail if isinstance(d, Mapping)) or None
        message = detail if isinstance(detail, str) else None
        return rejected(status, message, headers, secrets=self._secrets)


def _status(raw: bytes) -> str | None:
    try:
        status = json_object(raw).get("status")
    except UpstreamError:
        return None
    return status if isinstance(status, str) else None


def request_body(job: ImageJob) -> dict[str, Any]:
    """The submission's JSON for ``job`` (all ``n`` images in one request; an edit's input images
    are added by ``edit``)."""
    spec = job.caps.provider
    body: dict[str, Any] = {
        "prompt": job.prompt,
        "num_images": job.n,
        "output_format": job.output_format if job.output_format in NATIVE_FORMATS else "png",
        "enable_safety_checker": True,
    }
    if spec is None:
        return body
    dims = parse_size(job.size)
    # An edit at size=auto sends no size: the model keeps the input image's.
    if dims is not None or job.endpoint != "edits":
        if spec.dimensions is not None:
            width, height = spec.dimensions.fit(*(dims or (1024, 1024)))
            body["image_size"] = {"width": width, "height": height}
        elif spec.aspect_ratios:
            body["aspect_ratio"] = nearest_ratio(job.size, spec.aspect_ratios, spec.default_ratio)
    body.update(spec.mapped_params(job.forward))
    return body


def data_uris(job: ImageJob) -> list[str]:
    """The edit's input images as data URIs, the form fal's models take inline: the gateway never
    hands fal a URL to fetch, and keeps the images off any CDN."""
    return [
        f"data:{image.content_type};base64,{base64.b64encode(image.path.read_bytes()).decode()}"
        for image in job.images
    ]


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return FalProvider(**polling_options(upstream, DEFAULT_BASE_URL))


register_kind(ProviderKind(name="fal", build=_build, settings=PollingSettings))
