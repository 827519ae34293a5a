"""Usage reports: ``GET /admin/usage`` (any key) and ``GET /v1/usage`` (the caller's own key)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.responses import JSONResponse, Response

from app.api.deps import AdminDep, CallerDep, StateDep
from app.billing.reports import UsageFilter, parse_moment, usage_report
from app.runtime.state import AppState

router = APIRouter(tags=["usage"])


async def _report(
    state: AppState,
    *,
    key_id: str | None,
    model: str | None,
    start: str | None,
    end: str | None,
    group_by: Literal["day", "model", "key", "batch"] | None,
    output: Literal["json", "csv"],
) -> Response:
    report = await usage_report(
        state.sessions,
        where=UsageFilter(
            key_id=key_id, model=model, start=parse_moment(start, "from"), end=parse_moment(end, "to")
        ),
        group_by=group_by,
        price_unit=state.settings.price_unit,
    )
    if output == "csv":
        return Response(report.as_csv(), media_type="text/csv; charset=utf-8")
    return JSONResponse(report.as_dict())


Format = Annotated[Literal["json", "csv"], Query(alias="format")]
From = Annotated[str | None, Query(alias="from")]


@router.get("/admin/usage", dependencies=[AdminDep])
async def admin_usage(
    state: StateDep,
    key_id: str | None = None,
    model: str | None = None,
    start: From = None,
    to: str | None = None,
    group_by: Literal["day", "model", "key", "batch"] | None = None,
    output: Format = "json",
) -> Response:
    return await _report(
        state, key_id=key_id, model=model, start=start, end=to, group_by=group_by, output=output
    )


@router.get("/v1/usage")
async def own_usage(
    caller: CallerDep,
    state: StateDep,
    model: str | None = None,
    start: From = None,
    to: str | None = None,
    group_by: Literal["day", "model"] | None = None,
    output: Format = "json",
) -> Response:
    return await _report(
        state, key_id=caller.key_id, model=model, start=start, end=to, group_by=group_by, output=output
    )
