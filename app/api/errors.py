"""The one place where exceptions become OpenAI-shaped error responses."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from app.errors import GatewayError

log = logging.getLogger(__name__)


def error_response(
    status: int,
    message: str,
    *,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def _gateway_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return Response(
        orjson.dumps(exc.to_body()),
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers or None,
    )


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return error_response(
            400,
            f"Missing required parameter: '{param}'.",
            error_type="invalid_request_error",
            param=param,
            code="missing_required_parameter",
        )
    if first.get("type") == "json_invalid":
        return error_response(
            400,
            "We could not parse the JSON body of your request.",
            error_type="invalid_request_error",
            code="invalid_json",
        )
    if first.get("type") == "extra_forbidden":
        return error_response(
            400,
            f"Unknown parameter: '{param}'.",
            error_type="invalid_request_error",
            param=param,
            code="unknown_parameter",
        )
    return error_response(
        400,
        f"Invalid value for '{param}': {first.get('msg', 'invalid')}.",
        error_type="invalid_request_error",
        param=param,
        code="invalid_value",
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
        return error_response(404, message, error_type="invalid_request_error", code="unknown_url")
    if exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}"
        return error_response(405, message, error_type="invalid_request_error", code="method_not_allowed")
    # FastAPI's only own 400 is a body it could not decode (e.g. not UTF-8).
    code = "invalid_json" if exc.status_code == 400 else None
    return error_response(exc.status_code, str(exc.detail), error_type="invalid_request_error", code=code)


async def _unexpected(_: Request, exc: Exception) -> Response:
    # The traceback goes to the log (with the request id); the client gets no internals.
    log.error("unhandled error", exc_info=exc)
    return error_response(
        500,
        "The gateway had an error while processing your request.",
        error_type="api_error",
        code="internal_error",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
