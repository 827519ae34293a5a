"""The gateway's one outbound HTTP stack: aiohttp sessions, made and configured here.

Every outbound call of ``app/`` goes through a session from this module (image providers, the
moderation model, webhook deliveries), so there is one client library, one trust store, one
proxy rule and one error mapper (``app.upstream.errors.map_aiohttp_errors``). aiohttp and httpx may
be imported only under ``app/upstream/`` (ruff's banned-API rule, pyproject.toml); callers above
this layer use the helpers below and never see a transport type.

aiohttp rather than httpx: per call, httpx on anyio cost three to four times the CPU (cancel scopes,
sniffio look-ups, locks), close to half of all the gateway's CPU per request.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.request
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import aiohttp
import certifi
import orjson
from aiohttp.abc import AbstractResolver
from yarl import URL

from app.core.errors import UpstreamError
from app.upstream.errors import INVALID_RESPONSE, map_aiohttp_errors, rejected_from_response

# Shorter than most servers' own keep-alive (uvicorn: 5 s), so the pool rarely picks a connection
# the upstream is closing at that very moment (httpx's idle expiry, kept when the stack changed).
KEEPALIVE_S = 5.0
# /readyz asks every upstream; one that does not answer within this is not ready.
PROBE_TIMEOUT = aiohttp.ClientTimeout(connect=5.0, sock_connect=5.0, sock_read=5.0)
# What a failed send raises, for callers that only record that it failed (webhook deliveries):
# aiohttp's own errors, and the TimeoutError of a total timeout.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError, TimeoutError)

Session = aiohttp.ClientSession


def client_timeout(timeout_s: float, connect_timeout_s: float) -> aiohttp.ClientTimeout:
    """What ``httpx.Timeout(timeout_s, connect=connect_timeout_s)`` meant, in aiohttp's terms.

    httpx bounds each step, never the whole call: ``connect_timeout_s`` to connect, ``timeout_s``
    to wait for a pooled connection and for each socket read or write. So no ``total`` (a stream may
    run as long as events keep coming); ``sock_read`` is the idle bound on answers and streams, and
    ``connect`` (pool wait plus connecting) is the sum of httpx's two bounds. Writes are bounded by
    ``multipart.StallBoundForm``; JSON bodies are small enough never to wait on the socket.
    """
    return aiohttp.ClientTimeout(
        total=None,
        connect=timeout_s + connect_timeout_s,
        sock_connect=connect_timeout_s,
        sock_read=timeout_s,
    )


def new_session(
    timeout: aiohttp.ClientTimeout, *, max_connections: int | None, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """A pooled keep-alive session as upstream clients use it; ``resolver`` lets tests aim names at
    loopback.

    ``max_connections`` None means no pool cap (aiohttp's ``limit=0``): an image call holds its
    connection for the whole generation, so aiohttp's default of 100 would silently make every
    upstream serve at most 100 images at once. Where the operator sets ``max_concurrency`` the
    router's slots bound the calls and the pool matches them.

    Must be called inside the running loop.
    """
    connector = aiohttp.TCPConnector(
        limit=max_connections or 0,
        limit_per_host=0,
        keepalive_timeout=KEEPALIVE_S,
        resolver=resolver,
        ssl=trust_store(),
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        # Like httpx: gzip and deflate answers are decoded, so a relayed body is plain JSON.
        auto_decompress=True,
        # Like httpx, cookies an upstream sets (load-balancer affinity, bot management) are sent
        # back; `unsafe` keeps them for upstreams addressed by IP too.
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )


def delivery_session(*, total_timeout_s: float) -> aiohttp.ClientSession:
    """A session for webhook deliveries: one bound on the whole send, aiohttp's defaults otherwise
    (the system trust store, no proxy from the environment), as deliveries have always been sent.

    Must be called inside the running loop.
    """
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=total_timeout_s))


@cache
def trust_store() -> ssl.SSLContext:
    """The CAs httpx trusted: ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` when set, else certifi's bundle.

    aiohttp would use the system store, which a slim container image may not even have.
    """
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


def env_proxy(url: str) -> str | None:
    """The proxy httpx took from the environment for ``url`` (``HTTPS_PROXY``, ``ALL_PROXY``,
    ``NO_PROXY``…), read once: aiohttp's ``trust_env`` re-reads the environment, and ``~/.netrc``,
    on every request."""
    target = URL(url)
    if not target.host or urllib.request.proxy_bypass(target.host):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(target.scheme) or proxies.get("all")
    if not proxy:
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class LazySession:
    """The pooled session of one upstream client: made on first use, or injected and then closed
    by its owner, with the environment's proxy looked up once per origin.

    Made on first use because aiohttp binds a session to the loop it is made in, and clients are
    built before the server's loop runs (at settings time, in tests outside any loop). ``what``
    names the client in the error raised after it was closed.
    """

    def __init__(
        self,
        timeout: aiohttp.ClientTimeout,
        *,
        max_connections: int | None,
        what: str,
        session: Session | None = None,
    ) -> None:
        self._timeout = timeout
        self._max_connections = max_connections
        self._what = what
        self._owned = session is None
        self._session = session
        self._closed = False
        self._proxies: dict[str, str | None] = {}

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def made(self) -> Session | None:
        """The session, if one was injected or has been made (None before first use)."""
        return self._session

    def get(self) -> Session:
        """The session, made now inside the running loop if this is its first use."""
        if self._session is None:
            if self._closed:
                raise RuntimeError(f"{self._what} is closed")
            self._session = new_session(self._timeout, max_connections=self._max_connections)
        return self._session

    def proxy(self, url: str) -> str | None:
        """The environment's proxy for ``url``'s origin (scheme, host and port)."""
        target = URL(url)
        origin = f"{target.scheme}://{target.host}:{target.port}"
        if origin not in self._proxies:
            self._proxies[origin] = env_proxy(url)
        return self._proxies[origin]

    async def aclose(self) -> None:
        """Close the pool, unless it was injected (its owner closes it)."""
        self._closed = True
        if self._owned and self._session is not None:
            await self._session.close()


class JSONClient:
    """POSTs JSON to upstream endpoints (the moderation model) on one pooled session.

    ``post`` answers the decoded JSON of a 2xx; everything else raises an ``app.core.errors`` upstream
    error, scrubbed of ``secrets``: an error status as ``UpstreamRejected``, a body that is not
    JSON as ``UpstreamError``, transport trouble through ``map_aiohttp_errors``. ``timeout_s`` bounds
    the whole call, so an upstream that trickles bytes cannot hold a request for long.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        secrets: Sequence[str],
        session: Session | None = None,
    ) -> None:
        """``session``: one to share (its owner closes it); by default one is made on first use,
        inside the running loop."""
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._secrets = tuple(secrets)
        # httpx's pool size, which this client had before the stack became one.
        self._http = LazySession(
            self._timeout, max_connections=100, what="the upstream JSON client", session=session
        )

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Any:
        with map_aiohttp_errors(secrets=self._secrets):
            async with (
                asyncio.timeout(self._timeout_s),
                self._http.get().post(
                    url,
                    data=body,
                    headers=dict(headers),
                    timeout=self._timeout,
                    allow_redirects=False,
                    proxy=self._http.proxy(url),
                ) as response,
            ):
                raw = await response.read()
        if not 200 <= response.status < 300:
            raise rejected_from_response(response.status, raw, response.headers, secrets=self._secrets)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(INVALID_RESPONSE) from exc

    async def aclose(self) -> None:
        """Close the pool, unless it was injected (its owner closes it)."""
        await self._http.aclose()
