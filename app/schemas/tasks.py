"""The task object of ``GET /v1/tasks/{id}`` (SPEC §6), as the gateway answers it.

The routes build it as a dict (app/tasks/service.py ``view``); these models document it in the
OpenAPI document. ``progress`` beyond ``images``/``images_completed`` is a contract extension
(issue 16): present only on tasks whose request asked for ``partial_images``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.base import ErrorDetail
from app.schemas.images import ImagesResponse


class TaskPreview(BaseModel):
    """The latest partial image received for one image of the task."""

    index: int = Field(description="Which image of the request (0-based, up to n - 1).")
    partial_image_index: int = Field(description="The upstream's partial_image_index of this preview.")
    url: str = Field(description="A signed, expiring link to the preview (like response_format=url).")


class TaskProgress(BaseModel):
    images: int = Field(description="Images the request asked for (n).")
    images_completed: int
    partial_images: int | None = Field(
        default=None, description="Partial images asked for per image; only on tasks that asked."
    )
    partial_images_received: int | None = Field(
        default=None, description="Partial images streamed by the upstream so far, all images together."
    )
    previews: list[TaskPreview] | None = Field(
        default=None, description="At most one per image: the latest partial image received for it."
    )


class ImageTask(BaseModel):
    id: str
    task_id: str
    object: Literal["image.task"] = "image.task"
    status: Literal["queued", "in_progress", "succeeded", "failed", "cancelled"]
    model: str
    endpoint: str
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    progress: TaskProgress
    result: ImagesResponse | None = None
    error: ErrorDetail | None = None


class ImageTaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ImageTask]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


def example() -> dict[str, Any]:
    """A running task with a preview, for the OpenAPI document."""
    return {
        "id": "task_0123456789abcdef0123456789abcdef",
        "task_id": "task_0123456789abcdef0123456789abcdef",
        "object": "image.task",
        "status": "in_progress",
        "model": "gpt-image-1",
        "endpoint": "generations",
        "created_at": 1764650000,
        "started_at": 1764650001,
        "finished_at": None,
        "progress": {
            "images": 1,
            "images_completed": 0,
            "partial_images": 2,
            "partial_images_received": 1,
            "previews": [
                {
                    "index": 0,
                    "partial_image_index": 0,
                    "url": "http://127.0.0.1:8080/v1/files/images/img_0123…cdef.png?expires=1764653600&sig=…",
                }
            ],
        },
    }
