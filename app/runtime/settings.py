"""The validated settings tree: YAML config with ``${VAR}`` interpolation, then ``GATEWAY_…`` env vars.

Precedence, highest first: explicit keyword arguments (tests), environment variables
(``GATEWAY_DATABASE__URL``, ``GATEWAY_ADMIN_KEY``; ``__`` separates nesting levels), the YAML file,
then the defaults below. A bad config fails at start with a message that names the field.
"""

from __future__ import annotations

import os
import re
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from app.batches.config import BatchSettings, FileSettings
from app.core.security import ensure_key_pepper, is_placeholder
from app.db.engine import PoolConfig
from app.moderation.config import ModerationSettings
from app.storage.config import StorageSettings
from app.telemetry.tracing import TracingSettings
from app.upstream.config import UpstreamSettings, default_upstreams

DEFAULT_CONFIG = "config/gateway.yaml"
# The shipped catalog and moderation policy travel inside the package, so an installed gateway
# starts from any directory with no config file at all.
DEFAULTS_DIR = Path(__file__).resolve().parents[1] / "defaults"
DEFAULT_MODELS_FILE = str(DEFAULTS_DIR / "models.yaml")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Values that mean "somebody forgot to set this": refused rather than used as a real secret.


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the field."""


def interpolate(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset ``${VAR}`` becomes empty."""
    env = os.environ if environ is None else environ

    def sub(match: re.Match[str]) -> str:
        value = env.get(match.group(1))
        if value:
            return value
        return match.group(2) if match.group(2) is not None else ""

    return _VAR.sub(sub, text)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Section):
    # Unset: SQLite at <data_dir>/gateway.db. A relative SQLite path is read against data_dir.
    url: str = ""

    @field_validator("url", mode="before")
    @classmethod
    def _unset(cls, value: Any) -> Any:
        return "" if value is None else value

    echo: bool = False
    # PostgreSQL connections per process: pool_size kept open, up to max_overflow more under load.
    # Every process of every node opens up to their sum, so the cluster's total (nodes × processes
    # × (pool_size + max_overflow)) must stay under PostgreSQL's max_connections, or go through
    # PgBouncer (README "Production shape"). The gateway logs its share at start.
    pool_size: int = Field(default=10, ge=1, le=500)
    max_overflow: int = Field(default=20, ge=0, le=500)
    # How long a request waits for a pooled connection when all are in use.
    pool_timeout_s: float = Field(default=30.0, gt=0)
    # How long a client's request waits out a transient database error (too many clients, a
    # dropped connection) before it is answered 503 with retry-after; tasks wait until it passes.
    retry_s: float = Field(default=10.0, ge=0)
    # The URL points at PgBouncer in transaction mode: asyncpg keeps no prepared statements.
    pgbouncer: bool = False

    def pool(self) -> PoolConfig:
        return PoolConfig(
            size=self.pool_size,
            overflow=self.max_overflow,
            timeout_s=self.pool_timeout_s,
            pgbouncer=self.pgbouncer,
        )


class RedisSettings(_Section):
    url: str | None = None
    # Keys and pub/sub channels of the state the nodes share (upstream slots, breakers, cache
    # invalidation) start with this; rate limits have their own (rate_limits.prefix).
    prefix: str = "gw:"
    # A node that dies gives its upstream slots back after this long (the living renew theirs).
    slot_lease_s: float = Field(default=30.0, ge=1, le=3600)


class UploadSettings(_Section):
    # Where multipart file parts are spooled while a request runs; default <data_dir>/spool.
    spool_dir: str | None = None
    max_input_pixels: int = Field(default=50_000_000, ge=1)
    max_input_edge: int = Field(default=16_384, ge=1)
    max_field_bytes: int = Field(default=256 * 1024, ge=1024)
    max_fields: int = Field(default=100, ge=1)
    # A spool folder nothing has written to for this long belongs to a request whose process died
    # (SIGKILL, OOM) and is swept. Replicas and `python -m app worker` share the data dir, so age is
    # the only safe sign of an orphan: it must outlive any live request (checked below), and six
    # hours leaves room for streams, which no setting bounds.
    orphan_age_s: float = Field(default=6 * 3600.0, gt=0)
    # How often the orphan sweep (spool and task input folders) runs in each server process.
    sweep_interval_s: float = Field(default=600.0, gt=0)


