"""What the adapters for non-OpenAI image APIs (Gemini, Imagen, FLUX, Stability) share.

Those upstreams do not speak the OpenAI Images API, so their adapters translate both ways: a job's
OpenAI-shaped settings into the provider's request, and the provider's answer into an OpenAI
``ImagesResponse`` the gateway relays, meters and stores like any other. This module holds the
pieces every such translation needs:

- ``NativeProvider``: one ``Transport`` per upstream (``app.upstream.transport``: the pooled
  session, timeouts, signing hook, error mapping and scrubbing), the stream contract through
  completed events, the ``/readyz`` probe.
- ``rejected``: a provider's error answer as the same ``UpstreamRejected`` / ``UpstreamError`` an
  OpenAI error becomes (status kept, message scrubbed of keys, URLs and hosts, ``retry-after``
  read), so retry, failover and the breaker treat every provider alike. A 404 (model or route
  unknown) and a 402 (the operator's account cannot pay) are the configuration's fault, not the
  client's: they become 502 ``upstream_error`` and fail over. A 4xx OpenAI never answers (BFL's
  422 validation error, 405, 413, 415, …) is the request's fault all the same: it reaches the
  client as OpenAI's 400 ``invalid_request_error``, the only shape its SDKs know for it.
- ``prompt_rejected``: an answer that says the prompt itself produced no image (Gemini's
  ``NO_IMAGE``): 400, so it is neither retried on another upstream nor charged.
- ``moderation_blocked``: the 400 ``moderation_blocked`` a provider's safety refusal becomes.
- ``nearest_ratio`` / ``nearest_tier``: an OpenAI ``size`` to the provider's nearest aspect ratio
  and resolution tier.
- ``produced`` / ``deliver``: the image a provider returned, its real format and pixel size read
  from its bytes (so the answer's ``size`` says what was produced, not what was asked), and
  re-encoded with Pillow only when the provider cannot produce the asked ``output_format``.
- ``in_parallel``: ``n`` images from providers that make one per call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
from PIL import Image, UnidentifiedImageError

from app.core.errors import GatewayError, UpstreamError, UpstreamRejected
from app.domain.catalog import parse_size
from app.domain.jobs import ImageJob, ImageResult, ProviderEvent, TokenUsage, completed_events
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.errors import INVALID_RESPONSE, rejected_from_response
from app.upstream.transport import RequestSigner, Transport

NOT_CONFIGURED = "The upstream service is not configured to serve this model."
NO_CREDIT = "The upstream account cannot pay for this request."
NO_IMAGE = "The upstream service returned no image."
# Pillow's names for the formats the Images API speaks.
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_FROM_PIL = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
# A re-encode without an asked output_compression: visually lossless, far smaller than 100.
DEFAULT_REENCODE_QUALITY = 95
# An image a provider hands back larger than this is not an image the gateway will relay.
MAX_IMAGE_BYTES = 64 * 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Produced:
    """One image as it will be relayed: its bytes, real format and pixel size."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def b64(self) -> str:
        return base64.b64encode(self.data).decode()


def decode_b64(value: Any) -> bytes:
    """A provider's base64 image field; anything else is the upstream's fault (502)."""
    if not isinstance(value, str) or not value:
        raise UpstreamError(INVALID_RESPONSE)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UpstreamError(INVALID_RESPONSE) from exc


def produced(data: bytes) -> Produced:
    """Read format and size from the image's header (no decode); not an image → 502."""
    if len(data) > MAX_IMAGE_BYTES:
        raise UpstreamError(INVALID_RESPONSE)
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = _FROM_PIL.get(image.format or "")
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UpstreamError(INVALID_RESPONSE) from exc
    if fmt is None:
        raise UpstreamError(INVALID_RESPONSE)
    return Produced(data, fmt, width, height)


def _reencode(image: Produced, output_format: str, compression: int | None) -> Produced:
    with Image.open(io.BytesIO(image.data)) as source:
        source.load()
        frame = source.convert("RGB") if output_format == "jpeg" else source
        buffer = io.BytesIO()
        if output_format == "png":
            frame.save(buffer, format="PNG")
        else:
            quality = compression if compression is not None else DEFAULT_REENCODE_QUALITY
            frame.save(buffer, format=PIL_FORMATS[output_format], quality=quality)
    return Produced(buffer.getvalue(), output_format, image.width, image.height)


