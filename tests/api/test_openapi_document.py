"""The served OpenAPI document describes the errors and formats the gateway really sends."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from app.main import create_app
from tests.conftest import LOCAL_UPSTREAM, make_settings


def document() -> dict[str, Any]:
    app = create_app(make_settings(Path(tempfile.gettempdir()) / "unused", [LOCAL_UPSTREAM]))
    return app.openapi()


def test_no_route_documents_a_422_and_errors_are_openai_shaped() -> None:
    doc = document()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            default = responses["default"]["content"]["application/json"]["schema"]
            assert default == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)


def test_usage_reports_declare_csv() -> None:
    doc = document()
    for path in ("/v1/usage", "/admin/usage"):
        assert "text/csv" in doc["paths"][path]["get"]["responses"]["200"]["content"]


def test_the_task_object_documents_its_progress_and_previews() -> None:
    doc = document()
    task = doc["paths"]["/v1/tasks/{task_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert task["schema"] == {"$ref": "#/components/schemas/ImageTask"}
    progress = doc["components"]["schemas"]["TaskProgress"]["properties"]
    assert {"images", "images_completed", "partial_images", "partial_images_received", "previews"} <= set(
        progress
    )
    preview = doc["components"]["schemas"]["TaskPreview"]
    assert set(preview["required"]) == {"index", "partial_image_index", "url"}
    events = doc["paths"]["/v1/tasks/{task_id}/events"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in events
