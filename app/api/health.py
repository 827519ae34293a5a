"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from sqlalchemy import text
from starlette.responses import JSONResponse

from app.api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers. Says nothing about dependencies, on purpose."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """Ready: the database answers and at least one upstream is reachable."""
    try:
        async with state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        database = "ok"
    except Exception:  # any failure means "not ready"; the reason is for the log, not the probe
        database = "unavailable"
    providers = state.registry.providers()
    results = await asyncio.gather(*(p.probe() for p in providers))
    upstreams = {p.name: ("ok" if ok else "unreachable") for p, ok in zip(providers, results, strict=True)}
    ready = database == "ok" and any(results)
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "database": database, "upstreams": upstreams},
        status_code=200 if ready else 503,
    )
