"""Admin API bodies: key management."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.base import StrictWireModel

ModerationPolicy = Literal["default", "strict", "off"]


class ApiKeyCreateRequest(StrictWireModel):
    name: str = Field(min_length=1, max_length=200)
    owner: str | None = Field(default=None, max_length=200)
    # None: every model the gateway serves.
    models: list[str] | None = None
    moderation: ModerationPolicy = "default"
    enabled: bool = True
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None


class ApiKeyUpdateRequest(StrictWireModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    owner: str | None = Field(default=None, max_length=200)
    models: list[str] | None = None
    moderation: ModerationPolicy | None = None
    enabled: bool | None = None
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None


class ApiKeyObject(BaseModel):
    id: str
    object: Literal["gateway.key"] = "gateway.key"
    name: str
    owner: str | None
    prefix: str
    models: list[str] | None
    moderation: str
    enabled: bool
    status: Literal["active", "disabled", "expired", "revoked"]
    created_at: int
    expires_at: int | None
    revoked_at: int | None
    metadata: dict[str, Any] | None


class ApiKeyCreatedResponse(ApiKeyObject):
    """Returned once, at creation: the only time the full key is shown."""

    key: str


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyObject]
