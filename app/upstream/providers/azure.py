"""Adapter for Azure OpenAI: the OpenAI Images wire format, addressed and authenticated the Azure way.

    POST {endpoint}/openai/deployments/{deployment}/images/{generations|edits}?api-version={version}
    api-key: <key>

Everything else (JSON bodies, multipart edits from the spool, SSE relay, the connection pool,
transport error mapping, scrubbing) is ``OpenAICompatProvider``'s. What differs:

- The configured ``upstream_model`` is the *deployment* name; it goes in the path, and ``model`` is
  left out of the body, as Azure's ``CreateImageRequest`` has no such field (the deployment decides).
- ``base_url`` is the resource endpoint (``https://my-resource.openai.azure.com``); a trailing ``/`` or
  ``/openai`` is tolerated. ``api_version`` defaults to ``DEFAULT_API_VERSION``.
- Azure's error bodies are turned into OpenAI's (``openai_shaped``):

    Azure answer                                     relayed as
    code content_filter / contentFilter /            400 image_generation_user_error moderation_blocked,
      content_policy_violation, or inner_error          moderation_details {moderation_stage, categories}
      code ResponsibleAIPolicyViolation                 (categories: content_filter_results filtered: true)
    404 (DeploymentNotFound, unknown api-version,    502 upstream_error: the gateway's configuration is
      any route) or code OperationNotSupported          wrong, not the request, so the router fails over
    429                                              429, type rate_limit_error (unless given) and code
                                                        rate_limit_exceeded (insufficient_quota is kept)
    anything else                                    status, type and code kept; a null type becomes
                                                        invalid_request_error (4xx) or api_error (5xx)

  Azure-only keys (``inner_error``, ``innererror``, ``status``, ``details``, ``target``) are dropped, so
  no revised prompt, blocklist id or filter severity reaches the client. A 429 without ``retry-after``
  or ``retry-after-ms`` takes its wait from ``x-ratelimit-reset-requests`` / ``-tokens``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from app.core.errors import UpstreamError, UpstreamRejected
from app.domain.jobs import ProviderEvent
from app.upstream.base import ImageProvider
from app.upstream.config import (
    KindSettings,
    ProviderKind,
    UpstreamSettings,
    common_options,
    register_kind,
)
from app.upstream.errors import rejected_from_response
from app.upstream.providers.openai_compat import OpenAICompatProvider

# The first version serving gpt-image-1 generations and edits; override with `api_version`.
DEFAULT_API_VERSION = "2025-04-01-preview"
NOT_CONFIGURED = "The upstream service is not configured to serve this model."

_CONTENT_FILTER_CODES = frozenset(
    {"contentfilter", "contentpolicyviolation", "responsibleaipolicyviolation", "moderationblocked"}
)
_CONFIGURATION_CODES = frozenset({"deploymentnotfound", "operationnotsupported"})
_AZURE_ONLY_KEYS = frozenset({"inner_error", "innererror", "status", "details", "target"})
# Azure's filter names where they differ from OpenAI's moderation categories.
_CATEGORY_NAMES = {"self_harm": "self-harm"}
_OUTPUT_STAGE = re.compile(r"\bgenerated image\b|\boutput\b", re.IGNORECASE)
_AZURE_HOST_SUFFIX = ".azure.com"
# Go-style durations as OpenAI sends them in x-ratelimit-reset-*: "1s", "6m0s", "250ms", or bare seconds.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class AzureOpenAIProvider(OpenAICompatProvider):
    """An ``ImageProvider`` over one Azure OpenAI resource; each upstream model is a deployment."""

    _omitted_fields = frozenset({"model"})

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        api_version: str | None = None,
        deployments: Sequence[str] = (),
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_connections: int | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """``deployments``: deployment names that differ from the public model names; they are
        internal names (SPEC §1.4), so relayed messages are scrubbed of them like the key and host."""
        super().__init__(
            name=name,
            base_url=resource_endpoint(base_url),
            api_key=api_key,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            session=session,
        )
        self._api_version = api_version or DEFAULT_API_VERSION
        host = URL(self._base_url).host or ""
        # The resource name (first label of *.openai.azure.com) identifies the customer's account.
        resource = host.split(".", 1)[0] if host.endswith(_AZURE_HOST_SUFFIX) else ""
        self._transport.scrub_also([resource, *deployments])

    def _url(self, path: str) -> str:
        """``{endpoint}/openai{path}?api-version=…``; also what ``probe`` calls (``/openai/models``)."""
        return f"{self._base_url}/openai{path}?{urlencode({'api-version': self._api_version})}"

    def _images_url(self, endpoint: str, upstream_model: str) -> str:
        return self._url(f"/deployments/{quote(upstream_model, safe='')}/images/{endpoint}")

    def _headers(self, *, request_id: str) -> dict[str, str]:
        """Azure's ``api-key`` header in place of a bearer token."""
        headers = super()._headers(request_id=request_id)
        headers.pop("authorization", None)
        if self._api_key:
            headers["api-key"] = self._api_key
        return headers

    def _raise_for_status(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        if 200 <= status < 300:
            return
        rejected = rejected_from_response(
            status, body, with_reset_retry_after(headers), secrets=self._secrets
        )
        raise openai_shaped(rejected)

    def _event(self, name: str, data: bytes) -> ProviderEvent | None:
        """An ``error`` event is mapped like an error answer (a content filter mid-stream, say)."""
        try:
            return super()._event(name, data)
        except UpstreamRejected as exc:
            raise openai_shaped(exc) from exc


def resource_endpoint(base_url: str) -> str:
    """The resource endpoint without a trailing ``/`` or ``/openai``, whichever way it was configured."""
    url = base_url.rstrip("/")
    if url.lower().endswith("/openai"):
        url = url[: -len("/openai")]
    return url


def openai_shaped(error: UpstreamRejected) -> UpstreamError:
    """The OpenAI-shaped error for an Azure error answer (table in the module docstring).

    Works on the already sanitised ``UpstreamRejected``: Azure's extra keys arrive in ``details``.
    """
    inner = error.details.get("inner_error") or error.details.get("innererror")
    inner = inner if isinstance(inner, Mapping) else {}
    code = _normalised(error.code)
    if code in _CONTENT_FILTER_CODES or _normalised(inner.get("code")) in _CONTENT_FILTER_CODES:
        return _moderation_blocked(error, inner)
    if error.status_code == 404 or code in _CONFIGURATION_CODES:
        failure = UpstreamError(NOT_CONFIGURED)
        failure.upstream = error.upstream
        return failure
    details = {k: v for k, v in error.details.items() if k not in _AZURE_ONLY_KEYS}
    error_type: str | None = error.error_type
    relayed_code = error.code
    if error.status_code == 429 and code != "insufficientquota":
        relayed_code = "rate_limit_exceeded"
        error_type = error_type if error_type != "invalid_request_error" else "rate_limit_error"
    return _rejected(error, error.status_code, error_type, error.param, relayed_code, details)


def _moderation_blocked(error: UpstreamRejected, inner: Mapping[str, Any]) -> UpstreamRejected:
    given = error.details.get("moderation_details")
    given = given if isinstance(given, Mapping) else {}
    stage = given.get("moderation_stage")
    if stage not in ("input", "output"):
        stage = "output" if _OUTPUT_STAGE.search(error.message) else "input"
    results = inner.get("content_filter_results") or inner.get("content_filter_result")
    categories = given.get("categories")
    if not isinstance(categories, list):
        categories = _filtered_categories(results)
    details = {"moderation_details": {"moderation_stage": stage, "categories": categories}}
    return _rejected(error, 400, "image_generation_user_error", None, "moderation_blocked", details)


def _filtered_categories(results: Any) -> list[str]:
    """The filters that blocked, OpenAI-named; severities and blocklist ids are not relayed."""
    if not isinstance(results, Mapping):
        return []
    return [
        _CATEGORY_NAMES.get(str(name), str(name))
        for name, verdict in results.items()
        if isinstance(verdict, Mapping) and verdict.get("filtered") is True
    ]


def _rejected(
    error: UpstreamRejected,
    status: int,
    error_type: str | None,
    param: str | None,
    code: str | None,
    details: dict[str, Any],
) -> UpstreamRejected:
    mapped = UpstreamRejected(
        status,
        error.message,
        error_type=error_type,
        param=param,
        code=code,
        details=details,
        retry_after=error.retry_after,
    )
    mapped.upstream = error.upstream
    return mapped


def _normalised(code: Any) -> str:
    """``content_filter``, ``contentFilter`` and ``ContentFilter`` alike: Azure is not consistent."""
    return str(code).replace("_", "").lower() if isinstance(code, str) else ""


def with_reset_retry_after(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` plus a ``retry-after`` from ``x-ratelimit-reset-*`` when no retry header is there.

    The longer of the two resets is used: which limit was hit is not said, and waiting for the longer
    one never comes back too early. Rounded up to whole seconds, like ``retry-after-ms``.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    if "retry-after" in lowered or "retry-after-ms" in lowered:
        return headers
    resets = [
        parse_duration(lowered.get(name))
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
    ]
    seconds = max((s for s in resets if s is not None), default=None)
    if seconds is None:
        return headers
    return {**lowered, "retry-after": str(math.ceil(seconds))}


def parse_duration(value: str | None) -> float | None:
    """Seconds from ``"12"``, ``"1.5"``, ``"6m0s"``, ``"250ms"``; None for anything else.

    Hand-written: the format is Go's ``time.Duration`` string, which no stdlib parser reads, and the
    whole grammar needed here is one regular expression.
    """
    text = (value or "").strip().lower()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    return seconds if math.isfinite(seconds) and 0 <= seconds < 1e9 else None


class AzureSettings(KindSettings):
    """Azure's own setting: the REST ``api-version`` (None: ``DEFAULT_API_VERSION``)."""

    api_version: str | None = None


def _build(upstream: UpstreamSettings) -> ImageProvider:
    return AzureOpenAIProvider(
        base_url=upstream.base_url or "",
        api_version=upstream.options_as(AzureSettings).api_version,
        # Deployment names other than the public ones are internal and scrubbed from messages.
        deployments=[
            m.upstream_model
            for m in upstream.models
            if not isinstance(m, str) and m.upstream_model and m.upstream_model != m.name
        ],
        **common_options(upstream),
    )


register_kind(
    ProviderKind(
        name="azure",
        build=_build,
        serves="unclaimed",
        base_url_required=True,
        follows_retirements=True,
        settings=AzureSettings,
    )
)