async def deliver(image: Produced, job: ImageJob, *, compressed_by_provider: bool = False) -> Produced:
    """The image in the job's ``output_format``: as the provider made it when it already is,
    re-encoded (off the event loop) when not. ``compressed_by_provider``: the provider applied
    ``output_compression`` itself, so an image already in the asked format is kept even then."""
    wanted = job.output_format
    if image.format == wanted and (
        job.output_compression is None or compressed_by_provider or wanted == "png"
    ):
        return image
    if wanted not in PIL_FORMATS:
        raise UpstreamError(f"The gateway cannot produce output_format '{wanted}' for this model.")
    return await asyncio.to_thread(_reencode, image, wanted, job.output_compression)


def ratio_value(ratio: str) -> float:
    """``"16:9"`` → 1.777…"""
    width, _, height = ratio.partition(":")
    return float(width) / float(height)


def nearest_ratio(size: str, ratios: Sequence[str], default: str = "1:1") -> str:
    """The supported aspect ratio closest to ``size`` (``auto`` → ``default``), compared on a
    log scale so that 2:1 is as far from 1:1 as 1:2 is."""
    dims = parse_size(size)
    if dims is None or not ratios:
        return default
    wanted = math.log(dims[0] / dims[1])
    return min(ratios, key=lambda r: (abs(math.log(ratio_value(r)) - wanted), r))


def nearest_tier(size: str, tiers: Mapping[str, int], default: str | None = None) -> str | None:
    """The resolution tier (``{"1K": 1024, "2K": 2048}``) whose long edge is nearest the asked
    size's long edge, on a log scale; ties go to the larger tier (never smaller than asked)."""
    dims = parse_size(size)
    if dims is None or not tiers:
        return default
    edge = max(dims)
    return min(tiers, key=lambda t: (abs(math.log(tiers[t] / edge)), -tiers[t]))


def images_response(images: Sequence[Produced], usage: TokenUsage | None = None) -> ImageResult:
    """The OpenAI ``ImagesResponse`` for produced images; ``size`` is what was produced (the
    first image's, as every image of one request shares the settings)."""
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": [{"b64_json": image.b64} for image in images],
    }
    if images:
        body["size"] = images[0].size
        body["output_format"] = images[0].format
    raw_usage = usage.to_openai() if usage is not None else None
    if raw_usage is not None:
        body["usage"] = raw_usage
    return ImageResult(body, usage, raw_usage, image_count=len(images))


def moderation_blocked(
    stage: str, message: str | None = None, categories: Sequence[str] = ()
) -> UpstreamRejected:
    """A provider's safety refusal, as OpenAI answers one: 400 ``moderation_blocked``, not charged."""
    return UpstreamRejected(
        400,
        message or "Your request was rejected by the upstream service's safety system.",
        error_type="image_generation_user_error",
        param=None,
        code="moderation_blocked",
        details={"moderation_details": {"moderation_stage": stage, "categories": list(categories)}},
    )


def prompt_rejected(message: str, reason: str) -> UpstreamRejected:
    """The provider made no image because of what the prompt asks: the client's answer (400), the
    same on every upstream, so not retried, and not charged (nothing was produced)."""
    return UpstreamRejected(
        400,
        message,
        error_type="image_generation_user_error",
        param="prompt",
        code="image_generation_failed",
        details={"reason": reason.lower()},
    )


# The 4xx statuses an OpenAI client knows (openai-python's status-to-class table): others are 400.
OPENAI_4XX = frozenset({400, 401, 403, 404, 408, 409, 429})


def rejected(
    status: int,
    message: str | None,
    headers: Mapping[str, str],
    *,
    secrets: Sequence[str],
    code: str | None = None,
) -> UpstreamError:
    """A provider's error status as the gateway's upstream error (rules in the module docstring)."""
    if status == 404:
        return UpstreamError(NOT_CONFIGURED)
    if status == 402:
        return UpstreamError(NO_CREDIT)
    error: dict[str, Any] = {"message": message or None, "code": code}
    if 400 <= status < 500 and status not in OPENAI_4XX:
        status = 400
        error.update(type="invalid_request_error", code=code or "invalid_value")
    if status == 429:
        error.update(type="rate_limit_error", code="rate_limit_exceeded")
    return rejected_from_response(status, orjson.dumps({"error": error}), headers, secrets=secrets)


