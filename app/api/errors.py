"""The one place where exceptions become OpenAI-shaped error responses.

Every handler here turns what it caught into an ``app.core.errors`` exception and answers it with
``error_response``, whose body is ``GatewayError.to_body()`` (built by ``app.core.errors.error_body``).
The ASGI middleware answers its early 401/413 through the same function.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from app.core.errors import (
    GatewayError,
    InternalServerError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    ServiceUnavailableError,
)
from app.db.transient import is_transient

log = logging.getLogger(__name__)


# Client errors a retry of the same request can fix: a timeout, a conflict with a request still
# in flight, a rate limit. Every other 4xx (validation, moderation, 401/403/404, 413, 422) and an
# exhausted quota answer the same however often they are sent.
_RETRYABLE_CLIENT_STATUSES = frozenset({408, 409, 429})


def retry_cannot_help(error: GatewayError) -> bool:
    """Whether the official SDKs should be told not to retry (they retry 408/409/429/5xx)."""
    if error.code == "insufficient_quota" or error.error_type == "insufficient_quota":
        return True
    return 400 <= error.status_code < 500 and error.status_code not in _RETRYABLE_CLIENT_STATUSES


def error_response(error: GatewayError) -> Response:
    """The response for ``error``; also an ASGI app, so middleware can send it before routing."""
    headers = dict(error.headers)
    if retry_cannot_help(error):
        # openai-python and openai-node read this before their own status rules.
        headers.setdefault("x-should-retry", "false")
    return Response(
        orjson.dumps(error.to_body()),
        status_code=error.status_code,
        media_type="application/json",
        headers=headers or None,
    )


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    if exc.upstream:
        # The upstream that failed: for the access log and `x-gateway-upstream`, as on success.
        request.state.upstream = exc.upstream
    return error_response(exc)


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """OpenAI's 400 for the first thing wrong with the request (FastAPI would answer 422)."""
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    kind = first.get("type")
    if kind == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if kind == "json_invalid":
        return InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json")
    if kind == "extra_forbidden":
        return InvalidRequestError(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    return InvalidRequestError(
        f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param, code="invalid_value"
    )


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc))


def http_error(method: str, path: str, exc: HTTPException) -> GatewayError:
    if exc.status_code == 404:
        return NotFoundError(f"Invalid URL ({method} {path})", code="unknown_url")
    if exc.status_code == 405:
        return MethodNotAllowedError(f"Method {method} is not allowed for {path}")
    # FastAPI's only own 400 is a body it could not decode (e.g. not UTF-8); any other status a
    # framework might raise keeps its number, under the client-error type it always had.
    error = InvalidRequestError(str(exc.detail))
    error.code = "invalid_json" if exc.status_code == 400 else None
    error.status_code = exc.status_code
    return error


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(http_error(request.method, request.url.path, exc))


def unexpected_error(exc: BaseException) -> GatewayError:
    """What a client sees for an exception no handler knew: the one mapping, used by the catch-all
    handler and by ``ContainErrorsMiddleware`` alike. A transient database error (saturated or
    restarting: app/db/transient.py) is a 503 worth a retry; anything else is our 500, logged."""
    if is_transient(exc):
        log.warning("database unavailable; answered 503 (%s)", type(exc).__name__)
        return ServiceUnavailableError("The service is temporarily unavailable. Please retry shortly.")
    # The traceback goes to the log (with the request id); the client gets no internals.
    log.error("unhandled error", exc_info=exc)
    return InternalServerError("The gateway had an error while processing your request.")


async def _unexpected(_: Request, exc: Exception) -> Response:
    return error_response(unexpected_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
