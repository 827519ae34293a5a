"""Admin API bodies: key management."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, Field

from app.schemas.base import StrictWireModel

ModerationPolicy = Literal["default", "strict", "off"]
# Amounts in the price unit, as a JSON number or a decimal string; exact to 1e-6 (micro-units).
Money = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]
Multiplier = Annotated[Decimal, Field(gt=0, le=1000, decimal_places=6)]


def _not_a_bool(value: Any) -> Any:
    # pydantic's lax mode reads a JSON `true` as the integer 1; the schema says integer (and the
    # fuzzer holds the API to it). Digit strings stay accepted: the console's form sends them.
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    return value


# Stored in 32-bit integer columns (SQLite's and PostgreSQL's INTEGER).
Limit = Annotated[int, BeforeValidator(_not_a_bool), Field(ge=1, le=2**31 - 1)]


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the date-time is out of range") from None


# A moment needs its offset (`Z`, `+02:00`): a naive time would be read in an unknown zone.
Moment = Annotated[AwareDatetime, AfterValidator(_in_utc)]


class _KeyLimits(StrictWireModel):
    # Per-key moderation lists, on top of the global ones (phrases; "{a,b}" alternatives expand).
    moderation_allow: list[str] | None = None
    moderation_block: list[str] | None = None
    quota: Money | None = None
    monthly_quota: Money | None = None
    balance: Money | None = None
    price_multiplier: Multiplier | None = None
    rpm: Limit | None = None
    ipm: Limit | None = None
    concurrency: Limit | None = None
    # Console thumbnails of this key's images: true/false, or null to follow console.thumbnails.
    thumbnails: bool | None = None
    # Asynchronous tasks: waiting in the queue (429 when full), and running at once.
    max_queued_tasks: Limit | None = None
    max_tasks_in_flight: Limit | None = None


class ApiKeyCreateRequest(_KeyLimits):
    name: str = Field(min_length=1, max_length=200)
    owner: str | None = Field(default=None, max_length=200)
    # None: every model the gateway serves.
    models: list[str] | None = None
    moderation: ModerationPolicy = "default"
    enabled: bool = True
    expires_at: Moment | None = None
    metadata: dict[str, Any] | None = None


class ApiKeyUpdateRequest(_KeyLimits):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    owner: str | None = Field(default=None, max_length=200)
    models: list[str] | None = None
    moderation: ModerationPolicy | None = None
    enabled: bool | None = None
    expires_at: Moment | None = None
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
    # Money as exact decimal strings in the price unit; null means "no limit".
    quota: str | None
    monthly_quota: str | None
    balance: str | None
    spent: str
    reserved: str
    price_multiplier: str
    rpm: int | None
    ipm: int | None
    concurrency: int | None
    max_queued_tasks: int | None = None
    max_tasks_in_flight: int | None = None
    moderation_allow: list[str] | None
    moderation_block: list[str] | None
    thumbnails: bool | None = None


class TopUpRequest(StrictWireModel):
    amount: Annotated[Decimal, Field(gt=0, max_digits=18, decimal_places=6)]


class ApiKeyCreatedResponse(ApiKeyObject):
    """Returned once, at creation: the only time the full key is shown."""

    key: str


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyObject]