def json_object(raw: bytes) -> dict[str, Any]:
    """A provider's JSON answer; anything but an object is the upstream's fault (502)."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(INVALID_RESPONSE) from exc
    if not isinstance(parsed, dict):
        raise UpstreamError(INVALID_RESPONSE)
    return parsed


async def in_parallel(n: int, call: Callable[[int], Awaitable[list[T]]]) -> list[T]:
    """``n`` calls at once for providers that make one image per call.

    Images that some calls produced are kept when others fail: the provider has done (and
    billed) that work, so it is returned and charged, never thrown away. Only when every call
    failed is an error raised: a moderation refusal first (it is the client's answer), else
    the first failure.
    """
    if n == 1:
        return await call(0)
    outcomes = await asyncio.gather(*(call(i) for i in range(n)), return_exceptions=True)
    images: list[T] = []
    errors: list[BaseException] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            errors.append(outcome)
        else:
            images.extend(outcome)
    if images:
        return images
    for error in errors:
        if isinstance(error, UpstreamRejected) and error.code == "moderation_blocked":
            raise error
    for error in errors:  # then another answer about the prompt (prompt_rejected)
        if isinstance(error, UpstreamRejected) and error.error_type == "image_generation_user_error":
            raise error
    raise errors[0] if errors else UpstreamError(NO_IMAGE)


class NativeProvider(ABC):
    """An ``ImageProvider`` base: connection pool, error mapping, stream contract, probe.

    Subclasses implement ``generate`` and ``edit`` with ``_send`` and the helpers above.
    """

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_connections: int | None = None,
        session: aiohttp.ClientSession | None = None,
        sign: RequestSigner | None = None,
    ) -> None:
        self.name = name
        self._transport = Transport(
            name=name,
            base_url=base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            session=session,
            sign=sign,
        )
        self._base_url = self._transport.base_url
        self._api_key = api_key or None

    @property
    def _secrets(self) -> tuple[str, ...]:
        return self._transport.secrets

    @abstractmethod
    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult: ...

    @abstractmethod
    async def edit(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult: ...

    async def stream(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> AsyncIterator[ProviderEvent]:
        """These providers do not stream partial images: the whole result, as completed events
        (errors are raised before the first event, so the router can still fail over)."""
        run = self.edit if job.endpoint == "edits" else self.generate
        result = await run(job, upstream_model=upstream_model, call=call)
        for event in completed_events(job, result):
            yield event

    async def probe(self) -> bool:
        """Reachability: any HTTP answer from the base URL will do, even 401 or 404."""
        return await self._transport.probe(self._base_url, self._auth())

    async def aclose(self) -> None:
        await self._transport.aclose()

    # -- for subclasses -----------------------------------------------------------------------------

    @abstractmethod
    def _auth(self) -> dict[str, str]:
        """The provider's auth header(s)."""

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:  # noqa: ARG002
        """The gateway error for a provider's error answer (override to read its error body)."""
        return rejected(status, None, headers, secrets=self._secrets)

    async def _send(
        self,
        method: str,
        url: str,
        *,
        request_id: str,
        call: UpstreamCall,
        json_body: Any = None,
        form: aiohttp.FormData | aiohttp.MultipartWriter | None = None,
        auth: bool = True,
        max_bytes: int | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> tuple[bytes, Mapping[str, str]]:
        """One HTTP call; a 2xx answer's body and headers, anything else raised as ``_error``."""
        headers = {"accept": "application/json", "x-request-id": request_id}
        if auth:
            headers.update(self._auth())
        headers.update(extra_headers or {})
        data: Any = form
        if json_body is not None:
            headers["content-type"] = "application/json"
            data = orjson.dumps(json_body)
        answer = await self._transport.call(
            method, url, headers=headers, call=call, data=data, max_bytes=max_bytes
        )
        if not answer.ok:
            raise self._error(answer.status, answer.body, answer.headers)
        return answer.body, answer.headers
