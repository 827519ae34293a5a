"""The request path's own types: what admission takes (drafts) and produces (an admission), and
what a completed synchronous request returns. Kept apart from the service that uses them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.billing.ledger import Hold
from app.billing.limits import LimitGrant
from app.domain.jobs import ImageJob
from app.images.intake.spool import UploadForm


@dataclass(frozen=True, slots=True)
class InputLimits:
    """Bounds on edit inputs, from the ``uploads`` settings."""

    max_pixels: int
    max_edge: int


@dataclass(frozen=True, slots=True)
class ImageOutcome:
    """A completed request: the body to relay and what it cost.

    ``body`` is the upstream's own JSON when nothing had to change it (it is sent byte for byte),
    else the dict to encode.
    """

    body: dict[str, Any] | bytes
    cost_micros: int
    model: str
    upstream: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GenerationDraft:
    """A generation request as it came in, before admission validates it."""

    payload: Any
    request_id: str
    query_response_format: str | None = None


@dataclass(frozen=True, slots=True)
class EditDraft:
    """An edit request as it came in (its files spooled), before admission validates it."""

    form: UploadForm
    request_id: str
    limits: InputLimits
    query_response_format: str | None = None


@dataclass(frozen=True, slots=True)
class VariationDraft:
    """A dall-e-2 variation request (its image spooled), before admission validates it."""

    form: UploadForm
    request_id: str
    limits: InputLimits
    query_response_format: str | None = None


Draft = GenerationDraft | EditDraft | VariationDraft


@dataclass(frozen=True, slots=True)
class Admission:
    """What admission produced: all a request needs to run, now or later as a task.

    ``job`` is validated and at the effective moderation level; ``hold`` is the reservation;
    ``grant`` the rate-limit grant whose concurrency slot a synchronous request holds until it
    ends (None for a task: a queued task holds no slot); ``headers`` the rate-limit headers.
    """

    job: ImageJob
    hold: Hold
    grant: LimitGrant | None
    headers: dict[str, str]
