"""The served OpenAPI document, corrected to say what the gateway really answers.

FastAPI documents a 422 ``HTTPValidationError`` on every route with parameters, but the gateway
answers invalid input with OpenAI-shaped 400s (app/api/errors.py) and never sends a 422. Clients
generated from the document, and the schema fuzzing in tests/reliability, must see the real error
schema instead; usage reports also answer CSV, which FastAPI cannot infer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas.base import ErrorBody

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
# Statuses every authenticated route can answer; anything else an error may be is under `default`.
COMMON_ERRORS = {
    "400": "Invalid request (OpenAI-shaped error).",
    "401": "Missing, unknown, disabled, revoked or expired key.",
}
CSV_ROUTES = ("/v1/usage", "/admin/usage")


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with the corrected document (built once, on first request)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = corrected(
                get_openapi(title=app.title, version=app.version, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def corrected(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in (
        ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs", {}).items()
    ):
        components[name] = definition
    components["ErrorBody"] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components["ErrorBody"].pop("$defs", None)
    error = {"content": {"application/json": {"schema": ERROR_REF}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/healthz") and not path.startswith("/readyz"):
                for status, description in COMMON_ERRORS.items():
                    responses.setdefault(status, {"description": description, **error})
            responses.setdefault("default", {"description": "Any other error (OpenAI-shaped).", **error})
            if path in CSV_ROUTES and "200" in responses:
                content = responses["200"].setdefault("content", {})
                content["text/csv"] = {"schema": {"type": "string"}}
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
