"""``GET /admin/upstreams``: each upstream's health as the router sees it (breaker, load, errors)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from app.api.deps import AdminDep, StateDep
from app.runtime.state import AppState

router = APIRouter(prefix="/admin/upstreams", tags=["admin"], dependencies=[AdminDep])


@router.get("")
async def list_upstreams(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": upstream_rows(state)}


def upstream_rows(state: AppState) -> list[dict[str, Any]]:
    """Each upstream's health; the admin API and the console's upstreams page show the same."""
    now_wall, now_mono = time.time(), time.monotonic()
    configured = {u.name: u for u in state.settings.upstreams}
    waiting = state.router.waiting()
    data = []
    for snapshot in state.router.snapshots():
        upstream = configured.get(snapshot.name)
        opened_at = None
        if snapshot.opened_at is not None:
            # The breaker keeps monotonic time; clients want a wall-clock timestamp.
            opened_at = int(now_wall - (now_mono - snapshot.opened_at))
        data.append(
            {
                "name": snapshot.name,
                "object": "gateway.upstream",
                "kind": upstream.kind if upstream else None,
                "priority": upstream.priority if upstream else None,
                "weight": upstream.weight if upstream else None,
                "state": str(snapshot.state),
                "consecutive_failures": snapshot.consecutive_failures,
                "error_rate": snapshot.error_rate,
                "requests_in_window": snapshot.requests_in_window,
                "in_flight": snapshot.in_flight,
                "max_concurrency": upstream.max_concurrency if upstream else None,
                # Calls waiting for a slot while the upstream is at max_concurrency, by source.
                "waiting": waiting.get(snapshot.name, {"request": 0, "task": 0}),
                "latency_p50_ms": snapshot.latency_p50_ms,
                "latency_avg_ms": snapshot.latency_avg_ms,
                "opened_at": opened_at,
                "retry_in_s": snapshot.retry_in_s,
            }
        )
    return data
