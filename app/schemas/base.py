"""Base wire models and the OpenAI error body."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """Client request bodies: unknown fields are kept, because they are forwarded upstream (SPEC §1.1)."""

    model_config = ConfigDict(extra="allow")


class StrictWireModel(BaseModel):
    """Admin bodies: an unknown field is a mistake worth a 400, not something to ignore."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
