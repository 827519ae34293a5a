"""The gateway's exception tree. Every error a client can see is one of these.

Each class fixes the HTTP status, the OpenAI error ``type`` and the default ``code``.
``error_body`` is the one function that builds the ``{"error": {...}}`` body, whoever sends it: the
exception handlers and the ASGI middleware (``app/api/errors.py``), the SSE ``error`` event
(``app/api/streaming.py``) and a failed task's stored error. The OpenAPI document's ``ErrorBody``
(``app/schemas/base.py``) describes that body, and tests/api/test_error_schema.py holds the two together.

    GatewayError                       500 api_error (the base; a bare one is a gateway fault)
    ├── InternalServerError            500 api_error internal_error (no internals in the message)
    ├── StorageUnavailableError        503 api_error storage_unavailable (the object store failed;
    │                                  retry-after)
    ├── InvalidRequestError            400 invalid_request_error (param set, code varies)
    │   ├── ModelNotFoundError         400 invalid_value, param "model"
    │   ├── InvalidJSONError           400 invalid_json
    │   └── IdempotencyKeyReusedError  422 idempotency_key_reused (same key, another request)
    ├── IdempotencyConflictError       409 idempotency_key_in_use (the first is still submitting)
    ├── ModerationBlockedError         400 image_generation_user_error moderation_blocked (with
    │                                  OpenAI's moderation_details: stage and categories)
    ├── AuthenticationError            401 invalid_api_key
    ├── PermissionDeniedError          403 permission_error
    │   └── ModelNotAllowedError       403 model_not_allowed
    ├── NotFoundError                  404 not_found
    │   └── ModelRetiredError          404 model_not_found, param "model" (date and replacement)
    ├── MethodNotAllowedError          405 method_not_allowed
    ├── RequestTimeoutError            408 request_timeout
    ├── PayloadTooLargeError           413 payload_too_large
    ├── QuotaExceededError             429 insufficient_quota
    ├── RateLimitError                 429 rate_limit_error rate_limit_exceeded (retry-after, and
    │                                  x-should-retry: false when waiting cannot help)
    ├── ImageStoreError                500 api_error image_store_failed (the upstream answered and
    │                                  was billed, but its images could not be stored; not retried)
    ├── LedgerUnavailableError         503 api_error ledger_unavailable (the database refused a
    │                                  settlement for longer than a request waits; it is kept and
    │                                  retried until it is written)
    ├── UpstreamJobTimeout             504 api_error upstream_timeout (a submitted provider job
    │                                  never finished: not retried, which would submit it twice)
    ├── UpstreamError                  502 api_error upstream_error
    │   ├── UpstreamUnavailable        502 upstream_unavailable (connect failure) / 503 (no upstream)
    │   │   ├── UpstreamBusy           429 rate_limit_error / 503: every upstream at max_concurrency
    │   │   └── ModerationUnavailableError  503 moderation_unavailable (fail-closed moderation
    │   │                              model did not answer: retryable, nothing found wrong)
    │   ├── UpstreamTimeout            504 upstream_timeout
    │   └── UpstreamRejected           the upstream's own status, type and code, message sanitised
    └── ServiceUnavailableError        503 api_error service_unavailable (retry-after): the
                                       gateway's database is out of reach for now

Domain code raises these and never an HTTP framework exception, so use-cases stay framework-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

ModerationStage = Literal["input", "output"]


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    """The OpenAI error object, ``{"error": {"message", "type", "param", "code"}}``: the only place
    it is written. ``param`` and ``code`` are always present (null when unset), as OpenAI sends them;
    subclasses may add keys beside them (``moderation_details``, an upstream's own extras)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class GatewayError(Exception):
    """Base of every error the gateway answers with an OpenAI-shaped body."""

    status_code: int = 500
    error_type: str = "api_error"
    default_code: str | None = None
    # Name of the upstream that produced this error, when one did (for the ledger and logs only).
    upstream: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def to_body(self) -> dict[str, Any]:
        """The OpenAI error object, ``{"error": {...}}``."""
        return error_body(self.message, self.error_type, self.param, self.code)


class InternalServerError(GatewayError):
    """Something failed inside the gateway; the traceback goes to the log, never to the client."""

    default_code = "internal_error"


class StorageUnavailableError(GatewayError):
    """The object store did not answer (after boto's own retries): nothing was lost, try again."""

    status_code = 503
    default_code = "storage_unavailable"

    def __init__(self, message: str = "The image store is unavailable; please retry later.") -> None:
        super().__init__(message, headers={"retry-after": "1"})


class InvalidRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class ModelNotFoundError(InvalidRequestError):
    def __init__(self, model: str, available: list[str]) -> None:
        listed = ", ".join(available) if available else "none"
        super().__init__(
            f"The model '{model}' does not exist or is not served here. Valid models: {listed}.",
            param="model",
            code="invalid_value",
        )


class InvalidJSONError(InvalidRequestError):
    default_code = "invalid_json"

    def __init__(self, detail: str = "") -> None:
        suffix = f" ({detail})" if detail else ""
        super().__init__(
            "We could not parse the JSON body of your request. The request body must be a JSON object"
            + suffix
            + ".",
        )


class ModerationBlockedError(GatewayError):
    """400 ``image_generation_user_error`` / ``moderation_blocked``, with OpenAI's
    ``moderation_details`` object inside the error, as the official API answers a refused prompt."""

    status_code = 400
    error_type = "image_generation_user_error"
    default_code = "moderation_blocked"

    def __init__(
        self, categories: Sequence[str], *, stage: ModerationStage = "input", message: str | None = None
    ) -> None:
        super().__init__(
            message
            or "Your request was rejected by the safety system. "
            "Your prompt or images may contain content that is not allowed."
        )
        self.categories = tuple(categories)
        self.stage: ModerationStage = stage

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"]["moderation_details"] = {
            "moderation_stage": self.stage,
            "categories": list(self.categories),
        }
        return body


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class ModelNotAllowedError(PermissionDeniedError):
    default_code = "model_not_allowed"

    def __init__(self, model: str) -> None:
        super().__init__(f"This API key is not allowed to use the model '{model}'.", param="model")


class NotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelRetiredError(NotFoundError):
    """OpenAI's answer for a model past its retirement date, before anything is reserved."""

    default_code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class MethodNotAllowedError(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeoutError(GatewayError):
    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLargeError(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class QuotaExceededError(GatewayError):
    status_code = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class RateLimitError(GatewayError):
    """429: the key is over one of its per-minute or concurrency limits."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        headers: Mapping[str, str] | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message, headers=dict(headers or {}))
        self.retry_after_s = retry_after_s
        micros = round(retry_after_s * 1_000_000)
        # Rounded up: a client that waits the hint must find the window open.
        self.headers["retry-after"] = str(max(1, -(-micros // 1_000_000)))
        self.headers["retry-after-ms"] = str(max(1, -(-micros // 1000)))
        if not retryable:
            # The official SDKs read this before retrying a 429; waiting cannot help this request.
            self.headers["x-should-retry"] = "false"


class ImageStoreError(GatewayError):
    """The upstream made (and billed) the images, but the image store could not keep them.

    The request is charged (the upstream did the work), so ``x-should-retry: false`` keeps the
    SDKs from silently running, and paying for, it again: retrying is the client's decision."""

    status_code = 500
    error_type = "api_error"
    default_code = "image_store_failed"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers = {"x-should-retry": "false", **self.headers}


class LedgerUnavailableError(GatewayError):
    """A settlement could not be written within a request's patience (the database is full or
    down). The charge is not dropped: the process keeps retrying it until it is written. Not
    retried by the SDKs, since the upstream's work is already to be charged."""

    status_code = 503
    error_type = "api_error"
    default_code = "ledger_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers = {"x-should-retry": "false", **self.headers}


class UpstreamJobTimeout(GatewayError):
    """A job the upstream accepted (FLUX) did not finish within the polling budget.

    Deliberately not an ``UpstreamError``: those are retried and failed over, and a retry would
    submit the job again while the first one may still finish, and be billed, upstream.
    """

    status_code = 504
    error_type = "api_error"
    default_code = "upstream_timeout"


class UpstreamError(GatewayError):
    """No upstream produced a usable answer."""

    status_code = 502
    error_type = "api_error"
    default_code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    default_code = "upstream_unavailable"

    def __init__(self, message: str = "The upstream service is unavailable.", *, status: int = 502) -> None:
        super().__init__(message)
        self.status_code = status


class UpstreamBusy(UpstreamUnavailable):
    """Every candidate upstream is at its ``max_concurrency`` and no slot freed up within the
    configured wait. Not the upstream's fault, so it never counts against its circuit breaker."""

    def __init__(self, message: str, *, status: int, retry_after_s: int) -> None:
        super().__init__(message, status=status)
        self.error_type = "rate_limit_error" if status == 429 else "api_error"
        self.code = "rate_limit_exceeded" if status == 429 else "upstream_unavailable"
        self.headers["retry-after"] = str(max(1, retry_after_s))


class ModerationUnavailableError(UpstreamUnavailable):
    """The upstream moderation model failed and the policy is fail-closed: 503, retryable.

    Not a ``moderation_blocked``: nothing was found wrong with the request, it could not be checked."""

    default_code = "moderation_unavailable"

    def __init__(self) -> None:
        super().__init__("The moderation service is unavailable; please retry later.", status=503)


class UpstreamTimeout(UpstreamError):
    status_code = 504
    default_code = "upstream_timeout"

    def __init__(self, message: str = "The upstream service did not answer in time.") -> None:
        super().__init__(message)


class UpstreamRejected(UpstreamError):
    """The upstream answered with an error status; relayed with its own status, type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None,
        param: str | None,
        code: str | None,
        details: dict[str, Any] | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status_code = status
        self.error_type = error_type or ("api_error" if status >= 500 else "invalid_request_error")
        self.details = details or {}
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers["retry-after"] = retry_after

    @property
    def retryable(self) -> bool:
        """429 and 5xx may succeed elsewhere; other 4xx are the client's fault."""
        return self.status_code == 429 or self.status_code >= 500

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"].update(self.details)
        return body


class IdempotencyKeyReusedError(InvalidRequestError):
    """An ``Idempotency-Key`` already used with a different request (the IETF draft's 422)."""

    status_code = 422
    default_code = "idempotency_key_reused"


class IdempotencyConflictError(GatewayError):
    """The first request with this ``Idempotency-Key`` is still being submitted (409; retry)."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "idempotency_key_in_use"


class ServiceUnavailableError(GatewayError):
    """503 api_error service_unavailable, with ``retry-after``: the gateway's own database could
    not be reached in time (too many clients, a restart, a dropped connection; app/db/transient.py).
    Nothing was charged for the request; trying again shortly is expected to work."""

    status_code = 503
    default_code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.headers["retry-after"] = str(max(1, retry_after_s))
