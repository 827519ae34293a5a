"""Open every long-lived resource at start and close it at shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI  # noqa: TID251 - the lifespan hook's type
from sqlalchemy.engine import make_url

from app.auth.keys import KeyService
from app.batches.files import FileLimits, FileService
from app.batches.forward import BatchForwarder, Discounts
from app.batches.service import BatchLimits, BatchService
from app.billing.journal import SettlementJournal
from app.billing.ledger import LedgerService
from app.billing.limiters import build_limiter
from app.billing.limits import RateLimiter
from app.billing.shared_journal import SharedJournal
from app.cluster.bus import ClusterBus
from app.console.requestlog import RequestLog
from app.console.throttle import open_throttle
from app.console.thumbnails import Thumbnailer
from app.core.memory import release_free_memory, tune_allocator
from app.core.security import ensure_admin_key
from app.db.engine import create_engine, create_sessionmaker
from app.db.leases import Leases
from app.db.migrate import upgrade_head
from app.db.readiness import Readiness
from app.db.writer import create_writer
from app.domain.catalog import Catalog
from app.images.admission.lifecycle import Lifecycle
from app.images.intake.sweep import SweepPolicy, sweep
from app.images.service import ImageService
from app.moderation import ModerationService
from app.moderation.audit import ModerationLog
from app.runtime.drain import DrainOnSigterm
from app.runtime.settings import Settings
from app.runtime.state import AppState, UploadPolicy
from app.storage import build_input_store, build_store, purge_expired, resolve_signing_secret
from app.storage.blobs import blob_store_for
from app.tasks.housekeeping import Chore, Housekeeper
from app.tasks.queue import TaskQueue
from app.tasks.service import TaskService, TaskSettingsView
from app.tasks.worker import work, worker_name
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing
from app.upstream.health import BreakerConfig
from app.upstream.registry import ProviderRegistry
from app.upstream.retry import RetryPolicy
from app.upstream.router import Router
from app.upstream.shared_breakers import SharedBreakers
from app.upstream.shared_slots import SharedSlotStore
from app.webhooks.endpoints import WebhookEndpoints
from app.webhooks.outbox import Outbox
from app.webhooks.sender import WebhookSender

log = logging.getLogger(__name__)


def configured_secrets(settings: Settings) -> tuple[str, ...]:
    """The gateway's own secrets, scrubbed from every upstream message (upstream keys are added by
    the registry)."""
    found = [resolve_admin_key(settings)]
    storage = settings.storage
    for secret in (
        settings.security.key_pepper,
        settings.metrics.token,
        storage.signing_key,
        storage.access_key_id,
        storage.secret_access_key,
    ):
        if secret is not None:
            found.append(secret.get_secret_value())
    return tuple(found)


def resolve_admin_key(settings: Settings) -> str:
    """The configured admin key, or the one generated once under the data directory."""
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value()
    key, path = ensure_admin_key(settings.data_dir)
    log.info("admin key read from file", extra={"fields": {"path": str(path)}})
    return key


async def prepare(settings: Settings) -> None:
    """One-time start-up work done before any worker starts: schema and admin key."""
    if _is_sqlite(settings):
        engine = create_engine(settings.database.url, pool=settings.database.pool())
        try:
            await upgrade_head(engine)
        finally:
            await engine.dispose()
    resolve_admin_key(settings)
    settings.security.pepper(settings.data_dir)


def _is_sqlite(settings: Settings) -> bool:
    return make_url(settings.database.url).get_backend_name() == "sqlite"


@asynccontextmanager
async def open_state(
    settings: Settings, metrics: Metrics | None = None, tracing: Tracing | None = None
) -> AsyncIterator[AppState]:
    """Everything the gateway needs, opened in dependency order and closed in reverse.

    Each resource's close goes on one ``AsyncExitStack`` as soon as the resource exists, so a
    failure half-way through start-up closes what was opened, and a close that fails at shutdown
    is logged and the others still run (even when one is cancelled: the stack runs them all).
    """
    metrics = metrics or Metrics(process=False)
    tracing = tracing or Tracing.from_settings(settings.tracing)
    catalog = Catalog.from_file(settings.models_file)
    metrics.set_models(catalog.names())
    async with AsyncExitStack() as stack:
        engine = create_engine(
            settings.database.url, echo=settings.database.echo, pool=settings.database.pool()
        )
        _log_capacity(settings)
        _close_at_exit(stack, "database engine", engine.dispose)
        registry = ProviderRegistry.build(settings.upstreams, catalog, secrets=configured_secrets(settings))
        _close_at_exit(stack, "upstream registry", registry.aclose)
        limiter: RateLimiter | None = None

        async def close_limiter() -> None:
            if limiter is not None:
                await limiter.aclose()

        # Registered before the limiter exists, so it closes after everything opened below it.
        _close_at_exit(stack, "rate limiter", close_limiter)
        # SQLite is the embedded default: keep it at the newest schema without a separate step.
        # Shared databases (PostgreSQL) are migrated on purpose, with `python -m app migrate`.
        if _is_sqlite(settings):
            await upgrade_head(engine)
        sessions = create_sessionmaker(engine)
        writer = create_writer(engine, retry_s=settings.database.retry_s)
        _close_at_exit(stack, "database writer", writer.aclose)
        store = build_store(
            settings.storage, signing_secret=resolve_signing_secret(settings.storage, settings.data_dir)
        )
        await store.start()
        _close_at_exit(stack, "image store", store.aclose)
        uploads = UploadPolicy.from_settings(settings, catalog)
        uploads.spool_root.mkdir(parents=True, exist_ok=True)
        ledger = LedgerService(
            writer,
            hold_ttl_s=settings.billing.hold_ttl_s,
            # Settlements the database refuses, kept until it takes them (app/billing/journal.py).
            journal=SettlementJournal(Path(settings.data_dir) / "ledger-journal.jsonl"),
        )
        limiter = build_limiter(
            settings.redis.url,
            prefix=settings.rate_limits.prefix,
            lease_ttl_s=settings.rate_limits.lease_ttl_s,
            fail_open=settings.rate_limits.fail_open,
        )
        if settings.redis.url is None and settings.server.workers > 1:
            warn_per_process_limits(f"server.workers is {settings.server.workers}")
        # With Redis, upstream slots, breakers and the key cache are shared by every node (README,
        # "Many nodes"); without it each process keeps its own.
        bus = ClusterBus(settings.redis.url, prefix=settings.redis.prefix) if settings.redis.url else None
        if bus is not None:
            _close_at_exit(stack, "cluster bus", bus.aclose)
            # Refused settlements also go where any node replays them (app/billing/shared_journal.py).
            ledger.share_journal(SharedJournal(bus.redis, bus.key("ledger-journal")))
        slot_store = SharedSlotStore(bus, lease_s=settings.redis.slot_lease_s) if bus else None
        router = Router(
            registry,
            policy=RetryPolicy(**settings.retry.model_dump()),
            breaker=BreakerConfig(**settings.breaker.model_dump()),
            metrics=metrics,
            tracing=tracing,
            slots=slot_store.slots if slot_store is not None else None,
        )
        shared_breakers = SharedBreakers(bus) if bus is not None else None
        if shared_breakers is not None:
            shared_breakers.attach(router.breakers.values())
        moderation = ModerationService.from_settings(settings.moderation, base_dir=Path.cwd())
        _close_at_exit(stack, "moderation", moderation.aclose)
        # Spans still batched are flushed at shutdown (off the loop: the exporter blocks).
        _close_at_exit(stack, "tracing", lambda: asyncio.to_thread(tracing.shutdown))
        thumbnails = Thumbnailer(
            sessions,
            store,
            default_on=settings.console.thumbnails,
            edge=settings.console.thumbnail_edge,
            retention_s=settings.storage.retention_s,
        )
        _close_at_exit(stack, "thumbnails", thumbnails.drain)
        images = ImageService(
            catalog=catalog,
            registry=registry,
            router=router,
            ledger=ledger,
            limiter=limiter,
            store=store,
            url_ttl_s=settings.storage.url_ttl_s,
            metrics=metrics,
            moderation=moderation,
            audit=ModerationLog(sessions),
            reserve_margin_ppm=settings.billing.reserve_margin_ppm,
            tracing=tracing,
            sink=thumbnails,
            lifecycle=Lifecycle(
                catalog,
                serves_retired=lambda model: bool(registry.routes(model, retired=True)),
                remaps=settings.lifecycle.remaps,
            ),
        )
        inputs_root = Path(settings.tasks.inputs_dir or Path(settings.data_dir) / "task_inputs")
        inputs_root.mkdir(parents=True, exist_ok=True)
        keys = KeyService(
            sessions,
            catalog.names(),
            pepper=settings.security.pepper(settings.data_dir),
            cache_ttl_s=settings.security.key_cache_ttl_s,
            bus=bus,
        )
        if bus is not None:
            # Every subscriber is registered by now; closed before the bus (stack order).
            await bus.start()
            for shared in (slot_store, shared_breakers):
                if shared is not None:
                    await shared.start()
                    _close_at_exit(stack, "shared upstream state", shared.aclose)
        webhooks = WebhookEndpoints(sessions)
        hooks = settings.webhooks
        outbox = Outbox(
            sessions,
            writer,
            retry_period_s=hooks.retry_period_s,
            initial_backoff_s=hooks.initial_backoff_s,
            max_backoff_s=hooks.max_backoff_s,
            send_lease_s=2 * hooks.timeout_s + 5,
        )
        tasks = TaskService(
            outbox=outbox,
            endpoints=webhooks,
            queue=TaskQueue(
                sessions,
                writer,
                lease_s=settings.tasks.lease_s,
                max_attempts=settings.tasks.max_attempts,
                # No clock on a queued task's hold: it is tied to the task (release_expired).
                hold_ttl_s=None,
            ),
            images=images,
            keys=keys,
            store=store,
            inputs=build_input_store(settings.storage, store, inputs_root),
            input_limits=uploads.inputs,
            settings=TaskSettingsView(
                # A queued task keeps its hold for as long as it may wait and run.
                hold_ttl_s=float(settings.storage.retention_s),
                url_ttl_s=settings.storage.url_ttl_s,
                retention_s=settings.storage.retention_s,
            ),
        )
        # Issue 27: OpenAI's Files and Batch APIs (app/batches/).
        files = FileService(
            sessions,
            blob_store_for(store),
            FileLimits(
                max_bytes=settings.files.max_bytes,
                max_lines=settings.files.max_lines,
                retention_s=settings.files.retention_s,
            ),
        )
        batches = BatchService(
            sessions=sessions,
            files=files,
            tasks=tasks,
            images=images,
            keys=keys,
            limits=BatchLimits(
                max_lines_in_flight=settings.batches.max_batch_lines_in_flight,
                lease_s=settings.batches.lease_s,
                max_validation_errors=settings.batches.max_validation_errors,
            ),
            spool_root=uploads.spool_root,
            input_limits=uploads.inputs,
            outbox=outbox,
            endpoints=webhooks,
            forwarder=BatchForwarder(
                sessions=sessions,
                registry=registry,
                catalog=catalog,
                images=images,
                keys=keys,
                store=store,
                url_ttl_s=settings.storage.url_ttl_s,
                spool_root=uploads.spool_root,
                discounts=Discounts(
                    default_ppm=settings.batches.forward_tenant_discount_ppm,
                    models=settings.batches.forward_tenant_discount_models,
                    keys=settings.batches.forward_tenant_discount_keys,
                ),
                lines_per_step=settings.batches.forward_lines_per_step,
                hold_ttl_s=settings.billing.hold_ttl_s,
            ),
        )
        queue_depth = tasks.queue.depth

        async def refresh_gauges() -> None:
            metrics.set_queue_depth(await queue_depth())
            metrics.set_tasks_running(tasks.running)
            for snapshot in router.snapshots():
                metrics.set_breaker_state(upstream=snapshot.name, state=snapshot.state)
            for upstream, waiting in router.waiting().items():
                for source, count in waiting.items():
                    metrics.set_upstream_waiting(upstream=upstream, source=source, count=count)

        metrics.on_scrape(refresh_gauges)
        readiness = Readiness(engine, settings.redis.url)
        _close_at_exit(stack, "readiness probe", readiness.aclose)
        request_log = (
            RequestLog(
                engine,
                writer,
                capacity=settings.console.request_log_queue,
                store_prompts=settings.moderation.store_prompts,
                on_drop=metrics.request_log_dropped.inc,
            )
            if settings.console.request_log
            else None
        )
        if request_log is not None:
            # Entries still queued at shutdown are written before the engine closes.
            _close_at_exit(stack, "request log", request_log.flush)
        yield AppState(
            settings=settings,
            engine=engine,
            sessions=sessions,
            catalog=catalog,
            registry=registry,
            keys=keys,
            images=images,
            tasks=tasks,
            store=store,
            admin_key=resolve_admin_key(settings),
            ledger=ledger,
            uploads=uploads,
            router=router,
            metrics=metrics,
            moderation_log=ModerationLog(sessions),
            webhooks=webhooks,
            outbox=outbox,
            readiness=readiness,
            files=files,
            batches=batches,
            request_log=request_log,
        )


PER_PROCESS_LIMITS = (
    "per-key rate limits (rpm, images per minute, concurrent requests)",
    "each upstream's max_concurrency",
    "circuit-breaker state",
    "the API-key cache (a revoked key may work for security.key_cache_ttl_s more elsewhere)",
)


def warn_per_process_limits(why: str) -> None:
    """Several processes and no Redis: say at start which limits each process keeps for itself."""
    log.warning(
        "redis.url is not set and this gateway runs as several processes (%s): these limits are "
        "kept per process, so the cluster allows that many times more: %s. Set redis.url to "
        "share them.",
        why,
        "; ".join(PER_PROCESS_LIMITS),
        extra={"fields": {"per_process_limits": list(PER_PROCESS_LIMITS)}},
    )


def _log_capacity(settings: Settings) -> None:
    """Say at start what this process may open, and which limits stay inside it (SPEC §10)."""
    if not _is_sqlite(settings):
        most = settings.database.pool().most
        log.info(
            "database pool: this process opens up to pool_size + max_overflow connections; every "
            "process of every node adds as many, and their total must stay under PostgreSQL's "
            "max_connections (or go through PgBouncer: database.pgbouncer)",
            extra={
                "fields": {
                    "pool_size": settings.database.pool_size,
                    "max_overflow": settings.database.max_overflow,
                    "per_process": most,
                    "per_node": most * settings.server.workers,
                    "pgbouncer": settings.database.pgbouncer,
                }
            },
        )
        # A shared database means other nodes may share it; a secret generated into this node's
        # own data_dir would make their keys and links fail here (and this node's fail there).
        unshared = [
            name
            for name, configured in (
                ("security.key_pepper", settings.security.key_pepper is not None),
                ("storage.signing_key", settings.storage.signing_key is not None),
            )
            if not configured
        ]
        if unshared:
            log.warning(
                "%s not set: generated into this node's data_dir, so keys made (or links signed) on "
                "another node sharing this database will not verify here. Set them from one secret "
                "on every node (README: Production shape).",
                " and ".join(unshared),
                extra={"fields": {"generated_per_node": unshared}},
            )


def _close_at_exit(stack: AsyncExitStack, name: str, close: Callable[[], Awaitable[object]]) -> None:
    """Put ``close`` on the stack; an exception from it is logged (with ``name``), not raised, so
    the shutdown goes on and an error from the body is not masked by one from a close."""

    async def guarded() -> None:
        try:
            await close()
        except Exception:
            log.exception("closing a resource failed", extra={"fields": {"resource": name}})

    stack.push_async_callback(guarded)


def housekeeper(state: AppState) -> Housekeeper:
    """This node's housekeeping (app/tasks/housekeeping.py), the same for ``serve`` and
    ``python -m app worker``: chores over shared state once per cluster under a lease, chores over
    this node's disk and memory on every node."""
    settings = state.settings
    storage = settings.storage
    policy = SweepPolicy(
        spool_root=state.uploads.spool_root,
        inputs_root=state.tasks.inputs_root,
        spool_age_s=settings.uploads.orphan_age_s,
        inputs_age_s=settings.tasks.inputs_orphan_age_s,
        # The object store's task inputs: the same rule as the folders (app/images/intake/sweep.py).
        objects=state.tasks.input_store.objects,
    )

    async def keep_own_holds() -> int:
        # This node's own: settlements its database refused (journaled on its disk, and in Redis
        # where any node replays them, so a lost node's are written too) are written
        # first, so a hold they settle is charged, not released; then the holds of its live
        # requests are pushed back, before any node's reconciler may take an expired one.
        replayed = await state.ledger.replay_journal()
        if replayed:
            log.warning("wrote journaled settlements", extra={"fields": {"count": replayed}})
        return replayed + await state.ledger.renew_live()

    async def reconcile() -> int:
        # Holds left by requests whose process died (SPEC §5: a failure releases it all).
        released = await state.ledger.release_expired()
        if released:
            log.warning("released stale holds", extra={"fields": {"count": released}})
        return released

    async def purge_images() -> int:
        return await purge_expired(state.store, retention_s=storage.retention_s)

    async def sweep_orphans() -> int:
        swept = await sweep(policy, state.tasks.queue.activity)
        if swept.spools or swept.inputs:
            log.warning(
                "removed orphaned upload folders",
                extra={"fields": {"spools": swept.spools, "task_inputs": swept.inputs}},
            )
        return swept.spools + swept.inputs

    async def give_back_memory() -> None:
        await asyncio.to_thread(release_free_memory)  # app/core/memory.py

    chores = [
        Chore("task-purge", storage.purge_interval_s, state.tasks.purge),
        Chore("hold-renew", settings.billing.reconcile_every_s, keep_own_holds, cluster_wide=False),
        Chore("hold-reconcile", settings.billing.reconcile_every_s, reconcile),
        # A local image store is this node's own disk; an object store is the cluster's.
        Chore("image-purge", storage.purge_interval_s, purge_images, cluster_wide=storage.kind == "s3"),
        Chore("orphan-sweep", settings.uploads.sweep_interval_s, sweep_orphans, cluster_wide=False),
        Chore("memory-release", settings.billing.reconcile_every_s, give_back_memory, cluster_wide=False),
        # Batch files past files.retention_s: rows and blobs in the shared database and store.
        Chore("file-purge", settings.files.purge_interval_s, state.files.purge_expired),
    ]
    return Housekeeper(Leases(state.tasks.queue.writer, holder=worker_name()), chores)


