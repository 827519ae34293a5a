"""OpenAI's Files and Batch APIs, as an upstream: what an ``openai`` upstream with ``batch: true``
offers the batch runner (app/batches/forward.py) to send a gateway batch's lines as one batch.

It uses its provider's ``Transport`` (the same pool, proxy and secret scrubbing as its images
calls). Uploads stream the JSONL file from disk; downloads are read chunk by chunk and handed out
a line at a time, since an output file of image lines is far larger than any one read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from app.core.errors import UpstreamError
from app.upstream.call import DIRECT
from app.upstream.errors import INVALID_RESPONSE, map_aiohttp_errors, rejected_from_response
from app.upstream.transport import Transport

CHUNK = 256 * 1024


class OpenAIBatchClient:
    """The Files (``purpose=batch``) and Batches calls of one OpenAI-compatible base URL."""

    def __init__(
        self,
        *,
        name: str,
        transport: Transport,
        api_key: str | None,
        poll_interval_s: float,
        poll_max_interval_s: float,
    ) -> None:
        self.name = name
        self._transport = transport
        self._api_key = api_key
        # How often a running batch is asked about: the first interval, growing x1.5 to the max.
        self.poll_interval_s = poll_interval_s
        self.poll_max_interval_s = poll_max_interval_s

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"accept": "application/json", **extra}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers

    def _url(self, path: str) -> str:
        return f"{self._transport.base_url}{path}"

    def _json(self, status: int, body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        if not 200 <= status < 300:
            raise rejected_from_response(status, body, headers, secrets=self._transport.secrets)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(INVALID_RESPONSE) from exc
        if not isinstance(value, dict):
            raise UpstreamError(INVALID_RESPONSE)
        return value

    async def upload(self, path: Path, *, filename: str) -> str:
        """``POST /files`` (multipart, ``purpose=batch``), the file streamed from disk; its id."""
        with path.open("rb") as handle:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", handle, filename=filename, content_type="application/jsonl")
            answer = await self._transport.call(
                "POST", self._url("/files"), headers=self._headers(), call=DIRECT, data=form
            )
        created = self._json(answer.status, answer.body, answer.headers)
        if not isinstance(created.get("id"), str):
            raise UpstreamError(INVALID_RESPONSE)
        return str(created["id"])

    async def find_file(self, filename: str, *, limit: int = 1000) -> str | None:
        """The id of the newest ``purpose=batch`` file named ``filename`` (among the last
        ``limit``): how an upload whose answer was lost is found again."""
        answer = await self._transport.call(
            "GET",
            self._url(f"/files?purpose=batch&order=desc&limit={limit}"),
            headers=self._headers(),
            call=DIRECT,
        )
        listed = self._json(answer.status, answer.body, answer.headers).get("data")
        for item in listed if isinstance(listed, list) else []:
            if (
                isinstance(item, dict)
                and item.get("filename") == filename
                and isinstance(item.get("id"), str)
            ):
                return str(item["id"])
        return None

    async def create(self, *, input_file_id: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        """``POST /batches``: the upstream's Batch object."""
        body = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        }
        answer = await self._transport.call(
            "POST",
            self._url("/batches"),
            headers=self._headers(**{"content-type": "application/json"}),
            call=DIRECT,
            data=orjson.dumps(body),
        )
        return self._checked(self._json(answer.status, answer.body, answer.headers))

    async def find(self, *, key: str, value: str, limit: int = 100) -> dict[str, Any] | None:
        """The most recent upstream batch whose ``metadata[key]`` is ``value`` (among the last
        ``limit``): how a create whose answer was lost to a crash is found again."""
        answer = await self._transport.call(
            "GET", self._url(f"/batches?limit={limit}"), headers=self._headers(), call=DIRECT
        )
        listed = self._json(answer.status, answer.body, answer.headers).get("data")
        for item in listed if isinstance(listed, list) else []:
            if isinstance(item, dict) and (item.get("metadata") or {}).get(key) == value:
                return self._checked(item)
        return None

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        answer = await self._transport.call(
            "GET", self._url(f"/batches/{batch_id}"), headers=self._headers(), call=DIRECT
        )
        return self._checked(self._json(answer.status, answer.body, answer.headers))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        answer = await self._transport.call(
            "POST", self._url(f"/batches/{batch_id}/cancel"), headers=self._headers(), call=DIRECT
        )
        return self._checked(self._json(answer.status, answer.body, answer.headers))

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """``GET /files/{id}/content``, one JSONL line at a time, read in chunks (never whole)."""
        response = await self._transport.open(
            "GET", self._url(f"/files/{file_id}/content"), headers=self._headers()
        )
        try:
            if not 200 <= response.status < 300:
                with map_aiohttp_errors(secrets=self._transport.secrets):
                    raw = await response.read()
                raise rejected_from_response(
                    response.status, raw, response.headers, secrets=self._transport.secrets
                )
            rest = b""
            with map_aiohttp_errors(secrets=self._transport.secrets):
                async for chunk in response.content.iter_chunked(CHUNK):
                    rest += chunk
                    *complete, rest = rest.split(b"\n")
                    for line in complete:
                        if line.strip():
                            yield line
            if rest.strip():
                yield rest
        finally:
            response.release()

    @staticmethod
    def _checked(batch: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(batch.get("id"), str) or not isinstance(batch.get("status"), str):
            raise UpstreamError(INVALID_RESPONSE)
        return batch
