"""Adapter for any OpenAI-compatible Images API (OpenAI itself, proxies, self-hosted servers).

The job already knows its upstream body (``ImageJob.upstream_body``); this module only moves bytes:
it posts that body, turns a failure into an ``app.core.errors`` upstream error and hands a success back
as the bytes it came in, so images are never decoded or re-encoded on the way through.

Its calls go through ``app.upstream.transport`` (the pooled session, timeouts, error mapping and
scrubbing every adapter shares), on ``app.upstream.client``, the gateway's one outbound HTTP stack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import ExitStack
from typing import Any

import aiohttp
import orjson
from pydantic import Field

from app.core.errors import UpstreamError
from app.domain.jobs import ImageJob, ImageResult, ProviderEvent, TokenUsage, completed_events
from app.upstream.base import ImageProvider
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.config import KindSettings, ProviderKind, UpstreamSettings, common_options, register_kind
from app.upstream.errors import INVALID_RESPONSE, map_aiohttp_errors, rejected_from_response
from app.upstream.multipart import edit_form
from app.upstream.providers.openai_batch import OpenAIBatchClient
from app.upstream.skeleton import summarize
from app.upstream.sse_decode import iter_sse
from app.upstream.transport import Transport

Body = bytes | aiohttp.MultipartWriter


class OpenAICompatProvider:
    """An ``ImageProvider`` over one OpenAI-compatible base URL, with its own connection pool."""

    # Body fields this upstream must not receive (Azure: ``model``, which its deployment decides).
    _omitted_fields: frozenset[str] = frozenset()

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
    ) -> None:
        """``session``: one to share (its owner closes it, and its timeouts apply); by default the
        provider makes its own on first use, since a session belongs to the loop it was made in and
        providers are often built before the loop runs."""
        self.name = name
        self._transport = Transport(
            name=name,
            base_url=base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            session=session,
        )
        self._base_url = self._transport.base_url
        self._api_key = api_key or None
        self._timeout_s = timeout_s
        # Set for an upstream with ``batch: true``: its Files and Batch APIs.
        self.batch_client: OpenAIBatchClient | None = None

    @property
    def _secrets(self) -> tuple[str, ...]:
        return self._transport.secrets

    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult:
        """POST ``/images/generations`` and return the upstream's ImagesResponse as is."""
        return await self._send_whole(job, upstream_model, call)

    async def edit(self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT) -> ImageResult:
        """POST ``/images/edits`` as multipart, streaming the spooled files."""
        return await self._send_whole(job, upstream_model, call)

    async def _send_whole(self, job: ImageJob, upstream_model: str, call: UpstreamCall) -> ImageResult:
        with ExitStack() as files:
            url, headers, body = self._build(job, upstream_model, files, stream=False)
            # The body is read inside: the connection goes back to the pool (and the multipart
            # writer stops reading the files) before the files close.
            answer = await self._transport.call("POST", url, headers=headers, call=call, data=body)
        self._raise_for_status(answer.status, answer.body, answer.headers)
        return self._image_result(answer.body)

    async def stream(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> AsyncIterator[ProviderEvent]:
        """POST with ``stream: true`` and yield each SSE event as it arrives.

        An error status is raised before anything is yielded, so the router can still fail over.
        An upstream that answers plain JSON (it does not stream) still honours the stream contract
        through completed events. Leaving the loop early (client gone) closes the connection.
        """
        with ExitStack() as files:
            url, headers, body = self._build(job, upstream_model, files, stream=True)
            response = await self._transport.open("POST", url, headers=headers, data=body)
            try:
                if not 200 <= response.status < 300:
                    with map_aiohttp_errors(secrets=self._secrets):
                        raw = await response.read()
                    self._raise_for_status(response.status, raw, response.headers)
                call.answered()
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    with map_aiohttp_errors(secrets=self._secrets):
                        raw = await response.read()
                    for event in completed_events(job, self._image_result(raw)):
                        yield event
                    return
                with map_aiohttp_errors(secrets=self._secrets):
                    async for sse in iter_sse(response.content.iter_any()):
                        relayed = self._event(sse.event, sse.data)
                        if relayed is not None:
                            yield relayed
            finally:
                # Back to the pool when the stream was read to its end; closed when it was not.
                response.release()

    def _build(
        self, job: ImageJob, upstream_model: str, files: ExitStack, *, stream: bool
    ) -> tuple[str, dict[str, str], Body]:
        """The upstream request: JSON for generations, multipart (files from the spool) for edits."""
        headers = self._headers(request_id=job.request_id)
        if stream:
            headers["accept"] = "text/event-stream"
        url = self._images_url(job.endpoint, upstream_model)
        if job.endpoint != "generations":  # edits and variations
            # The form reads the files chunk by chunk while sending, so they must stay open until
            # the answer is in (the caller's ExitStack). It sets its own content-type, with boundary.
            form = edit_form(
                job,
                upstream_model,
                files,
                stream=stream,
                omitted=self._omitted_fields,
                write_timeout_s=self._timeout_s,
            )
            return url, headers, form
        body = {k: v for k, v in job.upstream_body(upstream_model).items() if k not in self._omitted_fields}
        if stream:
            body["stream"] = True
        headers["content-type"] = "application/json"
        return url, headers, orjson.dumps(body)

    def _event(self, name: str, data: bytes) -> ProviderEvent | None:
        """One upstream SSE event; an ``error`` event (or data carrying ``error``) is raised."""
        if data.strip() == b"[DONE]":
            return None
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(INVALID_RESPONSE) from exc
        if not isinstance(payload, dict):
            raise UpstreamError(INVALID_RESPONSE)
        if name == "error" or "error" in payload:
            raise rejected_from_response(502, data, {}, secrets=self._secrets)
        kind = payload.get("type") if isinstance(payload.get("type"), str) else name
        return ProviderEvent(type=str(kind), data=payload, raw=data)

    async def probe(self) -> bool:
        """Reachability: any HTTP answer from ``/models`` will do, even 401 or 404."""
        return await self._transport.probe(self._url("/models"), self._headers(request_id="probe"))

    async def aclose(self) -> None:
        """Close the connection pool, unless it was injected (its owner closes it)."""
        await self._transport.aclose()

    def _url(self, path: str) -> str:
        return f"{self._base_url}{path}"

    def _images_url(self, endpoint: str, upstream_model: str) -> str:  # noqa: ARG002
        """Where an images call goes; Azure names the deployment (the upstream model) in the path."""
        return self._url(f"/images/{endpoint}")

    def _headers(self, *, request_id: str) -> dict[str, str]:
        """Auth, and the gateway's request id so both sides' logs can be matched."""
        headers = {"accept": "application/json", "x-request-id": request_id}
        if self._api_key:
            # Keyless upstreams (a local server) get no header rather than an empty bearer.
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers

    def _raise_for_status(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        """Raise the sanitised ``UpstreamRejected`` for anything but a 2xx (3xx are not followed)."""
        if not 200 <= status < 300:
            raise rejected_from_response(status, body, headers, secrets=self._secrets)

    @staticmethod
    def _image_result(raw: bytes) -> ImageResult:
        """The ImagesResponse as the bytes it came in, with its usage and image count read from a
        skeleton (``app.upstream.skeleton``); a body without a ``data`` list is the upstream's fault
        (502)."""
        try:
            answer = summarize(raw)
        except ValueError as exc:
            raise UpstreamError(INVALID_RESPONSE) from exc
        usage: dict[str, Any] | None = answer.usage or None
        return ImageResult(
            answer.body,
            TokenUsage.from_openai(usage) if usage else None,
            usage,
            raw=raw,
            image_count=answer.count,
        )


class OpenAISettings(KindSettings):
    """The openai kind's own settings. ``batch``: batch lines routed here are sent as one batch to
    the upstream's Files and Batches endpoints, at its batch discount, instead of one call each
    (app/batches/forward.py; README "Forwarding to OpenAI's Batch API"). The upstream batch is
    polled every ``poll_interval_s``, growing x1.5 to ``poll_max_interval_s``: OpenAI's batches take
    minutes to hours, so the defaults are far longer than a polling provider's."""

    batch: bool = False
    poll_interval_s: float = Field(default=5.0, gt=0)
    poll_max_interval_s: float = Field(default=60.0, gt=0)


def _build(upstream: UpstreamSettings) -> ImageProvider:
    provider = OpenAICompatProvider(base_url=upstream.base_url or "", **common_options(upstream))
    own = upstream.options_as(OpenAISettings)
    if own.batch:
        # Batch lines routed here go to the upstream's own Batch API (app/batches/forward.py).
        provider.batch_client = OpenAIBatchClient(
            name=upstream.name,
            transport=provider._transport,
            api_key=upstream.api_key.get_secret_value() if upstream.api_key else None,
            poll_interval_s=own.poll_interval_s,
            poll_max_interval_s=own.poll_max_interval_s,
        )
    return provider


register_kind(
    ProviderKind(
        name="openai",
        build=_build,
        serves="unclaimed",
        base_url_required=True,
        follows_retirements=True,
        settings=OpenAISettings,
    )
)
