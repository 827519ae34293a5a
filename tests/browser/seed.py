"""Rows for the layout and accessibility tests: 200 of everything a console list shows, with long
names, URLs and error texts (the widths that break tables), written straight into the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, insert

from app.db.tables import (
    ApiKey,
    LedgerEntry,
    ModerationEvent,
    RequestLogEntry,
    Task,
    WebhookDelivery,
    WebhookEndpoint,
)

LONG_ERROR = (
    "Invalid value: '13x17'. Supported values are: 'auto', '1024x1024', '1536x1024' and '1024x1536'; "
    "see the model's documentation for the sizes each model accepts and the quality levels it offers."
)
LONG_URL = "https://hooks.example.com/very/long/path/to/the/receiver/of/image-events/for/tenant/"


def seed(database_url: str, tenant_key_id: str, rows: int = 200) -> dict[str, str]:
    """``rows`` keys, request-log entries, ledger rows, tasks, moderation events and webhook
    deliveries (the log, tasks and deliveries all of ``tenant_key_id``); returns ids to open."""
    engine = create_engine(database_url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg"))
    now = datetime.now(UTC)
    statuses = [
        (200, "ok", None),
        (400, "4xx", "invalid_value"),
        (502, "5xx", "upstream_error"),
        (400, "blocked", "moderation_blocked"),
    ]
    keys: list[dict[str, Any]] = []
    log: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []
    for i in range(rows):
        at = now - timedelta(minutes=7 * i)
        keys.append(
            {
                "id": f"key_seed{i:032x}",
                "name": f"seeded-tenant-with-a-rather-long-name-{i:03d}",
                "owner": f"owner-organisation-number-{i:03d}",
                "key_hash": f"{i:064x}",
                "prefix": f"sk-gw-{i:06d}",
                "models": ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"] if i % 2 else None,
                "moderation": "default",
                "enabled": i % 7 != 0,
                "created_at": at,
                "expires_at": now + timedelta(days=30 + i) if i % 3 == 0 else None,
                "quota_micros": 50_000_000 if i % 2 else None,
                "monthly_quota_micros": 9_000_000 if i % 4 == 1 else None,
                "balance_micros": 12_345_678_901 if i % 5 else None,
                "spent_micros": i * 123_457,
                "reserved_micros": 0,
                "rpm": 600,
                "ipm": 1200,
                "concurrency": 16,
                "max_queued_tasks": 100,
                "max_tasks_in_flight": 10,
            }
        )
        status, status_class, code = statuses[i % len(statuses)]
        log.append(
            {
                "created_at": at,
                "request_id": f"req_{i:032x}",
                "key_id": tenant_key_id,
                "key_name": "layout-tenant",
                "method": "POST",
                "route": "/v1/images/generations",
                "model": "gpt-image-1",
                "status": status,
                "status_class": status_class,
                "error_code": code,
                "error_message": LONG_ERROR if code else None,
                "upstream": "local" if status_class in ("ok", "5xx") else None,
                "latency_ms": 1234 + i,
                "tokens": 4160 if status == 200 else 0,
                "cost_micros": 10_925_000 if status == 200 else 0,
                "prompt_sha256": f"{i:064x}",
            }
        )
        ledger.append(
            {
                "request_id": f"req_{i:032x}",
                "key_id": tenant_key_id,
                "model": ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"][i % 3],
                "upstream": "local",
                "endpoint": "generations",
                "status": "succeeded" if i % 9 else "failed",
                "images": 1,
                "image_output_tokens": 4160,
                "cost_micros": 10_925_000 if i % 9 else 0,
                "latency_ms": 1234,
                "created_at": at,
            }
        )
        tasks.append(
            {
                "id": f"task_{i:032x}",
                "key_id": tenant_key_id,
                "request_id": f"req_t{i:031x}",
                "endpoint": "generations",
                "model": "gpt-image-1",
                "status": ["succeeded", "failed", "queued", "cancelled"][i % 4],
                "spec": {},
                "response_format": "url",
                "error": {"code": "upstream_error", "message": LONG_ERROR} if i % 4 == 1 else None,
                "created_at": at,
            }
        )
        events.append(
            {
                "request_id": f"req_m{i:031x}",
                "key_id": tenant_key_id,
                "stage": "input",
                "level": "auto",
                "checker": "classifier",
                "categories": ["violence", "self-harm", "harassment/threatening"],
                "rules": ["gore", "a very long custom rule name that an operator wrote"],
                "prompt_sha256": f"{i:064x}",
                "created_at": at,
            }
        )
        deliveries.append(
            {
                "id": f"msg_{i:032x}",
                "endpoint_id": "we_seed",
                "key_id": tenant_key_id,
                "task_id": f"task_{i:032x}",
                "event_type": "image.task.succeeded",
                "snapshot": {},
                "status": ["pending", "delivered", "failed"][i % 3],
                "attempts": i % 9,
                "next_attempt_at": at + timedelta(hours=1),
                "give_up_at": at + timedelta(days=3),
                "last_status_code": 500 if i % 3 != 1 else 200,
                "last_error": "HTTP 500 from the receiver: " + LONG_ERROR if i % 3 != 1 else None,
                "created_at": at,
            }
        )
    with engine.begin() as c:
        c.execute(insert(ApiKey), keys)
        c.execute(insert(RequestLogEntry), log)
        c.execute(insert(LedgerEntry), ledger)
        c.execute(insert(Task), tasks)
        c.execute(insert(ModerationEvent), events)
        c.execute(
            insert(WebhookEndpoint),
            [
                {
                    "id": "we_seed",
                    "key_id": tenant_key_id,
                    "url": LONG_URL + "x" * 60,
                    "secret": "whsec_seed",
                    "description": "the tenant's production receiver, behind their load balancer",
                    "enabled": True,
                    "created_at": now,
                }
            ],
        )
        c.execute(insert(WebhookDelivery), deliveries)
    engine.dispose()
    return {"request": "req_" + f"{1:032x}", "task": "task_" + f"{1:032x}", "key": keys[1]["id"]}
