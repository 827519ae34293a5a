"""Adapter for any OpenAI-compatible Images API (OpenAI itself, proxies, self-hosted servers).

The job already knows its upstream body (``ImageJob.upstream_body``); this module only moves bytes:
it posts that body, turns a failure into an ``app.errors`` upstream error and hands a success back
as the bytes it came in, so images are never decoded or re-encoded on the way through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from typing import Any

import httpx
import orjson

from app.errors import UpstreamError
from app.images.jobs import ImageJob, ImageResult, ProviderEvent, TokenUsage, completed_events
from app.upstream.errors import INVALID_RESPONSE, map_httpx_errors, rejected_from_response, upstream_secrets
from app.upstream.multipart import edit_parts
from app.upstream.skeleton import summarize
from app.upstream.sse_decode import iter_sse


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
        max_connections: int = 100,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        # Everything that identifies the upstream is scrubbed from relayed messages (SPEC §1.4).
        self._secrets = upstream_secrets(base_url, api_key)
        # Tests inject a client on httpx.MockTransport; only a client made here is closed here.
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def generate(self, job: ImageJob, *, upstream_model: str) -> ImageResult:
        """POST ``/images/generations`` and return the upstream's ImagesResponse as is."""
        response = await self._post_json(
            "/images/generations", job.upstream_body(upstream_model), request_id=job.request_id
        )
        return self._image_result(response)

    async def edit(self, job: ImageJob, *, upstream_model: str) -> ImageResult:
        """POST ``/images/edits`` as multipart, streaming the spooled files."""
        with ExitStack() as files:
            request = self._build(job, upstream_model, files, stream=False)
            with map_httpx_errors(secrets=self._secrets):
                response = await self._client.send(request)
        self._raise_for_status(response)
        return self._image_result(response)

    async def stream(self, job: ImageJob, *, upstream_model: str) -> AsyncIterator[ProviderEvent]:
        """POST with ``stream: true`` and yield each SSE event as it arrives.

        An error status is raised before anything is yielded, so the router can still fail over.
        An upstream that answers plain JSON (it does not stream) still honours the stream contract
        through completed events. Leaving the loop early (client gone) closes the connection.
        """
        with ExitStack() as files:
            request = self._build(job, upstream_model, files, stream=True)
            with map_httpx_errors(secrets=self._secrets):
                response = await self._client.send(request, stream=True)
        try:
            if not response.is_success:
                with map_httpx_errors(secrets=self._secrets):
                    await response.aread()
                self._raise_for_status(response)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                with map_httpx_errors(secrets=self._secrets):
                    await response.aread()
                for event in completed_events(job, self._image_result(response)):
                    yield event
                return
            with map_httpx_errors(secrets=self._secrets):
                async for sse in iter_sse(response.aiter_raw()):
                    relayed = self._event(sse.event, sse.data)
                    if relayed is not None:
                        yield relayed
        finally:
            await response.aclose()

    def _build(self, job: ImageJob, upstream_model: str, files: ExitStack, *, stream: bool) -> httpx.Request:
        """The upstream request: JSON for generations, multipart (files from the spool) for edits."""
        headers = self._headers(request_id=job.request_id)
        if stream:
            headers["accept"] = "text/event-stream"
        url = self._images_url(job.endpoint, upstream_model)
        if job.endpoint == "edits":
            data, parts = edit_parts(job, upstream_model, files, stream=stream)
            data = {k: v for k, v in data.items() if k not in self._omitted_fields}
            # httpx reads the file objects chunk by chunk while sending, so they must stay open
            # until `send` returns (the caller's ExitStack).
            return self._client.build_request("POST", url, data=data, files=parts, headers=headers)
        body = {k: v for k, v in job.upstream_body(upstream_model).items() if k not in self._omitted_fields}
        if stream:
            body["stream"] = True
        headers["content-type"] = "application/json"
        return self._client.build_request("POST", url, content=orjson.dumps(body), headers=headers)

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
        try:
            await self._client.get(
                self._url("/models"), headers=self._headers(request_id="probe"), timeout=5.0
            )
        except httpx.HTTPError:
            return False
        return True

    async def aclose(self) -> None:
        """Close the connection pool, unless it was injected (its owner closes it)."""
        if self._owns_client:
            await self._client.aclose()

    def _url(self, path: str) -> str:
        return f"{self._base_url}{path}"

    def _images_url(self, endpoint: str, upstream_model: str) -> str:  # noqa: ARG002
        """Where an images call goes; Azure names the deployment (the upstream model) in the path."""
        return self._url(f"/images/{endpoint}")

    def _headers(self, *, request_id: str, content_type: str | None = None) -> dict[str, str]:
        """Auth, and the gateway's request id so both sides' logs can be matched."""
        headers = {"accept": "application/json", "x-request-id": request_id}
        if content_type is not None:
            headers["content-type"] = content_type
        if self._api_key:
            # Keyless upstreams (a local server) get no header rather than an empty bearer.
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers

    async def _post_json(self, path: str, body: dict[str, Any], *, request_id: str) -> httpx.Response:
        """Send ``body`` as JSON; any error status becomes ``UpstreamRejected``."""
        with map_httpx_errors(secrets=self._secrets):
            response = await self._client.post(
                self._url(path),
                content=orjson.dumps(body),
                headers=self._headers(request_id=request_id, content_type="application/json"),
            )
        self._raise_for_status(response)
        return response

    def _raise_for_status(self, response: httpx.Response) -> None:
        """Raise the sanitised ``UpstreamRejected`` for anything but a 2xx (3xx are not followed)."""
        if not response.is_success:
            raise rejected_from_response(
                response.status_code, response.content, response.headers, secrets=self._secrets
            )

    @staticmethod
    def _image_result(response: httpx.Response) -> ImageResult:
        """The ImagesResponse as the bytes it came in, with its usage and image count read from a
        skeleton (``app.upstream.skeleton``); a body without a ``data`` list is the upstream's fault
        (502)."""
        raw = response.content
        try:
            answer = summarize(raw)
        except ValueError as exc:
            raise UpstreamError(INVALID_RESPONSE) from exc
        usage = answer.usage or None
        return ImageResult(
            answer.body,
            TokenUsage.from_openai(usage) if usage else None,
            usage,
            raw=raw,
            image_count=answer.count,
        )
