"""The image request path, top to bottom in one place.

authenticate (done by the caller) → validate → moderate → reserve → route/call → relay → settle.
Moderation (SPEC §4) and reservations (SPEC §5) take their place in this sequence as they are
built; until then a request goes from validation straight to routing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from app.billing.ledger import LedgerRecord, LedgerService
from app.billing.pricing import request_cost
from app.errors import GatewayError, InvalidRequestError, ModelNotAllowedError, ModelNotFoundError
from app.images.capabilities import Catalog, ModelCapabilities
from app.images.validation import build_job, parse_generate_request
from app.keys import Caller
from app.upstream.registry import ProviderRegistry
from app.upstream.router import Router

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageOutcome:
    """A completed request: the body to relay and what it cost."""

    body: dict[str, Any]
    cost_micros: int
    model: str
    upstream: str


class ImageService:
    def __init__(
        self, *, catalog: Catalog, registry: ProviderRegistry, router: Router, ledger: LedgerService
    ) -> None:
        self._catalog = catalog
        self._registry = registry
        self._router = router
        self._ledger = ledger

    def models_for(self, caller: Caller) -> list[str]:
        """Models this key may use that some upstream serves, in catalog order."""
        return [m for m in self._registry.models() if caller.may_use(m)]

    def resolve_model(self, model: str, caller: Caller) -> ModelCapabilities:
        caps = self._catalog.get(model)
        if caps is None or model not in self._registry.models():
            raise ModelNotFoundError(model, self.models_for(caller))
        if not caller.may_use(model):
            raise ModelNotAllowedError(model)
        return caps

    async def generate(
        self, *, caller: Caller, payload: Any, request_id: str, query_response_format: str | None = None
    ) -> ImageOutcome:
        """Run a generation synchronously and bill it."""
        # validate
        request = parse_generate_request(payload)
        caps = self.resolve_model(request.model, caller)
        job = build_job(
            request=request, caps=caps, request_id=request_id, query_response_format=query_response_format
        )
        if job.response_format == "url":
            raise InvalidRequestError(
                "response_format 'url' needs the gateway's image store, which is not enabled on this "
                "gateway; use 'b64_json'.",
                param="response_format",
                code="unsupported_value",
            )
        if job.stream:
            raise InvalidRequestError(
                "Streaming responses are not enabled on this gateway yet; omit 'stream'.",
                param="stream",
                code="unsupported_value",
            )

        # route/call
        started = time.monotonic()
        try:
            result, upstream = await self._router.generate(job)
        except GatewayError as exc:
            if exc.upstream is not None:
                await self._ledger.record(
                    LedgerRecord(
                        request_id=request_id,
                        key_id=caller.key_id,
                        model=job.model,
                        upstream=exc.upstream,
                        endpoint=job.endpoint,
                        status="failed",
                        images=0,
                        usage=None,
                        cost_micros=0,
                        latency_ms=_ms_since(started),
                        error_code=exc.code,
                    )
                )
            raise

        # settle
        cost, usage = request_cost(job, result.usage, result.image_count)
        await self._ledger.record(
            LedgerRecord(
                request_id=request_id,
                key_id=caller.key_id,
                model=job.model,
                upstream=upstream,
                endpoint=job.endpoint,
                status="succeeded",
                images=result.image_count,
                usage=usage,
                cost_micros=cost,
                latency_ms=_ms_since(started),
                raw_usage=result.raw_usage,
            )
        )
        log.info(
            "image request completed",
            extra={
                "fields": {
                    "key_id": caller.key_id,
                    "model": job.model,
                    "upstream": upstream,
                    "images": result.image_count,
                    "cost_micros": cost,
                    "latency_ms": _ms_since(started),
                }
            },
        )
        return ImageOutcome(body=result.body, cost_micros=cost, model=job.model, upstream=upstream)


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
