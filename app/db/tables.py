"""SQLAlchemy tables. Row types only: conversions to wire or domain types live with their callers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, Text, TypeDecorator, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, also on SQLite, which stores datetimes naive."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


# SQLite only auto-increments INTEGER PRIMARY KEY, so the 64-bit id is INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str | None] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(20))
    # None means every model of the catalog.
    models: Mapped[list[str] | None] = mapped_column(JSON)
    moderation: Mapped[str] = mapped_column(String(20), default="default")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    # Money, in integer micro-units of the price unit. None means "no limit of this kind".
    quota_micros: Mapped[int | None] = mapped_column(BigInteger)
    monthly_quota_micros: Mapped[int | None] = mapped_column(BigInteger)
    balance_micros: Mapped[int | None] = mapped_column(BigInteger)
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Charges are multiplied by this / 1e6 (1_000_000 = list price).
    price_multiplier_ppm: Mapped[int] = mapped_column(Integer, default=1_000_000, server_default="1000000")
    rpm: Mapped[int | None] = mapped_column(Integer)
    ipm: Mapped[int | None] = mapped_column(Integer)
    concurrency: Mapped[int | None] = mapped_column(Integer)
    # Asynchronous tasks: how many may wait in the queue, and how many may run at once (None: no cap).
    max_queued_tasks: Mapped[int | None] = mapped_column(Integer)
    max_tasks_in_flight: Mapped[int | None] = mapped_column(Integer)
    # Per-key moderation lists, on top of the global ones.
    moderation_allow: Mapped[list[str] | None] = mapped_column(JSON)
    moderation_block: Mapped[list[str] | None] = mapped_column(JSON)
    # Console thumbnails for this key's images: None follows console.thumbnails.
    thumbnails: Mapped[bool | None] = mapped_column(Boolean)


class KeyPeriod(Base):
    """Spend of one key in one calendar month (UTC), for monthly quotas."""

    __tablename__ = "key_periods"

    key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    period: Mapped[str] = mapped_column(String(7), primary_key=True)  # "2026-11"
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0)


class Reservation(Base):
    """Money held for a request in flight; removed when the request settles.

    A row that outlives ``expires_at`` belongs to a request whose process died: the reconciler
    releases it, so a crash never leaves a key's credit locked. A queued or running task's hold is
    the exception: it lives as long as the task (``tasks.hold_id``), whatever ``expires_at`` says.
    """

    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40), index=True)
    period: Mapped[str] = mapped_column(String(7))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    request_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class LedgerEntry(Base):
    """One row per request that reached an upstream: what it used and what it cost."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_key_created", "key_id", "created_at"),
        Index("ix_ledger_created", "created_at"),
        Index("ix_ledger_batch", "batch_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(100))
    upstream: Mapped[str | None] = mapped_column(String(100))
    endpoint: Mapped[str] = mapped_column(String(20))
    # succeeded | failed | cancelled | interrupted
    status: Mapped[str] = mapped_column(String(20))
    images: Mapped[int] = mapped_column(Integer, default=0)
    text_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    image_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    text_output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    image_output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Integer micro-units of the price unit; never a float.
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(100))
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The request's hold, and what the charge exceeded it by (the upstream billed more than the
    # worst case the gateway reserved; README "Metering and billing").
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    overrun_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # A task cut off by its worker's death after its upstream call was dispatched costs the
    # tenant nothing (status ``interrupted``), but the upstream may have done and billed the
    # work: this is that possible cost, the request's reservation (an upper bound, estimated).
    operator_cost_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # SVG output: the author model's own tokens (`svg_usage`) and their cost, which is part of
    # cost_micros and recorded apart from the image's.
    svg_model: Mapped[str | None] = mapped_column(String(100))
    svg_input_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    svg_output_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    svg_reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    svg_cost_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The batch this request was a line of (issue 27): set by the batch runner once the line's task
    # finished, so /admin/usage can group by batch. None for requests outside a batch.
    batch_id: Mapped[str | None] = mapped_column(String(40))


# A task that is queued or running (its lease may have lapsed): the partial index ix_tasks_runnable
# covers only these, and the claim repeats this exact predicate so SQLite can use it.
RUNNABLE_STATUSES = "status IN ('queued', 'in_progress')"