@asynccontextmanager
async def _background(state: AppState) -> AsyncIterator[None]:
    hooks = state.settings.webhooks
    stop = asyncio.Event()
    config = state.settings.tasks
    workers = [
        asyncio.create_task(
            work(
                state.tasks,
                stop,
                poll_s=config.poll_s,
                concurrency=config.concurrency,
                batch=config.claim_batch,
            ),
            name=f"worker-{i}",
        )
        for i in range(config.workers)
    ]
    # Batches advance in every serving process (each batch is leased to one at a time); their
    # lines run as tasks wherever task workers run.
    workers.append(
        asyncio.create_task(
            state.batches.run_forever(stop, worker=worker_name(), poll_s=state.settings.batches.poll_s),
            name="batches",
        )
    )
    tasks = [
        asyncio.create_task(housekeeper(state).run_forever(), name="housekeeping"),
        *(
            [asyncio.create_task(webhook_sender(state).run_forever(), name="webhooks")]
            if hooks.enabled
            else []
        ),
        *(
            [
                asyncio.create_task(
                    state.request_log.run_forever(
                        retention=timedelta(days=state.settings.console.request_log_retention_days),
                        purge_every_s=state.settings.storage.purge_interval_s,
                    ),
                    name="request-log",
                )
            ]
            if state.request_log is not None
            else []
        ),
    ]
    try:
        yield
    finally:
        # Workers finish the task in hand (its outcome and charge land together), then stop; one
        # that cannot finish in time is cancelled and its lease lapses, so another worker retakes it.
        stop.set()
        _, pending = (
            await asyncio.wait(workers, timeout=state.settings.tasks.lease_s) if workers else ((), ())
        )
        for task in [*tasks, *pending]:
            task.cancel()
        await asyncio.gather(*tasks, *pending, return_exceptions=True)


