"""Translate what an upstream does wrong into the gateway's own errors (``app.core.errors``).

Every outbound call uses aiohttp (``app.upstream.client``), and nothing above ``app/upstream`` may
see a transport exception (ARCHITECTURE convention 8), so every call runs inside
``map_aiohttp_errors``, the one mapper. As in httpx's own ``map_httpcore_exceptions``, the most
specific class wins and the original stays as ``__cause__``:

    status error (raise_for_status)  → UpstreamRejected    the upstream's status, type and code (sanitised)
    timeout (connect, read, write,   → UpstreamTimeout     504 upstream_timeout
      pool)
    transport trouble (connect,      → UpstreamUnavailable 502 upstream_unavailable
      reset, truncated or malformed
      answer, proxy, bad URL)
    undecodable body (content-       → UpstreamError       502 upstream_error
      encoding), redirect loop

Transport messages are generic on purpose: exception strings carry the request URL, and the
client must never learn upstream URLs, hosts or keys (SPEC §1.4). An upstream's own error *body* is
worth relaying (status, type, param, code, moderation details), so ``rejected_from_response`` keeps
it, but every string in it goes through ``sanitize`` first. The router (convention 9) reads the
resulting class and status to decide on retry and failover.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import aiohttp
import orjson
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from yarl import URL

from app.core.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable

INVALID_RESPONSE = "The upstream service returned an invalid response."
# Longer messages are cut: an upstream that answers a whole HTML page has nothing useful to say.
_MAX_MESSAGE_CHARS = 2000
_KNOWN_KEYS = frozenset({"message", "type", "param", "code"})
_URL_RE = re.compile(r"https?://[^\s\"'<>()\[\]{}]+", re.IGNORECASE)
# Any `sk-` token, however short or masked (`sk-upstr***3456`, `sk-...3456`, `sk-proj-****`): a
# fragment of a key still identifies it. Not inside a word (`task-1`, `disk-full`).
# A dot belongs to the token only when more of it follows (`sk-...3456`), not a sentence's full stop.
_API_KEY_RE = re.compile(r"(?<![A-Za-z0-9])sk-(?:[A-Za-z0-9_\-*…•]|\.(?=[A-Za-z0-9_\-*.…•]))*")
# Other providers' key shapes, each as a whole or as a masked fragment: Google's ``AIza…`` keys
# (Gemini, Imagen), Standard Webhooks' ``whsec_…`` secrets, Azure's 32 hex characters and BFL's
# UUID keys (Stability's are ``sk-``), and any token with a mask in it (``abcd****wxyz``, ``ab…yz``).
_KEY_SHAPES = (
    re.compile(r"(?<![A-Za-z0-9])(?:AIza|whsec_)(?:[A-Za-z0-9_\-+/=*…•]|\.(?=[A-Za-z0-9_\-*.…•]))*"),
    re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32}(?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z0-9-])[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}(?![A-Za-z0-9-])"),
    re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9_\-]{2,}(?:\*{2,}|…|•+|\.{3})[A-Za-z0-9_\-]{2,}(?![A-Za-z0-9])"),
)
# A run of this many characters of a configured secret identifies it, wherever it appears.
_FRAGMENT = 8
_MASKS = re.compile(r"\*+|…|•+|\.{3,}")
_TOKEN = re.compile(r"[A-Za-z0-9_\-+/=.*…•]{4,}")


@contextmanager
def map_aiohttp_errors(*, secrets: Sequence[str] = ()) -> Iterator[None]:
    """Re-raise aiohttp exceptions from the block as ``app.core.errors`` upstream errors."""
    try:
        yield
    # Before ClientError: aiohttp's own timeouts (connect, sock_read) are ServerTimeoutErrors, which
    # are both; a stalled upload (``multipart``) raises a plain TimeoutError.
    except TimeoutError as exc:
        raise UpstreamTimeout() from exc
    except aiohttp.ClientResponseError as exc:
        # A status line or headers that do not parse arrive as a ClientResponseError with status 400:
        # that is the upstream talking nonsense (httpx: RemoteProtocolError), not a client mistake.
        if isinstance(exc.__cause__, HttpProcessingError) or isinstance(exc, aiohttp.ClientHttpProxyError):
            raise UpstreamUnavailable() from exc
        # Only from raise_for_status(), which adapters do not use; aiohttp has released the body.
        raise rejected_from_response(exc.status, b"", exc.headers or {}, secrets=secrets) from exc
    except aiohttp.ClientPayloadError as exc:
        if isinstance(exc.__cause__, ContentEncodingError):
            raise UpstreamError(INVALID_RESPONSE) from exc
        raise UpstreamUnavailable() from exc  # a body cut short: the connection broke
    except aiohttp.ClientError as exc:  # connect, disconnect, reset, TLS, invalid or non-HTTP URL
        raise UpstreamUnavailable() from exc


def sanitize(message: str, *, secrets: Sequence[str]) -> str:
    """``message`` without URLs, API-key-looking tokens or any of ``secrets`` (key, base URL, host)."""
    # URLs first, so that a secret that is part of a URL takes the whole URL with it.
    message = _URL_RE.sub("[redacted-url]", message)
    message = _API_KEY_RE.sub("sk-***", message)
    for shape in _KEY_SHAPES:
        message = shape.sub("[redacted]", message)
    # Longest first: the host is a substring of the base URL, and removing it first would
    # leave the rest of the URL behind.
    unique = sorted({s for s in secrets if s}, key=len, reverse=True)
    for secret in unique:
        message = re.sub(re.escape(secret), "[redacted]", message, flags=re.IGNORECASE)
    keys = [s.lower() for s in unique if len(s) >= _FRAGMENT and "/" not in s and "." not in s]
    if keys:
        message = _TOKEN.sub(
            lambda m: "[redacted]" if _is_fragment(m.group(0).lower(), keys) else m.group(0), message
        )
    return message


def _is_fragment(token: str, keys: Sequence[str]) -> bool:
    """Whether ``token`` shows part of a secret: ``_FRAGMENT`` characters of it in a row, or a
    masked token (``abcd****wxyz``) whose visible parts of four or more characters are in it."""
    pieces = [p for p in _MASKS.split(token) if p]
    masked = len(pieces) > 1 or _MASKS.search(token) is not None
    for key in keys:
        if any(token[i : i + _FRAGMENT] in key for i in range(len(token) - _FRAGMENT + 1)):
            return True
        if masked and any(len(p) >= 4 and p in key for p in pieces):
            return True
    return False


def upstream_secrets(base_url: str, api_key: str | None) -> tuple[str, ...]:
    """What identifies an upstream in a message: its key, base URL (with and without scheme), host."""
    try:
        host = URL(base_url).host or ""
        port = URL(base_url).explicit_port
    except ValueError:  # not a URL: the text itself is all there is to scrub
        host, port = "", None
    bracketed = f"[{host}]" if ":" in host else host
    bare = base_url.split("://", 1)[-1]
    candidates = (
        api_key,
        base_url,
        base_url.rstrip("/"),
        bare,
        bare.rstrip("/"),
        f"{bracketed}:{port}" if port is not None else bracketed,
        host,
    )
    return tuple(dict.fromkeys(s for s in candidates if s))


def rejected_from_response(
    status: int, body: bytes, headers: Mapping[str, str], *, secrets: Sequence[str]
) -> UpstreamRejected:
    """The ``UpstreamRejected`` for an upstream error answer, its message and details sanitised."""
    if not 400 <= status <= 599:
        status = 502  # a 3xx or odd status is not something a client could act on
    generic = f"The upstream service returned an error (HTTP {status})."
    error = _error_object(body)
    if error is None:
        return UpstreamRejected(
            status, generic, error_type=None, param=None, code=None, retry_after=_retry_after(headers)
        )

    def text(key: str) -> str | None:
        value = error.get(key)
        if isinstance(value, bool) or not isinstance(value, str | int):
            return None
        return sanitize(str(value), secrets=secrets) or None

    message = (text("message") or generic)[:_MAX_MESSAGE_CHARS]
    details = {k: _clean(v, secrets) for k, v in error.items() if k not in _KNOWN_KEYS}
    return UpstreamRejected(
        status,
        message,
        error_type=text("type"),
        param=text("param"),
        code=text("code"),
        details=details,
        retry_after=_retry_after(headers),
    )


def _error_object(body: bytes) -> dict[str, Any] | None:
    """The error object of an OpenAI (``{"error": {...}}``) or Azure-ish body; None if there is none."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):  # some compatible servers answer {"error": "text"}
        return {"message": error}
    if isinstance(parsed.get("message"), str):  # or put the error object at the top level
        return {k: v for k, v in parsed.items() if k in _KNOWN_KEYS}
    return None


def _clean(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` with every string inside it sanitised (for extra keys such as moderation_details)."""
    if isinstance(value, str):
        return sanitize(value, secrets=secrets)
    if isinstance(value, dict):
        return {str(k): _clean(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v, secrets) for v in value]
    return value


def _retry_after(headers: Mapping[str, str]) -> str | None:
    """``retry-after`` as sent, else ``retry-after-ms`` rounded up to whole seconds."""
    lowered = {k.lower(): v for k, v in headers.items()}
    value = lowered.get("retry-after")
    if value:
        return value.strip()[:64]
    try:
        millis = float(lowered.get("retry-after-ms", ""))
    except ValueError:
        return None
    return str(math.ceil(millis / 1000)) if 0 <= millis < 1e9 else None
