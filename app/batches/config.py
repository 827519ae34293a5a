"""The ``files`` and ``batches`` settings sections (``app/runtime/settings.py`` assembles them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Ppm = Annotated[int, Field(ge=0, le=1_000_000)]


class FileSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OpenAI's own limits for a batch input file.
    max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    max_lines: int = Field(default=50_000, ge=1)
    # How long an uploaded (or batch-written) file is kept: OpenAI keeps batch files 30 days.
    retention_s: int = Field(default=30 * 86400, ge=60)
    purge_interval_s: float = Field(default=3600.0, gt=0)


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Lines of one key's batches admitted (held, queued or running) at once; the key's
    # `max_queued_tasks` bounds it too. A line reserves its worst case only when it is admitted.
    max_batch_lines_in_flight: int = Field(default=64, ge=1, le=10_000)
    # How often a node looks for batches to advance, and how long its claim on one lasts.
    poll_s: float = Field(default=1.0, gt=0)
    lease_s: float = Field(default=60.0, ge=1)
    # Errors listed on a batch that fails validation (OpenAI lists the first ones).
    max_validation_errors: int = Field(default=100, ge=1)
    # Lines forwarded to an upstream's own Batch API (an `openai` upstream with `batch: true`). The
    # upstream's discount (50% at OpenAI) is the operator's; how much of the tenant's price is taken
    # off, in parts per million (0: the tenant pays the catalog price; 500000: it gets OpenAI's 50%).
    # Per model (catalog name) and per key (key id) overrides; a key's wins over its model's.
    forward_tenant_discount_ppm: int = Field(default=0, ge=0, le=1_000_000)
    forward_tenant_discount_models: dict[str, Ppm] = Field(default_factory=dict)
    forward_tenant_discount_keys: dict[str, Ppm] = Field(default_factory=dict)
    # Lines admitted (validated, moderated, reserved) per step before the upstream batch is sent.
    forward_lines_per_step: int = Field(default=500, ge=1, le=10_000)