class ServerSettings(_Section):
    # Loopback by default: the admin API and the console are not open to the network on a first
    # run. The container image binds 0.0.0.0 explicitly (Dockerfile).
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    # JSON bodies larger than this are refused with 413 before they are parsed.
    max_json_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # The gateway's address as clients reach it (behind a proxy), for image links; default: the
    # address each request came in on.
    public_url: str | None = None
    # A request body that sends nothing for this long is answered 408 (stalled uploads).
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    # A body still arriving this long after the request came in is answered 408, however steadily
    # it trickles (the timeout above alone lets one byte every 29 s hold a request for ever). 900 s
    # carries the largest edit the catalog admits (16 images of 50 MB, 800 MB) at 1 MB/s (8 Mbit/s
    # upstream); a usual edit of a few MB needs under a minute even at 100 KB/s.
    body_deadline_s: float = Field(default=900.0, gt=0)
    # Origins allowed to call the API from a browser (CORS); empty: no cross-origin access.
    cors_origins: list[str] = Field(default_factory=list)
    # Keep-alive comment interval on SSE streams, so proxies do not cut long generations.
    sse_ping_s: float = Field(default=15.0, gt=0)
    # On SIGTERM: stop accepting, let requests and streams in flight finish for this long, then
    # cut what is left (its holds are released, nothing unfinished is charged).
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # On SIGTERM, /readyz turns 503 at once and the node keeps serving this long before it starts
    # the drain above, so the load balancer takes it out of rotation first (app/runtime/drain.py). Keep it
    # above the balancer's probe period times its failure threshold.
    drain_delay_s: float = Field(default=5.0, ge=0, le=600)
    # How long an idle client connection is kept open. Longer than clients' own idle expiry (httpx,
    # and so the OpenAI SDK, drop theirs after 5 s; uvicorn's default is also 5 s): when the server
    # closes first, a client can send its next request on a connection being closed and get a
    # transport error for a request the gateway never saw, or, worse, one it ran and charged.
    keep_alive_s: int = Field(default=75, gt=0)
    # Name the upstream that served (or failed) each answer in `x-gateway-upstream`, as the access
    # log and the console do; false keeps upstream names from tenants.
    upstream_header: bool = True


class BillingSettings(_Section):
    # A hold older than this belongs to a request whose process died; it is released (never a
    # queued or running task's: that one lives as long as its task). Must exceed the longest a
    # request may live (checked below).
    hold_ttl_s: float = Field(default=3600.0, gt=0)
    reconcile_every_s: float = Field(default=60.0, gt=0)
    # Added to every reservation, in percent of the catalog's worst case, for upstreams that bill
    # more than the catalog says (README "Metering and billing": when a charge exceeds its hold).
    reserve_margin_pct: float = Field(default=0.0, ge=0, le=1000)

    @property
    def reserve_margin_ppm(self) -> int:
        return round(self.reserve_margin_pct * 10_000)


class RateLimitSettings(_Section):
    # A concurrency slot not released within this time is treated as leaked (a crashed holder);
    # keep it above the longest upstream timeout.
    lease_ttl_s: float = Field(default=900.0, gt=0)
    # On a Redis outage, let requests through (logged) rather than failing all traffic.
    fail_open: bool = True
    prefix: str = "gw:rl:"


