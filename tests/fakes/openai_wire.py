"""Data types and OpenAI wire payloads for the fake OpenAI upstream (see `openai_upstream.py`)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

FaultKind = Literal[
    "status", "delay", "hang", "close", "invalid_json", "stream_cut", "stream_end", "slow_body"
]

DEFAULT_USAGE: dict[str, Any] = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
    "output_tokens": 4160,
    "output_tokens_details": {"text_tokens": 0, "image_tokens": 4160},
    "total_tokens": 4210,
}
DEFAULT_MODELS = (
    "gpt-image-1",
    "gpt-image-1-mini",
    "gpt-image-1.5",
    "dall-e-2",
    "dall-e-3",
    "omni-moderation-latest",
)
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_DEFAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model", "permission_error", None),
    404: ("Not found.", "invalid_request_error", "not_found"),
    429: ("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
}


def default_usage() -> dict[str, Any]:
    return copy.deepcopy(DEFAULT_USAGE)


def openai_error(
    message: str, type: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def default_error(status_code: int) -> dict[str, Any]:
    message, type_, code = _DEFAULT_ERRORS.get(status_code, (f"HTTP {status_code}", "api_error", None))
    return openai_error(message, type_, code)


class RecordedFile(NamedTuple):
    """One uploaded multipart file, exactly as received."""

    field: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it (recorded before faults and auth are applied)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    json: Any  # the parsed JSON body, or None
    form: dict[str, list[str]]  # multipart / urlencoded non-file fields, in arrival order
    files: list[RecordedFile]
    body: bytes  # the raw body for non-form requests (b"" for multipart)
    received_at: float  # time.monotonic() when the request reached the fake

    def field(self, name: str) -> str | None:
        """First value of a form field, else the JSON body's value (as sent), else None."""
        if name in self.form:
            return self.form[name][0]
        if isinstance(self.json, dict):
            value = self.json.get(name)
            return value if value is None or isinstance(value, str) else str(value)
        return None

    def files_for(self, *fields: str) -> list[RecordedFile]:
        """The uploaded files whose field name is one of `fields` (all files when none are given)."""
        return [f for f in self.files if not fields or f.field in fields]

    @property
    def bearer(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None


@dataclass(eq=False)
class Fault:
    """A scripted misbehaviour. Queue it with `fake.enqueue_fault(...)` (consumed by the next `times`
    matching requests) or set it as `fake.always_fail` (fires for every matching request).
    `path` limits it to one request path (e.g. "/v1/images/generations"); `fired` counts firings."""

    kind: FaultKind
    status_code: int = 500
    error: dict[str, Any] | None = None  # full JSON body for `status` (default: OpenAI-shaped by status)
    body: bytes | None = None  # raw body for `status` / `invalid_json`, wins over `error`
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    events_before_cut: int = 1  # `stream_cut` / `stream_end`: SSE events sent before the cut / end
    path: str | None = None
    times: int = 1
    fired: int = 0

    def matches(self, *paths: str) -> bool:
        return self.path is None or self.path in paths

    @classmethod
    def status(
        cls,
        status_code: int = 500,
        message: str | None = None,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
        path: str | None = None,
        times: int = 1,
    ) -> Fault:
        """Answer `status_code` with an OpenAI error body (defaults chosen by status code); `extra` is
        merged into the error object; `retry_after` sets the `retry-after` header (seconds)."""
        body = default_error(status_code)
        err = body["error"]
        err.update(
            {k: v for k, v in {"message": message, "type": type, "code": code}.items() if v is not None}
        )
        if param is not None:
            err["param"] = param
        err.update(extra or {})
        hdrs = dict(headers or {})
        if retry_after is not None:
            hdrs["retry-after"] = f"{retry_after:g}"
        return cls("status", status_code=status_code, error=body, headers=hdrs, path=path, times=times)

    @classmethod
    def moderation_blocked(
        cls, stage: str = "input", categories: tuple[str, ...] = ("violence",), *, path: str | None = None
    ) -> Fault:
        """The upstream's own safety refusal (400 `image_generation_user_error` / `moderation_blocked`)."""
        return cls.status(
            400,
            "Your request was rejected by the safety system.",
            type="image_generation_user_error",
            code="moderation_blocked",
            extra={"moderation_details": {"moderation_stage": stage, "categories": list(categories)}},
            path=path,
        )

    @classmethod
    def delay(cls, seconds: float, *, path: str | None = None, times: int = 1) -> Fault:
        """Wait `seconds` (without blocking other requests), then answer normally."""
        return cls("delay", delay_s=seconds, path=path, times=times)

    @classmethod
    def hang(cls, *, path: str | None = None, times: int = 1) -> Fault:
        """Never answer; ends when the client disconnects or the fake stops (then it drops the connection)."""
        return cls("hang", path=path, times=times)

    @classmethod
    def close(cls, *, path: str | None = None, times: int = 1) -> Fault:
        """Close the TCP connection without sending a single byte of response."""
        return cls("close", path=path, times=times)

    @classmethod
    def invalid_json(cls, body: bytes = b'{"created": 17000, "data": [', *, path: str | None = None) -> Fault:
        """200 `application/json` whose body is not JSON."""
        return cls("invalid_json", status_code=200, body=body, path=path)

    @classmethod
    def stream_cut(cls, events_before_cut: int = 1, *, path: str | None = None) -> Fault:
        """Streams: send `events_before_cut` SSE events, then drop the connection. Non-streaming requests:
        send the 200 headers and half of the JSON body, then drop the connection."""
        return cls("stream_cut", events_before_cut=events_before_cut, path=path)

    @classmethod
    def stream_end(cls, events_before_end: int = 1, *, path: str | None = None) -> Fault:
        """Streams: send `events_before_end` SSE events, then end the response cleanly (no error,
        no `completed` event after them)."""
        return cls("stream_end", events_before_cut=events_before_end, path=path)

    @classmethod
    def slow_body(cls, seconds: float, *, path: str | None = None) -> Fault:
        """Non-streaming answers: send the 200 headers at once, the body `seconds` later."""
        return cls("slow_body", delay_s=seconds, path=path)


def moderation_result(text: str, flag_words: set[str], category: str, has_image: bool) -> dict[str, Any]:
    """One `results[]` entry of `/v1/moderations`: flagged (in `category`) when `text` contains any of
    `flag_words` (case-insensitive substring match)."""
    lowered = text.lower()
    flagged = any(word.lower() in lowered for word in flag_words if word)
    applied = ["text", "image"] if has_image else ["text"]
    return {
        "flagged": flagged,
        "categories": {c: flagged and c == category for c in MODERATION_CATEGORIES},
        "category_scores": {c: 0.97 if flagged and c == category else 0.0001 for c in MODERATION_CATEGORIES},
        "category_applied_input_types": {c: applied for c in MODERATION_CATEGORIES},
    }


def moderation_texts(value: Any) -> tuple[list[str], bool]:
    """The texts to classify (one result each) and whether images were part of the input."""
    if isinstance(value, str):
        return [value], False
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value), False
    parts = value if isinstance(value, list) else []
    texts = [str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    has_image = any(isinstance(p, dict) and p.get("type") == "image_url" for p in parts)
    return [" ".join(texts)], has_image


_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)(/.*)")


def api_path(path: str) -> tuple[str, str | None]:
    """Map Azure-style paths onto the OpenAI ones: returns (OpenAI path, Azure deployment or None)."""
    match = _AZURE_DEPLOYMENT.fullmatch(path)
    if match:
        return "/v1" + match.group(2), match.group(1)
    if path.startswith("/openai/v1/"):
        return path[len("/openai") :], None
    return path, None
