"""Base wire models and the OpenAI error body."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import SkipJsonSchema


class WireModel(BaseModel):
    """Client request bodies: unknown fields are kept, because they are forwarded upstream (SPEC §1.1)."""

    model_config = ConfigDict(extra="allow")


class StrictWireModel(BaseModel):
    """Admin bodies: an unknown field is a mistake worth a 400, not something to ignore."""

    model_config = ConfigDict(extra="forbid")


class ModerationDetails(BaseModel):
    """What a ``moderation_blocked`` error says about the block (OpenAI's own field)."""

    model_config = ConfigDict(extra="allow")

    moderation_stage: Literal["input", "output"]
    categories: list[str]


class ErrorDetail(BaseModel):
    """The error object as ``app.core.errors.error_body`` writes it, for the OpenAPI document only.

    ``param`` and ``code`` are always sent, null when unset. Further keys may follow: a moderation
    block's ``moderation_details``, and whatever extra keys an upstream put in an error the gateway
    relays (``UpstreamRejected.details``, sanitised). tests/api/test_error_schema.py validates the
    bodies real requests receive against the served document.
    """

    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None
    code: str | None
    moderation_details: ModerationDetails | SkipJsonSchema[None] = None


class ErrorBody(BaseModel):
    """Every error answer's body, and the ``error`` event of a stream without its ``type``."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
