"""Read-only pages: overview, usage (charts and CSV), requests, tasks, moderation, upstreams."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from app.api.admin_moderation import event_view
from app.api.admin_upstreams import upstream_rows
from app.api.console.web import PAGE_HEADERS, ConsoleDenied, OperatorDep, ViewerDep, render
from app.api.deps import StateDep
from app.api.usage import _report
from app.billing.reports import EARLIEST, ActivityRow, UsageFilter, activity, parse_day
from app.console import charts
from app.console.activity import ActivityCache, Totals, by_group, total
from app.console.queries import (
    LedgerFilter,
    ledger_page,
    request_rows,
    task_page,
    thumbnail_by_image,
    thumbnails_for,
)
from app.console.sessions import Viewer
from app.domain.money import format_micros
from app.errors import InvalidRequestError, NotFoundError
from app.state import AppState
from app.storage import check_name

router = APIRouter()
PAGE_SIZE = 50
STATUSES = ("succeeded", "failed", "cancelled")
TASK_STATUSES = ("queued", "in_progress", "succeeded", "failed")
Text = Annotated[str | None, Query(max_length=200)]


def _cost(micros: float) -> str:
    return format_micros(int(micros))


# A chart draws at most a year of daily bars; a longer range is drawn by month, and one longer
# than MAX_RANGE_DAYS is refused before any work (each bar is a point the page builds and sends).
MAX_DAILY_DAYS = 366
MAX_RANGE_DAYS = 366 * 50


@dataclass(frozen=True, slots=True)
class Span:
    """The inclusive UTC days a page shows and the bucket its charts use."""

    first: date
    last: date

    @property
    def bucket(self) -> Literal["day", "month"]:
        return "day" if (self.last - self.first).days < MAX_DAILY_DAYS else "month"

    def labels(self) -> list[str]:
        if self.bucket == "day":
            return [
                (self.first + timedelta(days=i)).isoformat() for i in range((self.last - self.first).days + 1)
            ]
        months = (self.last.year - self.first.year) * 12 + self.last.month - self.first.month + 1
        start = self.first.year * 12 + self.first.month - 1
        return [f"{(start + i) // 12:04d}-{(start + i) % 12 + 1:02d}" for i in range(months)]


def _span(start: str | None, end: str | None, *, default_days: int) -> Span:
    """The range a page shows; an unreadable, out-of-range or too long range is a 400."""
    try:
        last = parse_day(end, "to") or datetime.now(UTC).date()
        first = parse_day(start, "from") or max(EARLIEST.date(), last - timedelta(days=default_days - 1))
    except InvalidRequestError as exc:
        raise ConsoleDenied(400, exc.message) from None
    if first > last:
        first, last = last, first
    if (last - first).days >= MAX_RANGE_DAYS:
        raise ConsoleDenied(
            400, f"The range is too long: at most {MAX_RANGE_DAYS // 366} years (drawn by month past a year)."
        )
    return Span(first, last)


def _bounds(span: Span) -> tuple[datetime, datetime]:
    first, last = span.first, span.last
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    return start, end


async def _timeline(request: Request, state: AppState, where: UsageFilter, span: Span) -> list[ActivityRow]:
    """Rows per chart bucket: days through the per-day cache, months straight from the ledger."""
    if span.bucket == "day":
        return await _activity(request).rows(state.sessions, where=where, group_by="day")
    return await activity(state.sessions, where=where, group_by="month")


def _activity(request: Request) -> ActivityCache:
    cache: ActivityCache = request.app.state.console_activity
    return cache


def _scope(viewer: Viewer, key_id: str | None) -> str | None:
    """A tenant always sees only their own key; the operator may pick one or see all."""
    return viewer.key_id if not viewer.is_operator else (key_id or None)


def _day_charts(state: AppState, days_rows: list[ActivityRow], span: Span) -> list[str]:
    """Requests, images, spend, error rate and latency per day or month (empty buckets show 0)."""
    by_day = by_group(days_rows)
    days = span.labels()
    unit = state.settings.price_unit
    per = span.bucket
    axis = f"{per} (UTC)"

    def series(pick: Callable[[Totals], float]) -> list[tuple[str, float]]:
        return [(d, pick(by_day[d]) if d in by_day else 0.0) for d in days]

    return [
        charts.bar_chart(
            series(lambda t: t.requests),
            title=f"Requests per {per}",
            unit="requests",
            chart_id="requests-by-day",
            axis=axis,
        ),
        charts.bar_chart(
            series(lambda t: t.images),
            title=f"Images per {per}",
            unit="images",
            chart_id="images-by-day",
            axis=axis,
        ),
        charts.bar_chart(
            series(lambda t: t.cost_micros),
            title=f"Spend per {per}",
            unit=unit,
            fmt=_cost,
            chart_id="spend-by-day",
            axis=axis,
        ),
        charts.bar_chart(
            series(lambda t: t.error_rate * 100),
            title=f"Error rate per {per}",
            unit="% of requests",
            fmt=lambda v: f"{v:.1f}",
            chart_id="errors-by-day",
            axis=axis,
        ),
        charts.bar_chart(
            series(lambda t: t.latency_avg_ms),
            title=f"Mean latency per {per}",
            unit="ms",
            fmt=lambda v: f"{v:,.0f}",
            chart_id="latency-by-day",
            axis=axis,
        ),
    ]


@router.get("/overview")
async def overview(
    request: Request,
    viewer: OperatorDep,
    state: StateDep,
    start: Annotated[str | None, Query(alias="from")] = None,
    to: Text = None,
) -> Response:
    span = _span(start, to, default_days=14)
    begin, end = _bounds(span)
    # One grouped query over the range feeds the cards and every chart.
    cells = await _timeline(request, state, UsageFilter(start=begin, end=end), span)
    context = {
        "viewer": viewer,
        "totals": total(cells),
        "charts": _day_charts(state, cells, span),
        "first": span.first.isoformat(),
        "last": span.last.isoformat(),
        "queue_depth": await state.tasks.queue.depth(),
        "upstreams": upstream_rows(state),
    }
    return render(request, "overview.html", context)


@router.get("/usage")
async def usage(
    request: Request,
    viewer: ViewerDep,
    state: StateDep,
    start: Annotated[str | None, Query(alias="from")] = None,
    to: Text = None,
    key_id: Text = None,
    model: Text = None,
) -> Response:
    span = _span(start, to, default_days=30)
    begin, end = _bounds(span)
    scope = _scope(viewer, key_id)
    where = UsageFilter(key_id=scope, model=model or None, start=begin, end=end)
    unit = state.settings.price_unit
    cells = await _timeline(request, state, where, span)
    day_charts = _day_charts(state, cells, span)
    by_model = by_group(await _activity(request).rows(state.sessions, where=where, group_by="model"))
    chart_list = [
        day_charts[2],
        day_charts[0],
        charts.hbar_chart(
            [(name, t.cost_micros) for name, t in by_model.items()],
            title="Spend by model",
            unit=unit,
            fmt=_cost,
            chart_id="spend-by-model",
        ),
    ]
    if viewer.is_operator and scope is None:
        by_key = by_group(await _activity(request).rows(state.sessions, where=where, group_by="key"))
        top = sorted(by_key.items(), key=lambda item: -item[1].cost_micros)[:15]
        chart_list.append(
            charts.hbar_chart(
                [(name, t.cost_micros) for name, t in top],
                title="Spend by key (top 15)",
                unit=unit,
                fmt=_cost,
                chart_id="spend-by-key",
            )
        )
    context = {
        "totals": total(cells),
        "charts": chart_list,
        "first": span.first.isoformat(),
        "last": span.last.isoformat(),
        "key_id": scope or "",
        "model": model or "",
        "models": state.catalog.names(),
        "by_model": by_model,
        # The CSV is the admin API's report for the same range (`to` exclusive, as the API takes it).
        "csv_query": {
            "from": begin.date().isoformat(),
            "to": end.date().isoformat(),
            "key_id": scope or "",
            "model": model or "",
        },
    }
    return render(request, "usage.html", context)


@router.get("/usage.csv")
async def usage_csv(
    viewer: ViewerDep,
    state: StateDep,
    start: Annotated[str | None, Query(alias="from")] = None,
    to: Text = None,
    key_id: Text = None,
    model: Text = None,
    group_by: Literal["day", "model", "key"] = "day",
) -> Response:
    """The very report ``/admin/usage?format=csv`` (or ``/v1/usage``) answers, for the session's scope."""
    scope = _scope(viewer, key_id)
    grouping: Literal["day", "model", "key"] = (
        "day" if group_by == "key" and not viewer.is_operator else group_by
    )
    response = await _report(
        state,
        key_id=scope,
        model=model or None,
        start=start,
        end=to,
        group_by=grouping,
        output="csv",
    )
    response.headers["content-disposition"] = 'attachment; filename="usage.csv"'
    return response


