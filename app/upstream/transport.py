"""One upstream's HTTP, shared by every adapter: the pooled session, timeouts, proxy, request
signing, the "upstream answered" signal and the mapping of transport trouble to gateway errors.

Adapters differ in what they send and how they read an answer; how a call is made is the same for
all of them, so it is written once here:

- ``call``: one request read whole. A 2xx marks the call answered (``UpstreamCall.answered``:
  the upstream has done, and billed, the work, so a client leaving while the body arrives no
  longer cancels it); the status is handed back, not raised, because each provider reads its own error
  bodies. Bodies above ``max_bytes`` are the upstream's fault (502), checked on the announced
  length and on what arrived.
- ``open``: a request whose answer is read by the caller (an SSE stream); the caller releases it.
- ``sign``: a hook run on each request after the headers are set, for providers whose auth signs
  the request (SigV4-style: method, URL, headers and the body's bytes). A multipart body is
  streamed from the spool and cannot be hashed up front: signing providers send bytes.
- Every call runs inside ``map_aiohttp_errors`` with the upstream's secrets, so no exception
  string leaks a URL, host or key; ``secrets`` is what the adapter's messages are scrubbed of.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.core.errors import UpstreamError
from app.upstream.call import UpstreamCall
from app.upstream.client import PROBE_TIMEOUT, LazySession, client_timeout
from app.upstream.errors import INVALID_RESPONSE, map_aiohttp_errors, upstream_secrets

# ``sign(method, url, headers, body)`` → headers to add (e.g. ``authorization``, ``x-amz-date``).
RequestSigner = Callable[[str, str, Mapping[str, str], bytes | None], Awaitable[Mapping[str, str]]]


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's answer, read whole."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Transport:
    """The HTTP side of one upstream (one per configured upstream, its own connection pool)."""

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
        """``session``: one to share (its owner closes it, and its timeouts apply); by default one
        is made on first use, since a session belongs to the loop it was made in and adapters are
        often built before the loop runs."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        # Everything that identifies the upstream is scrubbed from relayed messages.
        self.secrets: tuple[str, ...] = upstream_secrets(self.base_url, api_key)
        self._sign = sign
        self._http = LazySession(
            client_timeout(timeout_s, connect_timeout_s),
            max_connections=max_connections,
            what=f"upstream provider {name!r}",
            session=session,
        )

    def scrub_also(self, values: Sequence[str]) -> None:
        """More strings that identify the upstream (an Azure resource, its deployment names)."""
        self.secrets = (*self.secrets, *(v for v in values if v))

    async def call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        call: UpstreamCall,
        data: Any = None,
        max_bytes: int | None = None,
    ) -> Answer:
        """One request, its answer read whole (rules in the module doc)."""
        sent = await self._signed(method, url, headers, data)
        with map_aiohttp_errors(secrets=self.secrets):
            async with self._http.get().request(
                method, url, data=data, headers=sent, allow_redirects=False, proxy=self._http.proxy(url)
            ) as response:
                if max_bytes is not None and (response.content_length or 0) > max_bytes:
                    raise UpstreamError(INVALID_RESPONSE)
                if 200 <= response.status < 300:
                    call.answered()
                raw = await response.read()
                answer = Answer(response.status, raw, response.headers)
        if max_bytes is not None and len(raw) > max_bytes:
            raise UpstreamError(INVALID_RESPONSE)
        return answer

    async def open(
        self, method: str, url: str, *, headers: Mapping[str, str], data: Any = None
    ) -> aiohttp.ClientResponse:
        """A request whose answer the caller reads (and releases): a stream."""
        sent = await self._signed(method, url, headers, data)
        with map_aiohttp_errors(secrets=self.secrets):
            return await self._http.get().request(
                method, url, data=data, headers=sent, allow_redirects=False, proxy=self._http.proxy(url)
            )

    async def probe(self, url: str, headers: Mapping[str, str]) -> bool:
        """Reachability: any HTTP answer will do, even 401 or 404."""
        try:
            async with self._http.get().get(
                url,
                headers=dict(headers),
                timeout=PROBE_TIMEOUT,
                allow_redirects=False,
                proxy=self._http.proxy(url),
            ) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return False
        return True

    async def aclose(self) -> None:
        """Close the connection pool, unless it was injected (its owner closes it)."""
        await self._http.aclose()

    async def _signed(self, method: str, url: str, headers: Mapping[str, str], data: Any) -> dict[str, str]:
        sent = dict(headers)
        if self._sign is not None:
            if data is not None and not isinstance(data, bytes):
                raise UpstreamError("This upstream signs its requests and cannot send a streamed body.")
            sent.update(await self._sign(method, url, sent, data))
        return sent