class Task(Base):
    """An asynchronous image request: what to run, who leases it, and how it ended.

    ``spec`` holds the request as submitted (re-validated when it runs); ``result`` the response
    with images referenced by their names in the image store, rendered as URLs or base64 on read.
    """

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_claim", "status", "lease_until"),
        Index("ix_tasks_key_created", "key_id", "created_at"),
        Index("ix_tasks_created", "created_at"),
        Index("ux_tasks_idempotency", "key_id", "idempotency_key", unique=True),
        # The reconciler asks whether a live task owns a hold (app/billing/ledger.py).
        Index("ix_tasks_hold", "hold_id"),
        # The claim ranks the runnable tasks of each key by age (app/tasks/statements.py): this
        # index hands them over in that order and never reads finished history (0019).
        Index(
            "ix_tasks_runnable",
            "key_id",
            "created_at",
            "id",
            sqlite_where=text(RUNNABLE_STATUSES),
            postgresql_where=text(RUNNABLE_STATUSES),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40))
    request_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(20))
    model: Mapped[str] = mapped_column(String(100))
    # queued | in_progress | succeeded | failed
    status: Mapped[str] = mapped_column(String(20))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    response_format: Mapped[str] = mapped_column(String(20))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 of the request first submitted with ``idempotency_key``: a reuse with another
    # request is refused (422) instead of answered with this task.
    idempotency_fingerprint: Mapped[str | None] = mapped_column(String(64))
    hold_id: Mapped[str | None] = mapped_column(String(40))
    hold_period: Mapped[str | None] = mapped_column(String(7))
    hold_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(80))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set just before the upstream is called: a task whose worker died after this point is not
    # run again (the upstream may have done the work), so it never runs to completion twice.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # For upstreams that accept a job and are polled for it (FLUX): the jobs accepted for this task
    # ({"upstream", "jobs": [{"id", "polling_url"}]}), so a worker taking over after a crash polls
    # them instead of submitting again.
    provider_job: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Written by the worker as streamed partial images arrive (an async request that asked for
    # ``partial_images``): counts and the stored preview of each image (app/tasks/progress.py).
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookEndpoint(Base):
    """Where a key's task events go: set by the admin, never by a client (the gateway only ever
    calls URLs an operator entered). ``secret`` signs deliveries (Standard Webhooks, HMAC-SHA256);
    it has to be kept usable, not hashed, and is shown only when created or rotated."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_key", "key_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(String(200))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction that finished its task,
    and retried with backoff until delivered or past its retry period."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_created", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the `webhook-id` header
    endpoint_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))
    task_id: Mapped[str] = mapped_column(String(40), index=True)
    event_type: Mapped[str] = mapped_column(String(60))
    # The task as it ended (id, status, error), sent if the task itself is gone by delivery time.
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)
    # pending | delivered | failed
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    give_up_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ModerationEvent(Base):
    """One blocked request, for the audit trail (``GET /admin/moderation/events``)."""

    __tablename__ = "moderation_events"
    __table_args__ = (Index("ix_moderation_key_created", "key_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(40))
    stage: Mapped[str] = mapped_column(String(10))
    level: Mapped[str] = mapped_column(String(10))
    checker: Mapped[str] = mapped_column(String(40))
    categories: Mapped[list[str]] = mapped_column(JSON)
    rules: Mapped[list[str]] = mapped_column(JSON)
    prompt_sha256: Mapped[str | None] = mapped_column(String(64))
    # Only with moderation.store_prompts: true.
    prompt: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class ConsoleSession(Base):
    """A signed-in console browser. The cookie holds a random token; only its SHA-256 is here."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # operator | tenant
    role: Mapped[str] = mapped_column(String(10))
    # The tenant's key (None for the operator).
    key_id: Mapped[str | None] = mapped_column(String(40))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class RequestThumbnail(Base):
    """A small WebP of one generated image, for the console's request log (kept like images)."""

    __tablename__ = "request_thumbnails"
    __table_args__ = (Index("ix_thumbnails_request", "request_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(40))
    # The image store's name for the WebP.
    image: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer, default=0)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class Lease(Base):
    """Who runs a cluster-wide chore (app/db/leases.py): one row per chore, held until
    ``expires_at`` and renewed by its holder; anyone may take it once it has lapsed."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(120))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StoredFile(Base):
    """A file uploaded through ``POST /v1/files`` (or written by a batch): its bytes live in the
    object store under ``blob``; this row is its metadata and its owner."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_key_created", "key_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40))
    # batch (uploaded) | batch_output (written by a batch: its output and error files)
    purpose: Mapped[str] = mapped_column(String(20))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    blob: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Batch(Base):
    """A batch of image requests (OpenAI's Batch API): its state, counts and files."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_key_created", "key_id", "created_at"),
        # The operator's console list, newest first over all keys.
        Index("ix_batches_created", "created_at", "id"),
        Index("ix_batches_status", "status", "lease_until"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(40))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(10))
    # validating | in_progress | finalizing | completed | failed | expired | cancelling | cancelled
    status: Mapped[str] = mapped_column(String(20))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    completed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Where the creating client reached the gateway: the base of the output file's image links.
    base_url: Mapped[str] = mapped_column(String(300))
    # The process advancing the batch, and until when (another takes over once it lapses).
    worker: Mapped[str | None] = mapped_column(String(80))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BatchLine(Base):
    """One line of a batch: its request, the task that runs it, and how it ended.

    ``state``: pending (not yet admitted) | queued (a task runs it: ``task_id``) | ok | error.
    A line that ended without a task (refused at admission, expired, cancelled) keeps its answer
    in ``error`` (status code and OpenAI error body).
    """

    __tablename__ = "batch_lines"
    __table_args__ = (Index("ix_batch_lines_state", "batch_id", "state", "line"),)

    batch_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(10))
    task_id: Mapped[str | None] = mapped_column(String(40))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A line sent to an upstream's own Batch API (state ``upstream``; app/batches/forward.py): its
    # upstream, admitted job, hold and price, and once done its stored answer (images by name).
    forward: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class UpstreamBatch(Base):
    """The lines of one gateway batch sent as one batch to one upstream's Batch API: its file and
    batch ids there, recorded before they are waited on, so a restart polls it and never sends it
    again (app/batches/forward.py). The batch's row with an empty ``upstream`` records the scan
    that picks its lines out (``polls``: the last line it looked at)."""

    __tablename__ = "upstream_batches"

    batch_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    upstream: Mapped[str] = mapped_column(String(100), primary_key=True)
    # admitting | uploading | creating | running | collecting | done
    state: Mapped[str] = mapped_column(String(20))
    input_file_id: Mapped[str | None] = mapped_column(String(100))
    upstream_batch_id: Mapped[str | None] = mapped_column(String(100))
    upstream_status: Mapped[str | None] = mapped_column(String(20))
    output_file_id: Mapped[str | None] = mapped_column(String(100))
    error_file_id: Mapped[str | None] = mapped_column(String(100))
    polls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RequestLogEntry(Base):
    """One ``/v1`` request, admitted or refused: the record of traffic (the ledger is the record of
    money). Written in batches off the hot path (app/console/requestlog.py), purged after
    ``console.request_log_retention_days``."""

    __tablename__ = "request_log"
    __table_args__ = (
        # Keyset pages newest first, over all keys, one key or one status class.
        Index("ix_request_log_created", "created_at", "id"),
        Index("ix_request_log_key_created", "key_id", "created_at"),
        Index("ix_request_log_class_created", "status_class", "created_at"),
        Index("ix_request_log_request", "request_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    request_id: Mapped[str] = mapped_column(String(64))
    # Who asked, by id and by the key's name then; never the secret.
    key_id: Mapped[str | None] = mapped_column(String(40))
    key_name: Mapped[str | None] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(10))
    route: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[int] = mapped_column(Integer)
    # ok | 4xx | 5xx | blocked (a moderation refusal), for the console's filter.
    status_class: Mapped[str] = mapped_column(String(10))
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(String(1000))
    upstream: Mapped[str | None] = mapped_column(String(100))
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    prompt_sha256: Mapped[str | None] = mapped_column(String(64))
    # Only with moderation.store_prompts: true.
    prompt: Mapped[str | None] = mapped_column(Text)