@router.get("/requests")
async def requests_page(
    request: Request,
    viewer: ViewerDep,
    state: StateDep,
    key_id: Text = None,
    model: Text = None,
    status: Text = None,
    upstream: Text = None,
    before: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> Response:
    where = LedgerFilter(key_id=_scope(viewer, key_id), model=model, status=status, upstream=upstream)
    page = await ledger_page(state.sessions, where, before=before, limit=PAGE_SIZE)
    thumbs = await thumbnails_for(state.sessions, [row.request_id for row in page.rows])
    return render(
        request,
        "requests.html",
        {
            "page": page,
            "thumbs": thumbs,
            "filter": where,
            "models": state.catalog.names(),
            "statuses": STATUSES,
            "upstreams": [u.name for u in state.settings.upstreams],
            "thumbnails_default": state.settings.console.thumbnails,
        },
    )


@router.get("/requests/{request_id}")
async def request_detail(request: Request, request_id: str, viewer: ViewerDep, state: StateDep) -> Response:
    rows = await request_rows(
        state.sessions, request_id[:64], key_id=None if viewer.is_operator else viewer.key_id
    )
    if not rows:
        # Another key's request is indistinguishable from a missing one.
        raise ConsoleDenied(404, "No such request.")
    thumbs = await thumbnails_for(state.sessions, [request_id])
    return render(
        request,
        "request.html",
        {"rows": rows, "request_id": request_id, "thumbs": thumbs.get(request_id, [])},
    )


@router.get("/api/requests/{request_id}")
async def request_json(request_id: str, viewer: ViewerDep, state: StateDep) -> Response:
    """The playground's view of a request it just made: status and cost once it has settled."""
    rows = await request_rows(
        state.sessions, request_id[:64], key_id=None if viewer.is_operator else viewer.key_id
    )
    if not rows:
        raise NotFoundError(f"No request with id '{request_id}'.", param="request_id")
    row = rows[-1]
    body = {
        "request_id": row.request_id,
        "status": row.status,
        "model": row.model,
        "images": row.images,
        "cost": format_micros(sum(r.cost_micros for r in rows)),
        "latency_ms": row.latency_ms,
    }
    return JSONResponse(body, headers=PAGE_HEADERS)


@router.get("/thumbs/{name}")
async def thumbnail(name: str, viewer: ViewerDep, state: StateDep) -> Response:
    row = await thumbnail_by_image(state.sessions, check_name(name))
    if row is None or (not viewer.is_operator and row.key_id != viewer.key_id):
        raise ConsoleDenied(404, "No such image.")
    try:
        data = await state.store.read(row.image)
    except NotFoundError:
        raise ConsoleDenied(404, "This thumbnail has expired.") from None
    return Response(data, media_type="image/webp", headers={"cache-control": "private, max-age=300"})


@router.get("/tasks")
async def tasks_page(
    request: Request,
    viewer: ViewerDep,
    state: StateDep,
    key_id: Text = None,
    status: Text = None,
    before: Text = None,
) -> Response:
    page = await task_page(
        state.sessions, key_id=_scope(viewer, key_id), status=status, before=before, limit=PAGE_SIZE
    )
    return render(
        request,
        "tasks.html",
        {
            "page": page,
            "depth": await state.tasks.queue.depth(),
            "key_id": _scope(viewer, key_id) or "",
            "status": status or "",
            "statuses": TASK_STATUSES,
        },
    )


@router.get("/moderation")
async def moderation_page(
    request: Request,
    viewer: OperatorDep,  # noqa: ARG001
    state: StateDep,
    key_id: Text = None,
    category: Text = None,
    before: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> Response:
    rows = await state.moderation_log.recent(
        key_id=key_id or None, category=category or None, limit=PAGE_SIZE, before=before
    )
    events = [event_view(row) for row in rows]
    return render(
        request,
        "moderation.html",
        {
            "events": events,
            "key_id": key_id or "",
            "category": category or "",
            "next_before": events[-1]["id"] if len(events) == PAGE_SIZE else None,
        },
    )


@router.get("/upstreams")
async def upstreams_page(request: Request, viewer: OperatorDep, state: StateDep) -> Response:  # noqa: ARG001
    return render(request, "upstreams.html", {"upstreams": upstream_rows(state)})


@router.get("/api/upstreams")
async def upstreams_json(viewer: OperatorDep, state: StateDep) -> Response:  # noqa: ARG001
    return JSONResponse({"object": "list", "data": upstream_rows(state)}, headers=PAGE_HEADERS)
