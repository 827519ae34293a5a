"""Adapter for Replicate's predictions API on official models: create a prediction, waiting for
it (``Prefer: wait``), poll it if it is not done yet, download its output.

    POST {base_url}/models/{owner}/{name}/predictions     Authorization: Bearer <key>
      Prefer: wait                                         base_url default DEFAULT_BASE_URL
      {"input": {"prompt", "aspect_ratio", "num_outputs", "output_format", …}}
      → a prediction {"id", "status": "starting" | "processing" | "succeeded" | "failed" |
         "canceled", "output": ["https://replicate.delivery/…"] | "…", "error", "urls": {"get"}}
    GET {urls.get}                                         → the same prediction, later
    GET {output[i]}                                        (no key)

Read before writing it (public documentation, read not copied):
- Creating predictions, sync mode with ``Prefer: wait`` (the request held open, 60 s by default;
  the prediction returned as it stands when the time is up) and async mode:
  https://replicate.com/docs/topics/predictions/create-a-prediction
- The prediction object (status values, ``output``, ``error``, ``urls.get`` / ``cancel``):
  the JSON schema at https://raw.githubusercontent.com/api-evangelist/replicate/refs/heads/main/
  json-schema/replicate-prediction-schema.json and the client libraries' references
  (https://hexdocs.pm/replicate/Replicate.Predictions.html).
Inferred, not read: FLUX [schnell]'s inputs (``aspect_ratio`` among the catalog's ratios,
``num_outputs`` 1–4, ``output_format`` webp/jpg/png, ``seed``) from the model's published schema
as third parties quote it; that a safety refusal is a failed prediction whose ``error`` names
NSFW content; that images come from ``replicate.delivery``.

Translation:
- ``size`` → ``aspect_ratio``, the catalog's nearest; ``n`` → ``num_outputs`` (one prediction).
- ``output_format``: png, jpeg (``jpg``) and webp are all made by the model.
- ``failed`` with an NSFW error → 400 ``moderation_blocked`` (output), not charged; another
  ``failed`` or ``canceled`` → 502 (the router may fail over: nothing was produced).
- Polling (not done within the wait), budget and trust: ``polling.PollingMixin`` and BFL's rules
  (the key only to ``base_url``'s origin or ``polling_hosts``; output only from
  ``delivery_hosts``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import quote

from yarl import URL

from app.domain.jobs import ImageJob, ImageResult
from app.errors import UpstreamError
from app.upstream.base import ImageProvider
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
    absolute_url,
    host_allowed,
    polling_options,
)

DEFAULT_BASE_URL = "https://api.replicate.com/v1"
DEFAULT_POLLING_HOSTS = ("api.replicate.com",)
DEFAULT_DELIVERY_HOSTS = ("replicate.delivery", "*.replicate.delivery")
FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
JOB_FAILED = "The upstream service failed to generate the image."


class ReplicateProvider(PollingMixin, NativeProvider):
    """An ``ImageProvider`` over Replicate's official-model predictions."""

    default_polling_hosts = DEFAULT_POLLING_HOSTS
    default_delivery_hosts = DEFAULT_DELIVERY_HOSTS

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def generate(self, job: ImageJob, *, upstream_model: str) -> ImageResult:
        owner, _, name = upstream_model.partition("/")
        url = f"{self._base_url}/models/{quote(owner, safe='')}/{quote(name, safe='')}/predictions"
        raw, _ = await self._send(
            "POST",
            url,
            request_id=job.request_id,
            json_body={"input": request_input(job)},
            # Sync mode: the answer waits (up to 60 s) for the prediction to finish.
            extra_headers={"prefer": "wait"},
        )
        prediction = json_object(raw)
        output = _finished(prediction)
        if output is None:
            urls = prediction.get("urls")
            get = urls.get("get") if isinstance(urls, Mapping) else None
            if not isinstance(get, str):
                raise UpstreamError(INVALID_RESPONSE)
            poll_url = self._trusted(get)

            async def step() -> list[str] | None:
                answer = await self._transient_ok(
                    partial(self._send, "GET", poll_url, request_id=job.request_id)
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
        made = await asyncio.gather(*(self._download(self._deliverable(u), job) for u in output))
        return images_response([await deliver(image, job) for image in made])

    async def edit(self, job: ImageJob, *, upstream_model: str) -> ImageResult:  # noqa: ARG002
        # The catalog gives Replicate models no edit rule, so admission refuses edits before this.
        raise UpstreamError("This upstream does not serve image edits.")

    async def _download(self, url: URL, job: ImageJob) -> Produced:
        download = partial(
            self._send, "GET", str(url), request_id=job.request_id, auth=False, max_bytes=MAX_IMAGE_BYTES
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
    """The prediction's ``input`` for ``job`` (all ``n`` images in one prediction)."""
    spec = job.caps.provider
    body: dict[str, Any] = {
        "prompt": job.prompt,
        "num_outputs": job.n,
        "output_format": FORMATS.get(job.output_format, "png"),
    }
    if spec is not None:
        body["aspect_ratio"] = nearest_ratio(job.size, spec.aspect_ratios, spec.default_ratio)
        body.update(spec.mapped_params(job.forward))
    return body


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return ReplicateProvider(**polling_options(upstream, DEFAULT_BASE_URL))


register_kind(ProviderKind(name="replicate", build=_build))
