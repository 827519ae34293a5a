"""The image request path, top to bottom in one place.

authenticate (the caller) → **admit** (validate → moderate to the effective level → rate-limit →
reserve) → route/call → relay → **settle**.

``ImageService.admit`` is the one admission path for sync, stream and async requests: it returns
an ``Admission`` (the validated job at its effective moderation level, the hold, the rate-limit
grant), which ``execute`` runs now or a task stores to run later. Every ending goes through
``Settlement.settle`` (app/images/settlement.py), the one writer of settlement rows. Once an
upstream has answered, the rest of the request (reading its body, storing images, the charge) runs
to its end even if the client leaves: the upstream has done, and billed, the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from app.auth.keys import Caller
from app.billing.ledger import Hold, LedgerService
from app.billing.limits import KeyLimits, RateLimiter
from app.billing.pricing import worst_case_cost
from app.billing.svg import SvgCharge, svg_charge
from app.core.errors import (
    GatewayError,
    ImageStoreError,
    InvalidRequestError,
)
from app.domain.catalog import Catalog, ModelCapabilities
from app.domain.jobs import ImageJob, ImageResult
from app.domain.money import apply_multiplier
from app.images.admission.lifecycle import Lifecycle
from app.images.admission.preparation import JobPreparer
from app.images.admission.requests import (
    Admission,
    Draft,
    EditDraft,
    GenerationDraft,
    ImageOutcome,
    InputLimits,
    VariationDraft,
)
from app.images.admission.validation import (
    streamed_for_previews,
)
from app.images.delivery import render_images, store_images
from app.images.relay import ImageSink, ImageStream
from app.images.settlement import CostHook, Settlement, UpstreamOutcome, background, shielded
from app.moderation import ModerationService
from app.moderation.audit import ModerationLog
from app.storage import ImageStore
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import RequestTrace, Tracing
from app.upstream.call import DIRECT, UpstreamCall
from app.upstream.registry import ProviderRegistry
from app.upstream.router import Router

log = logging.getLogger(__name__)

# Re-exported: callers import the request types from the service they hand them to.
__all__ = [
    "Admission",
    "Draft",
    "EditDraft",
    "GenerationDraft",
    "ImageOutcome",
    "ImageService",
    "InputLimits",
    "VariationDraft",
]

# Turns an upstream body into the body to return, plus work for the settlement's transaction.
ResultHook = Callable[[dict[str, Any]], Awaitable[tuple[dict[str, Any], CostHook | None]]]
# Given the error object of a failure after the upstream answered, work for the settlement's
# transaction (a task recording that it failed, with its charge).
FailureHook = Callable[[dict[str, Any]], CostHook]


def b64_images(body: dict[str, Any]) -> list[str]:
    return [
        i["b64_json"]
        for i in body.get("data") or []
        if isinstance(i, dict) and isinstance(i.get("b64_json"), str)
    ]


class ImageService:
    def __init__(
        self,
        *,
        catalog: Catalog,
        registry: ProviderRegistry,
        router: Router,
        ledger: LedgerService,
        limiter: RateLimiter,
        store: ImageStore,
        url_ttl_s: int,
        moderation: ModerationService,
        audit: ModerationLog,
        metrics: Metrics | None = None,
        reserve_margin_ppm: int = 0,
        tracing: Tracing | None = None,
        sink: ImageSink | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self._sink = sink
        self._catalog = catalog
        self._registry = registry
        self._router = router
        self._ledger = ledger
        self._limiter = limiter
        self._store = store
        self._url_ttl_s = url_ttl_s
        self._metrics = metrics or Metrics(process=False)
        self._moderation = moderation
        self._audit = audit
        self._margin_ppm = reserve_margin_ppm
        self._tracing = tracing or Tracing(None)
        self.settlement = Settlement(ledger, self._metrics)
        self.lifecycle = lifecycle or Lifecycle(
            catalog,
            serves_retired=lambda model: bool(registry.routes(model, retired=True)),
            remaps=lambda _model: False,
        )
        self.jobs = JobPreparer(catalog, registry, self.lifecycle)

    async def screen(self, *, caller: Caller, job: ImageJob) -> ImageJob:
        """Moderate the prompt (and edit inputs) at the level the key's policy allows; a block is
        audited, counted and raised as 400 ``moderation_blocked`` before anything is charged.
        Returns the job with the effective level to forward upstream."""
        outcome = await self._moderation.check_prompt(
            prompt=job.prompt,
            requested_level=job.moderation,
            key_policy=caller.moderation,
            key_id=caller.key_id,
            allow=caller.moderation_allow,
            block=caller.moderation_block,
        )
        if not outcome.blocked and job.images:
            outcome = await self._moderation.check_images(
                images=[image.path for image in job.images],
                requested_level=job.moderation,
                key_policy=caller.moderation,
                key_id=caller.key_id,
            )
        if outcome.audit is not None:
            await shielded(self._audit.record(outcome.audit, request_id=job.request_id))
            self._metrics.observe_moderation_block(
                categories=outcome.audit.categories, stage=outcome.audit.stage
            )
            log.info(
                "request blocked by moderation",
                extra={"fields": {"key_id": caller.key_id, "categories": list(outcome.audit.categories)}},
            )
        outcome.raise_if_blocked()
        if outcome.level == "off" or "moderation" in job.caps.drop_fields or job.caps.family != "gpt-image":
            return job
        # A key forced to `auto` must not be loosened upstream either.
        return replace(job, moderation=outcome.level, forward={**job.forward, "moderation": outcome.level})

    def models_for(self, caller: Caller) -> list[str]:
        """Models this key may use that some upstream serves, in catalog order."""
        return self.jobs.models_for(caller)

    def resolve_model(self, model: str, caller: Caller) -> ModelCapabilities:
        return self.jobs.resolve_model(model, caller)

    async def validate(self, *, caller: Caller, draft: Draft) -> ImageJob:
        """The validation step of admission: a draft becomes a job, or 400/403."""
        return await self.jobs.validate(caller=caller, draft=draft)

    async def admit(
        self,
        *,
        caller: Caller,
        draft: Draft,
        asynchronous: bool = False,
        validated: Callable[[ImageJob], None] | None = None,
    ) -> Admission:
        """The one admission path (sync, stream and async): validate → moderate to the effective
        level → rate-limit → reserve. ``caller`` is the authenticated key; ``validated`` sees the
        job as soon as it is valid (the access log's model). Anything refused is refused here,
        before an upstream is called, and leaves nothing held."""
        job = await self.validate(caller=caller, draft=draft)
        if validated is not None:
            validated(job)
        if asynchronous and job.stream:
            raise InvalidRequestError(
                "stream=true cannot be combined with async=true: poll the task instead.",
                param="stream",
                code="invalid_value",
            )
        if asynchronous:
            job = streamed_for_previews(job)
        job = await self.screen(caller=caller, job=job)
        # A queued task holds no concurrency slot: it is counted against the per-minute limits now.
        grant = await self._limiter.acquire(
            caller.key_id, _limits(caller, concurrency=not asynchronous), images=job.n
        )
        try:
            hold = await self.reserve(caller=caller, job=job)
        except GatewayError as exc:
            await shielded(self._limiter.release(grant))
            exc.headers = {**grant.headers, **exc.headers}
            raise
        except BaseException:
            await shielded(self._limiter.release(grant))
            raise
        if asynchronous:
            await shielded(self._limiter.release(grant))
            return Admission(job=job, hold=hold, grant=None, headers=grant.headers)
        return Admission(job=job, hold=hold, grant=grant, headers=grant.headers)

    async def execute(
        self, *, caller: Caller, admission: Admission, base_url: str
    ) -> ImageOutcome | ImageStream:
        """Run an admitted request now: route/call → relay → settle; frees its slot at the end."""
        job, hold, grant = admission.job, admission.hold, admission.grant
        assert grant is not None, "a synchronous request holds its concurrency slot"
        try:
            if job.stream:
                stream = await self.open_stream(caller=caller, job=job, hold=hold)
                stream.closers.append(lambda: self._limiter.release(grant))
                stream.headers = dict(grant.headers)
                return stream
            finish = self._as_urls(job, base_url) if job.response_format == "url" else None
            outcome = await self.run(caller=caller, job=job, hold=hold, finish=finish)
        except GatewayError as exc:
            await shielded(self._limiter.release(grant))
            exc.headers = {**grant.headers, **exc.headers}
            raise
        except BaseException:
            await shielded(self._limiter.release(grant))
            raise
        await shielded(self._limiter.release(grant))
        outcome.headers.update(grant.headers)
        return outcome

    async def reserve(self, *, caller: Caller, job: ImageJob, ttl_s: float | None = None) -> Hold:
        """Hold the job's worst-case cost (plus the safety margin) against the key's quota and
        balance (429 if it won't fit, or while the key is over either after an overrun)."""
        amount = apply_multiplier(
            worst_case_cost(job, margin_ppm=self._margin_ppm), caller.price_multiplier_ppm
        )
        return await self._ledger.reserve(
            key_id=caller.key_id, amount_micros=amount, request_id=job.request_id, ttl_s=ttl_s
        )

    async def run(
        self,
        *,
        caller: Caller,
        job: ImageJob,
        hold: Hold,
        finish: ResultHook | None = None,
        failed: FailureHook | None = None,
        call: UpstreamCall = DIRECT,
    ) -> ImageOutcome:
        """Route a job to an upstream, wait for the whole result, and settle its hold.

        ``call`` is how it runs (a task's source and provider job to resume); the request's span
        and the "upstream answered" signal are added here.

        ``finish`` turns the upstream's body into what is returned (stored images, URLs) before
        the charge is made, and may add work to the settlement's transaction (a task's outcome).
        If it fails because the image store failed, the upstream's work is charged all the same
        (``failed`` adds the failure to that transaction) and ``ImageStoreError`` is raised.

        The call runs in a task of its own. A cancelled caller (the client left) cancels it only
        while no upstream has answered yet; after that, reading the body, ``finish`` and the charge
        run to their end, and the caller's cancellation goes on once they have.
        """
        answered = asyncio.Event()
        call = replace(call, trace=self._trace(caller, job, mode="sync"), on_answer=answered.set)
        work = background(self._call(caller, job, hold, finish, call, answered, failed))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if not answered.is_set():
                work.cancel()
            # Either way the work settles (a cut call as `cancelled`); wait for it, then go on.
            await asyncio.gather(asyncio.shield(work), return_exceptions=True)
            raise

    async def _call(
        self,
        caller: Caller,
        job: ImageJob,
        hold: Hold,
        finish: ResultHook | None,
        call: UpstreamCall,
        answered: asyncio.Event,
        failed: FailureHook | None = None,
    ) -> ImageOutcome:
        started = time.monotonic()
        tried: list[str] = []
        unstored: ImageStoreError | None = None
        try:
            result, upstream = await self._router.generate(job, tried, call=call)
            answered.set()
            svg = self._svg_charge(job, result, caller)
            body: dict[str, Any] | bytes
            also: CostHook | None = None
            if finish is not None:
                try:
                    body, also = await finish(result.body)
                except ImageStoreError as exc:
                    # The upstream made the images and billed them: charged below, then raised.
                    unstored, body = exc, {}
                    also = failed(exc.to_body()["error"]) if failed is not None else None
            else:
                # `result.body` would parse the upstream's megabytes of base64 only to encode them again.
                body = result.raw if result.raw is not None else result.body
        except BaseException as exc:
            await self._settle_failure(caller, job, hold, exc, started, tried, call)
            raise
        settled = await self.settlement.settle(
            UpstreamOutcome(
                job=job,
                caller=caller,
                hold=hold,
                upstream=upstream,
                status="succeeded" if unstored is None else "failed",
                images=result.image_count,
                usage=result.usage,
                started=started,
                raw_usage=result.raw_usage,
                svg=svg,
                error_code=unstored.code if unstored is not None else None,
                trace=call.trace,
            ),
            also=also,
        )
        if unstored is not None:
            log.error(
                "images could not be stored; the request was charged",
                extra={"fields": {"request_id": job.request_id, "error": unstored.message}},
            )
            raise unstored
        if self._sink is not None and self._sink.wants(caller):
            try:
                self._sink.keep(caller=caller, request_id=job.request_id, images=b64_images(result.body))
            except Exception:
                # A copy for the console is never worth failing a request that is already billed.
                log.exception("keeping image copies failed")
        return ImageOutcome(body=body, cost_micros=settled.cost_micros, model=job.model, upstream=upstream)

    def _svg_charge(self, job: ImageJob, result: ImageResult, caller: Caller) -> SvgCharge | None:
        """SVG output's author tokens, priced from the catalog (the multiplier applies to them too).

        Only SVG answers are parsed for it: a raster answer's megabytes of base64 stay unparsed."""
        if job.output_format != "svg":
            return None
        charge = svg_charge(
            result.body.get("svg_usage"), self._catalog.svg_authors, self._catalog.svg_author_price(None)
        )
        if charge is None:
            return None
        return replace(charge, cost_micros=apply_multiplier(charge.cost_micros, caller.price_multiplier_ppm))

    def _as_urls(self, job: ImageJob, base_url: str) -> ResultHook:
        async def finish(body: dict[str, Any]) -> tuple[dict[str, Any], CostHook | None]:
            stored = await store_images(body, self._store, output_format=job.output_format)
            shown = await render_images(
                stored, self._store, response_format="url", base_url=base_url, ttl_s=self._url_ttl_s
            )
            return shown, None

        return finish

    async def open_stream(
        self, *, caller: Caller, job: ImageJob, hold: Hold, call: UpstreamCall = DIRECT
    ) -> ImageStream:
        """Route a streaming job until an upstream sends its first event (errors before that are
        raised as usual, so the client gets a plain HTTP error); the rest is relayed by the caller."""
        call = replace(call, trace=self._trace(caller, job, mode="stream"))
        started = time.monotonic()
        tried: list[str] = []
        try:
            opened = await self._router.open_stream(job, tried, call=call)
        except BaseException as exc:
            await self._settle_failure(caller, job, hold, exc, started, tried, call)
            raise
        return ImageStream(
            job=job,
            caller=caller,
            opened=opened,
            settlement=self.settlement,
            hold=hold,
            started=started,
            sink=self._sink if self._sink is not None and self._sink.wants(caller) else None,
            trace=call.trace,
        )

    def _trace(self, caller: Caller, job: ImageJob, *, mode: str) -> RequestTrace:
        # The span's outcome is recorded, and the span ended, by the settlement (app/telemetry/tracing.py).
        return self._tracing.start_request(
            operation=job.endpoint,
            model=job.model,
            key_id=caller.key_id,
            request_id=job.request_id,
            mode=mode,
        )

    async def release(self, hold: Hold) -> None:
        """Give back a hold for a request that ends before any upstream call."""
        await self.settlement.release(hold)

    async def _settle_failure(
        self,
        caller: Caller,
        job: ImageJob,
        hold: Hold,
        exc: BaseException,
        started: float,
        tried: list[str],
        call: UpstreamCall,
    ) -> None:
        """No charge; a ledger row only if some upstream was actually reached.

        A cancelled request (the client went away) had its upstream call cut off: ``cancelled``.
        """
        if isinstance(exc, GatewayError):
            upstream, status, code = exc.upstream, "failed", exc.code
        else:
            upstream, status, code = (tried[-1] if tried else None), "cancelled", None
        await self.settlement.settle(
            UpstreamOutcome(
                job=job,
                caller=caller,
                hold=hold,
                upstream=upstream,
                status=status,
                images=0,
                usage=None,
                started=started,
                error_code=code,
                trace=call.trace,
            )
        )


def _limits(caller: Caller, *, concurrency: bool = True) -> KeyLimits:
    return KeyLimits(rpm=caller.rpm, ipm=caller.ipm, concurrency=caller.concurrency if concurrency else None)
