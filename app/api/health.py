"""Liveness and readiness probes (SPEC §9): what Kubernetes and load balancers take them to mean."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse

from app import __version__
from app.api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers. Says nothing about dependencies, on purpose; names the version
    (one place: app/__init__.py), so a rollout can be watched node by node."""
    return {"status": "ok", "version": __version__}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """Ready: this node can serve. The database answers, Redis answers where it is configured,
    and the node is not draining after SIGTERM. Upstreams are never probed here: an upstream's
    outage is every node's, and its state is on /admin/upstreams and in metrics
    (app/db/readiness.py). Every check is bounded, so this answers within about a second."""
    ready, checks = await state.readiness.check()
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", **checks}, status_code=200 if ready else 503
    )