class TaskSettings(_Section):
    # Worker pools inside each server process; 0 leaves the queue to `python -m app worker`.
    workers: int = Field(default=1, ge=0, le=64)
    # Tasks one pool runs at once, as coroutines: an image call mostly waits on the upstream, so
    # this is set by upstream capacity (and the limits below), not by CPU.
    concurrency: int = Field(default=256, ge=1, le=100_000)
    # Tasks leased per claim (one statement); fairness across keys is per claim (app/tasks/queue.py).
    claim_batch: int = Field(default=32, ge=1, le=1000)
    # A running task's lease; renewed every third of it, so a dead worker's task is retaken soon.
    lease_s: float = Field(default=60.0, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    poll_s: float = Field(default=0.5, gt=0)
    # Where async edits keep their uploads until they run; default <data_dir>/task_inputs. With
    # storage.kind s3 the uploads wait in the bucket and this holds a worker's local copies only.
    inputs_dir: str | None = None
    # A finished task's input folder is swept at once; one whose task is unknown once it is this old.
    # The age covers the moment between moving the files in and committing the task row, and the
    # clock skew of a disk shared between hosts; a queued or running task's inputs are always kept.
    inputs_orphan_age_s: float = Field(default=3600.0, ge=60)


class WebhookSettings(_Section):
    # Deliveries are sent by every server process and `python -m app worker` (leased, never twice at
    # once); false stops this process sending (events still queue in the outbox).
    enabled: bool = True
    timeout_s: float = Field(default=10.0, gt=0)
    # An undelivered event is retried with exponential backoff for this long (3 days), then failed.
    retry_period_s: float = Field(default=3 * 86400.0, gt=0)
    initial_backoff_s: float = Field(default=5.0, gt=0)
    max_backoff_s: float = Field(default=3600.0, gt=0)
    poll_s: float = Field(default=1.0, gt=0)
    concurrency: int = Field(default=32, ge=1, le=1000)
    batch: int = Field(default=100, ge=1, le=1000)


class RetrySettings(_Section):
    max_retries_per_upstream: int = Field(default=2, ge=0)
    max_attempts_total: int = Field(default=6, ge=1)
    initial_delay_s: float = Field(default=0.5, ge=0)
    max_delay_s: float = Field(default=8.0, ge=0)
    # A retry-after longer than this is not waited for: the request fails (or fails over) instead.
    max_retry_after_s: float = Field(default=60.0, ge=0)
    deadline_s: float = Field(default=600.0, gt=0)


class BreakerSettings(_Section):
    failure_threshold: int = Field(default=5, ge=1)
    error_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    window_s: float = Field(default=60.0, gt=0)
    min_requests: int = Field(default=20, ge=1)
    open_s: float = Field(default=30.0, gt=0)
    half_open_max_probes: int = Field(default=1, ge=1)


class MetricsSettings(_Section):
    enabled: bool = True
    # When set, GET /metrics requires `Authorization: Bearer <token>`.
    token: SecretStr | None = None

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, value: Any) -> Any:
        if value in ("", None):
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if is_placeholder(text):
            raise ValueError("metrics.token is a placeholder; set a real token")
        return value


class SecuritySettings(_Section):
    # Pepper of the keyed hash API keys are stored under. Replicas sharing a database must share
    # it; unset, it is generated once into <data_dir>/key_pepper. Changing it invalidates all keys.
    key_pepper: SecretStr | None = None
    # Valid keys are remembered this long per process (one database read less per request). A key
    # revoked or changed through another replica or the CLI stops working within this delay.
    key_cache_ttl_s: float = Field(default=5.0, ge=0, le=300)

    @field_validator("key_pepper", mode="before")
    @classmethod
    def _pepper(cls, value: Any) -> Any:
        if value in ("", None):
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if len(text) < 32 or is_placeholder(text):
            raise ValueError("security.key_pepper must be at least 32 characters and not a placeholder")
        return value

    def pepper(self, data_dir: str) -> bytes:
        if self.key_pepper is not None:
            return self.key_pepper.get_secret_value().encode("utf-8")
        return ensure_key_pepper(data_dir)


