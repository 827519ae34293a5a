"""What submit/poll/download providers share (BFL today; fal.ai's queue, Replicate's predictions
tomorrow): wait for a submitted job within a budget, backing off, and ride out the failures a
later poll may not meet.

``PollingMixin._poll_until(step, deadline)`` calls ``step()`` every ``poll_interval_s``, growing
×1.5 up to ``poll_max_interval_s``, until it returns a result (not None) or the next wait would pass
``deadline`` (→ 504 ``UpstreamJobTimeout``, not retried: the job may still finish, and be billed,
upstream; submitting it again elsewhere would pay twice). ``step`` raises what ends the job
(moderated, failed) and returns None while it is still running. ``_transient_ok(call)`` is
``call()``'s result, or None for a failure in transit (connection, timeout, 408/409/429, 5xx): once
a job is submitted, going back to the router, which would submit it again, is never the answer.

``host_allowed`` / ``absolute_url``: such providers name the URLs to poll and to download from,
and the gateway never trusts an upstream to name an arbitrary URL (it would fetch it from inside
the operator's network): each URL is checked against the upstream's allowed hosts.

Resuming (``_resumed`` / ``_submitted``): once the provider has accepted a job, what is needed
to find it again (ids, polling URLs) is handed to ``call.on_submitted`` as
``{"upstream": name, …}``; a task stores it durably before the first poll. A job that carries that
record back (``call.resume``, after the worker running it died) polls the provider's job instead of
submitting a new one, so the tenant gets the image and is billed once.

Clock and sleep are injected, so tests count polls instead of waiting on the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import Field
from yarl import URL

from app.core.errors import UpstreamError, UpstreamJobTimeout, UpstreamRejected
from app.upstream.call import UpstreamCall
from app.upstream.config import KindSettings, UpstreamSettings, common_options
from app.upstream.errors import INVALID_RESPONSE

T = TypeVar("T")
NOT_FINISHED = "The upstream service did not finish the image within the polling budget."
UNTRUSTED_URL = "The upstream service named a location outside its allowed hosts."


class PollingSettings(KindSettings):
    """The settings of a submit/poll/download kind (``ProviderKind.settings``): how long a submitted
    job is polled (the first interval, growing x1.5 to the max), and the hosts the key may be sent
    to (polling URLs) and images fetched from: ``host``, ``host:port`` or ``*.domain``. None: the
    provider's own."""

    poll_budget_s: float = Field(default=300.0, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0)
    poll_max_interval_s: float = Field(default=5.0, gt=0)
    polling_hosts: list[str] | None = None
    delivery_hosts: list[str] | None = None


def polling_options(upstream: UpstreamSettings, default_base_url: str) -> dict[str, Any]:
    """A polling provider's constructor arguments from its upstream's settings: the common ones,
    the polling budget and back-off, and the allowed hosts (None: the class's defaults)."""
    own = upstream.options_as(PollingSettings)
    return {
        **common_options(upstream),
        "base_url": upstream.base_url or default_base_url,
        "polling_hosts": own.polling_hosts,
        "delivery_hosts": own.delivery_hosts,
        "poll_budget_s": own.poll_budget_s,
        "poll_interval_s": own.poll_interval_s,
        "poll_max_interval_s": own.poll_max_interval_s,
    }


class PollingMixin:
    """Mixed in before the provider's base class (``class X(PollingMixin, NativeProvider)``): its
    ``__init__`` takes the polling settings and the allowed hosts and hands the rest on. A class
    names its own hosts in ``default_polling_hosts`` / ``default_delivery_hosts``."""

    default_polling_hosts: tuple[str, ...] = ()
    default_delivery_hosts: tuple[str, ...] = ()
    name: str
    _base_url: str
    _budget_s: float
    _interval_s: float
    _max_interval_s: float
    _sleep: Callable[[float], Awaitable[None]]
    _clock: Callable[[], float]

    def __init__(
        self,
        *,
        polling_hosts: Sequence[str] | None = None,
        delivery_hosts: Sequence[str] | None = None,
        poll_budget_s: float = 300.0,
        poll_interval_s: float = 0.5,
        poll_max_interval_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._budget_s = poll_budget_s
        self._interval_s = poll_interval_s
        self._max_interval_s = max(poll_max_interval_s, poll_interval_s)
        self._sleep = sleep
        self._clock = clock
        self._polling_hosts = tuple(self.default_polling_hosts if polling_hosts is None else polling_hosts)
        self._delivery_hosts = tuple(
            self.default_delivery_hosts if delivery_hosts is None else delivery_hosts
        )
        self._origin = URL(self._base_url).origin()
        self._plain_http_ok = self._origin.scheme == "http"

    def _scheme_ok(self, url: URL) -> bool:
        """https, or plain http only when the upstream itself is configured on http (a local fake)."""
        return url.scheme == "https" or (url.scheme == "http" and self._plain_http_ok)

    def _trusted(self, value: str) -> str:
        """A URL the upstream named for polling: its own origin, or one of its polling hosts."""
        url = absolute_url(value)
        same_origin = url.origin() == self._origin
        if not same_origin and not (self._scheme_ok(url) and host_allowed(url, self._polling_hosts)):
            raise UpstreamError(UNTRUSTED_URL)
        return str(url)

    def _resumed(self, call: UpstreamCall) -> Mapping[str, Any] | None:
        """What an earlier run of this job recorded on this upstream (None: submit anew)."""
        return call.resumed_on(self.name)

    async def _submitted(self, call: UpstreamCall, **record: Any) -> None:
        """Hand what finds the accepted job again to whoever keeps it (a task), before polling."""
        await call.submitted({"upstream": self.name, **record})

    def _poll_deadline(self) -> float:
        """When the polling of jobs submitted now must end."""
        return self._clock() + self._budget_s

    async def _poll_until(self, step: Callable[[], Awaitable[T | None]], deadline: float) -> T:
        """``step()``'s first result that is not None (rules in the module doc)."""
        delay = self._interval_s
        while True:
            result = await step()
            if result is not None:
                return result
            if self._clock() + delay > deadline:
                raise UpstreamJobTimeout(NOT_FINISHED)
            await self._sleep(delay)
            delay = min(delay * 1.5, self._max_interval_s)

    async def _transient_ok(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()``'s result, or None when it failed in a way the next poll may not."""
        try:
            return await call()
        except UpstreamRejected as exc:
            if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                return None
            raise
        except UpstreamError as exc:
            if exc.code in ("upstream_unavailable", "upstream_timeout"):
                return None
            raise


def host_allowed(url: URL, patterns: Sequence[str]) -> bool:
    """Whether ``url``'s host (and port, where a pattern names one) matches a pattern:
    ``host``, ``host:port`` or ``*.domain`` (subdomains only)."""
    host = (url.host or "").lower().rstrip(".")
    if not host:
        return False
    for pattern in patterns:
        name, _, port = pattern.lower().partition(":")
        if port and (not port.isdigit() or url.port != int(port)):
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False


def absolute_url(value: str) -> URL:
    try:
        url = URL(value)
    except (TypeError, ValueError) as exc:
        raise UpstreamError(INVALID_RESPONSE) from exc
    if not url.is_absolute():
        raise UpstreamError(INVALID_RESPONSE)
    return url