def public_base_url(settings: Settings) -> str:
    """Where clients reach this gateway, for links in webhook events (no request to read it from)."""
    if settings.server.public_url:
        return settings.server.public_url.rstrip("/")
    host = settings.server.host if settings.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.server.port}"


def webhook_sender(state: AppState) -> WebhookSender:
    """The outbox's sender for this process, woken as soon as a task's events are queued."""
    hooks = state.settings.webhooks
    base_url = public_base_url(state.settings)

    async def render(task_id: str) -> dict[str, Any] | None:
        if task_id.startswith("batch_"):  # batch.* events (app/batches/service.py)
            return await state.batches.render(task_id)
        return await state.tasks.render(task_id, base_url=base_url)

    sender = WebhookSender(
        state.outbox,
        state.webhooks,
        render,
        timeout_s=hooks.timeout_s,
        concurrency=hooks.concurrency,
        batch=hooks.batch,
        poll_s=hooks.poll_s,
    )
    state.tasks.on_events = sender.wakeup.set
    return sender


def make_lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with (
            open_state(settings, app.state.metrics, app.state.tracing) as state,
            _background(state),
            open_throttle(settings.redis.url) as throttle,
        ):
            app.state.gateway = state
            # The console's sign-in throttle (app/console/throttle.py): on Redis when configured.
            app.state.signin_throttle = throttle
            # Everything built so far (app, catalog, classifier, pools) lives as long as the
            # process: out of the collector's sight, full collections stop re-scanning it, which
            # under load showed up as tens of milliseconds at the p99. Requests free almost all
            # they allocate by reference counting, so young collections can be rarer than the
            # default every 700 allocations: +20% req/s at 64 concurrent requests (bench/).
            gc.collect()
            gc.freeze()
            gc.set_threshold(20_000, 50, 100)
            tune_allocator()
            log.info(
                "gateway ready",
                extra={
                    "fields": {
                        "upstreams": state.registry.provider_names(),
                        "models": state.registry.models(),
                    }
                },
            )
            # SIGTERM: /readyz turns 503 first, the node serves on for drain_delay_s, then drains.
            restore = DrainOnSigterm(state.readiness, delay_s=settings.server.drain_delay_s).install()
            try:
                yield
            finally:
                restore()

    return lifespan