class ConsoleSettings(_Section):
    """The web console on ``/console`` (README: Console)."""

    enabled: bool = True
    # A session ends this long after sign-in, whatever happens in between.
    session_ttl_s: int = Field(default=8 * 3600, ge=60, le=30 * 86400)
    # ... or after this long without a page view.
    idle_timeout_s: int = Field(default=3600, ge=60, le=30 * 86400)
    # A small WebP per generated image for the request log; per key overridable. Off: nothing
    # of an image is kept for the console.
    thumbnails: bool = False
    thumbnail_edge: int = Field(default=128, ge=16, le=512)
    # Every /v1 request, admitted or refused, for the Requests page (app/console/requestlog.py).
    request_log: bool = True
    request_log_retention_days: int = Field(default=30, ge=1, le=3650)
    # Entries waiting to be written at most; beyond it new ones are dropped (and counted).
    request_log_queue: int = Field(default=10_000, ge=1, le=1_000_000)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=True, alias="json")


class LifecycleSettings(_Section):
    """What happens to a retired model (the catalog's ``retired_at``)."""

    # Retired models served by their catalog `replacement` (billed at its prices, answered with
    # `x-gateway-model` and `Deprecation`) when no upstream still serves them; "*" for all.
    remap_retired: list[str] = Field(default_factory=list)

    def remaps(self, model: str) -> bool:
        return "*" in self.remap_retired or model in self.remap_retired


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        env_ignore_empty=True,
        extra="forbid",
        populate_by_name=True,
    )

    admin_key: SecretStr | None = None
    data_dir: str = "./data"
    models_file: str = DEFAULT_MODELS_FILE
    price_unit: str = "PTC"
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    uploads: UploadSettings = Field(default_factory=UploadSettings)
    tasks: TaskSettings = Field(default_factory=TaskSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    files: FileSettings = Field(default_factory=FileSettings)
    batches: BatchSettings = Field(default_factory=BatchSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    upstreams: list[UpstreamSettings] = Field(default_factory=default_upstreams)

    @field_validator("models_file", mode="before")
    @classmethod
    def _shipped_catalog(cls, value: Any) -> Any:
        return DEFAULT_MODELS_FILE if value in (None, "") else value

    @field_validator("admin_key", mode="before")
    @classmethod
    def _admin_key(cls, value: Any) -> Any:
        if value in ("", None):
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if is_placeholder(text) or len(text) < 32:
            # A console sign-in is a guess at it: 32 characters (generated keys have more) keep
            # guessing hopeless, throttled or not.
            raise ValueError(
                "admin_key (GATEWAY_ADMIN_KEY) must be at least 32 characters and not a placeholder; "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @model_validator(mode="after")
    def _unique_upstreams(self) -> Settings:
        names = [u.name for u in self.upstreams]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"upstreams: duplicate names {duplicates}")
        return self

    @model_validator(mode="after")
    def _sweep_spares_live_requests(self) -> Settings:
        # A live request stops writing its spool when its body ends (within body_deadline_s), then
        # may retry upstream until retry.deadline_s, start one last call of an upstream's timeout_s
        # and drain for shutdown_grace_s: the sweep must not take its folder for an orphan sooner.
        longest = (
            self.server.body_deadline_s
            + self.retry.deadline_s
            + max((u.timeout_s for u in self.upstreams), default=0.0)
            + self.server.shutdown_grace_s
        )
        if self.uploads.orphan_age_s <= longest:
            raise ValueError(
                f"uploads.orphan_age_s must be above {longest:g} s, the longest a live request may "
                "hold its spool (server.body_deadline_s + retry.deadline_s + the longest upstream "
                "timeout_s + server.shutdown_grace_s)"
            )
        return self

    @model_validator(mode="after")
    def _holds_outlive_requests(self) -> Settings:
        # The reconciler takes a hold older than hold_ttl_s for a dead request's: a live one may
        # read its body until body_deadline_s, retry until retry.deadline_s, make one last call of
        # an upstream's timeout_s and drain for shutdown_grace_s, so its hold must last longer.
        # (A queued or running task's hold is tied to the task, not to this clock.)
        longest = (
            self.server.body_deadline_s
            + self.retry.deadline_s
            + max((u.timeout_s for u in self.upstreams), default=0.0)
            + self.server.shutdown_grace_s
        )
        if self.billing.hold_ttl_s <= longest:
            raise ValueError(
                f"billing.hold_ttl_s must be above {longest:g} s, the longest a live request may "
                "hold its reservation (server.body_deadline_s + retry.deadline_s + the longest "
                "upstream timeout_s + server.shutdown_grace_s)"
            )
        # Each reconciler tick also pushes back the expiry of its process's live holds.
        if self.billing.hold_ttl_s <= 2 * self.billing.reconcile_every_s:
            raise ValueError(
                "billing.hold_ttl_s must be above twice billing.reconcile_every_s (each tick renews "
                "the holds of the requests its process is running)"
            )
        return self

    @model_validator(mode="after")
    def _data_paths_under_data_dir(self) -> Settings:
        # Runtime state (the SQLite file, stored images, spools) lives under data_dir, so one setting
        # moves all of it and none of it depends on the directory the process was started in.
        self.database.url = _sqlite_under(self.database.url, self.data_dir)
        if self.storage.kind == "local":
            self.storage.path = _under(self.storage.path, self.data_dir)
        if self.uploads.spool_dir:
            self.uploads.spool_dir = _under(self.uploads.spool_dir, self.data_dir)
        if self.tasks.inputs_dir:
            self.tasks.inputs_dir = _under(self.tasks.inputs_dir, self.data_dir)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments (tests), then env vars, then the config file; no dotenv or secret dirs.
        return init_settings, env_settings, _file_source(settings_cls)


def _under(path: str, base: str) -> str:
    return path if Path(path).is_absolute() else str(Path(base) / path)


def _sqlite_under(url: str, data_dir: str) -> str:
    if not url:
        return f"sqlite+aiosqlite:///{Path(data_dir) / 'gateway.db'}"
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    return parsed.set(database=_under(parsed.database, data_dir)).render_as_string(hide_password=False)


# Config-file settings that name files: relative values are read against the file's own directory,
# so `--config /etc/gateway/gateway.yaml` works from any working directory.
_FILE_RELATIVE: tuple[tuple[str, ...], ...] = (("data_dir",), ("models_file",), ("moderation", "policy_file"))


class InterpolatedYamlSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source with one step added: ``${VAR}`` / ``${VAR:-default}`` first."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        try:
            text = file_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config: cannot read {file_path}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(interpolate(text))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {file_path} is not valid YAML: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config: {file_path} must hold a mapping at the top level")
        if isinstance(file_path, Path):
            _resolve_against(data, file_path.resolve().parent)
        return data


def _resolve_against(data: dict[str, Any], base: Path) -> None:
    for *parents, leaf in _FILE_RELATIVE:
        section: Any = data
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        value = section.get(leaf) if isinstance(section, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            section[leaf] = os.path.normpath(base / value)


def _file_source(settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource:
    data = settings_cls.model_config.get("gateway_data")
    if isinstance(data, dict):
        return InitSettingsSource(settings_cls, init_kwargs=data)
    return InterpolatedYamlSource(settings_cls)


def _bound(**config: Any) -> type[Settings]:
    """``Settings`` bound to one config file or mapping: pydantic-settings reads its file from the
    class's ``model_config``, so a per-call file means a per-call subclass (no global, no ContextVar)."""
    return type("Settings", (Settings,), {"model_config": SettingsConfigDict(**config)})  # type: ignore[typeddict-item]


def load_settings(config_path: str | None = None, **overrides: Any) -> Settings:
    """Settings from the YAML file (``--config``, else ``GATEWAY_CONFIG``, else the default), then env."""
    path = Path(config_path or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)
    explicit = config_path is not None or bool(os.environ.get("GATEWAY_CONFIG"))
    if explicit and not path.is_file():
        raise ConfigError(f"config: cannot read {path}: No such file")
    return _validated(_bound(yaml_file=path if path.is_file() else None), overrides)


def build_settings(data: dict[str, Any], **overrides: Any) -> Settings:
    """Validate a config mapping (at the config file's precedence) under env overrides."""
    return _validated(_bound(gateway_data=data), overrides)


def _validated(cls: type[Settings], overrides: dict[str, Any]) -> Settings:
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
