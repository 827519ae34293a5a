"""Read-only pages: overview, usage (charts and CSV), requests, tasks, moderation, upstreams."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app.api.admin_moderation import event_view
from app.api.admin_upstreams import upstream_rows
from app.api.console.web import PAGE_HEADERS, ConsoleDenied, OperatorDep, ViewerDep, render
from app.api.deps import StateDep
from app.api.usage import _report
from app.billing.ledger import period_of
from app.billing.reports import EARLIEST, ActivityRow, UsageFilter, activity, parse_day
from app.console import charts
from app.console.activity import ActivityCache, Totals, by_group, total
from app.console.keyrows import key_choices
from app.console.queries import (
    LogFilter,
    account,
    key_names,
    log_entries,
    log_page,
    request_rows,
    task_page,
    thumbnail_by_image,
    thumbnails_for,
)
from app.console.requestlog import STATUS_CLASSES
from app.console.sessions import Viewer
from app.console.statusmix import StatusMix
from app.core.errors import InvalidRequestError, NotFoundError
from app.domain.money import format_micros
from app.runtime.state import AppState
from app.storage import check_name

router = APIRouter()
PAGE_SIZE = 50
TASK_STATUSES = ("queued", "in_progress", "succeeded", "failed", "cancelled")
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


async def _status_chart(request: Request, state: AppState, span: Span, key_id: str | None) -> str | None:
    """Requests per day stacked by status class (refused ones included: it reads the request log)."""
    if span.bucket != "day":
        return None
    mix: StatusMix = request.app.state.console_status_mix
    per_day = await mix.per_day(state.sessions, key_id=key_id, first=span.first, last=span.last)
    labels = list(per_day)
    return charts.stacked_bar_chart(
        labels,
        [(name, [per_day[day].get(name, 0) for day in labels]) for name in STATUS_CLASSES],
        title="Requests per day by status",
        unit="requests",
        chart_id="requests-by-status",
    )


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
        "charts": [
            chart
            for chart in [await _status_chart(request, state, span, None), *_day_charts(state, cells, span)]
            if chart is not None
        ],
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
    status_chart = await _status_chart(request, state, span, scope)
    chart_list = [
        day_charts[2],
        *([status_chart] if status_chart is not None else [day_charts[0]]),
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
        names = await key_names(state.sessions, [key for key, _ in top])
        chart_list.append(
            charts.hbar_chart(
                # By name: two keys may share one, so the id's head tells them apart.
                [(f"{names.get(key, key)} ({key[:10]}…)", t.cost_micros) for key, t in top],
                title="Spend by key (top 15)",
                unit=unit,
                fmt=_cost,
                chart_id="spend-by-key",
            )
        )
    # A tenant's own key first: its name, what is left, the limits (issue 26's tenant view).
    mine = (
        await account(state.sessions, viewer.key_id, period_of(datetime.now(UTC)))
        if not viewer.is_operator and viewer.key_id
        else None
    )
    context = {
        "account": mine,
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
        "key_choices": await key_choices(state.sessions) if viewer.is_operator else [],
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


def _log_filter(
    viewer: Viewer,
    *,
    key_id: str | None,
    q: str | None,
    status: str | None,
    model: str | None,
    upstream: str | None,
    start: str | None,
    to: str | None,
) -> LogFilter:
    """The Requests page's filters; a tenant's are always narrowed to their own key."""
    if status and status not in STATUS_CLASSES:
        raise ConsoleDenied(400, f"Unknown status class '{status}': use one of {', '.join(STATUS_CLASSES)}.")
    try:
        first = parse_day(start, "from")
        last = parse_day(to, "to")
    except InvalidRequestError as exc:
        raise ConsoleDenied(400, exc.message) from None
    return LogFilter(
        key_id=_scope(viewer, key_id),
        q=(q or "").strip() or None,
        status_class=status or None,
        model=model or None,
        upstream=(upstream or None) if viewer.is_operator else None,
        since=datetime(first.year, first.month, first.day, tzinfo=UTC) if first else None,
        until=datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1) if last else None,
    )


async def _caught_up(state: AppState) -> None:
    """This node's queued log entries first, so a page shows every request this node answered."""
    if state.request_log is not None:
        await state.request_log.flush()


@router.get("/requests")
async def requests_page(
    request: Request,
    viewer: ViewerDep,
    state: StateDep,
    key_id: Text = None,
    q: Text = None,
    model: Text = None,
    status: Text = None,
    upstream: Text = None,
    start: Annotated[str | None, Query(alias="from", max_length=20)] = None,
    to: Annotated[str | None, Query(max_length=20)] = None,
    before: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> Response:
    """The request log (every /v1 request, refused ones too), with search, filters and CSV."""
    where = _log_filter(
        viewer, key_id=key_id, q=q, status=status, model=model, upstream=upstream, start=start, to=to
    )
    await _caught_up(state)
    page = await log_page(state.sessions, where, before=before, limit=PAGE_SIZE)
    thumbs = await thumbnails_for(state.sessions, [row.request_id for row in page.rows])
    names = await key_names(state.sessions, [row.key_id for row in page.rows])
    params = {
        "key_id": where.key_id if viewer.is_operator else None,
        "q": where.q,
        "model": where.model,
        "status": where.status_class,
        "upstream": where.upstream,
        "from": start,
        "to": to,
    }
    query = urlencode({k: v for k, v in params.items() if v})
    return render(
        request,
        "requests.html",
        {
            "page": page,
            "thumbs": thumbs,
            "names": names,
            "filter": where,
            "start": start or "",
            "to": to or "",
            "query": query,
            "models": state.catalog.names(),
            "statuses": STATUS_CLASSES,
            "upstreams": [u.name for u in state.settings.upstreams],
            "thumbnails_default": state.settings.console.thumbnails,
        },
    )


CSV_COLUMNS = (
    "time",
    "request_id",
    "key_id",
    "key_name",
    "method",
    "route",
    "model",
    "status",
    "status_class",
    "error_code",
    "error_message",
    "upstream",
    "latency_ms",
    "tokens",
    "cost",
    "prompt_sha256",
)
# Rows one export holds at most (a keyset walk of CSV_PAGE rows at a time, streamed).
CSV_MAX_ROWS = 100_000
CSV_PAGE = 1_000


@router.get("/requests.csv")
async def requests_csv(
    viewer: ViewerDep,
    state: StateDep,
    key_id: Text = None,
    q: Text = None,
    model: Text = None,
    status: Text = None,
    upstream: Text = None,
    start: Annotated[str | None, Query(alias="from", max_length=20)] = None,
    to: Annotated[str | None, Query(max_length=20)] = None,
) -> Response:
    """The Requests page's rows as CSV, same filters, newest first, streamed page by page."""
    where = _log_filter(
        viewer, key_id=key_id, q=q, status=status, model=model, upstream=upstream, start=start, to=to
    )
    await _caught_up(state)
    show_upstream = viewer.is_operator

    async def rows() -> AsyncIterator[str]:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        before: int | None = None
        sent = 0
        while sent < CSV_MAX_ROWS:
            page = await log_page(state.sessions, where, before=before, limit=CSV_PAGE)
            for row in page.rows:
                writer.writerow(
                    (
                        row.created_at.isoformat(),
                        row.request_id,
                        row.key_id or "",
                        _csv_safe(row.key_name or ""),
                        row.method,
                        row.route,
                        row.model or "",
                        row.status,
                        row.status_class,
                        row.error_code or "",
                        _csv_safe(row.error_message or ""),
                        (row.upstream or "") if show_upstream else "",
                        row.latency_ms,
                        row.tokens,
                        format_micros(row.cost_micros),
                        row.prompt_sha256 or "",
                    )
                )
            sent += len(page.rows)
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            if page.next_before is None:
                return
            before = int(page.next_before)

    return StreamingResponse(
        rows(),
        media_type="text/csv; charset=utf-8",
        headers={**PAGE_HEADERS, "content-disposition": 'attachment; filename="requests.csv"'},
    )


def _csv_safe(text: str) -> str:
    """A cell a spreadsheet will not run as a formula (names and messages come from clients)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@router.get("/requests/{request_id}")
async def request_detail(request: Request, request_id: str, viewer: ViewerDep, state: StateDep) -> Response:
    """One request: its log entry (refused ones too), its ledger rows and thumbnails."""
    own = None if viewer.is_operator else viewer.key_id
    await _caught_up(state)
    entries = await log_entries(state.sessions, request_id[:64], key_id=own)
    rows = await request_rows(state.sessions, request_id[:64], key_id=own)
    if not rows and not entries:
        # Another key's request is indistinguishable from a missing one.
        raise ConsoleDenied(404, "No such request.")
    thumbs = await thumbnails_for(state.sessions, [request_id])
    names = await key_names(state.sessions, [*(e.key_id for e in entries), *(r.key_id for r in rows)])
    return render(
        request,
        "request.html",
        {
            "entries": entries,
            "rows": rows,
            "names": names,
            "request_id": request_id,
            "thumbs": thumbs.get(request_id, []),
        },
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
    names = await key_names(state.sessions, [t.key_id for t in page.rows]) if viewer.is_operator else {}
    return render(
        request,
        "tasks.html",
        {
            "page": page,
            "names": names,
            "depth": await state.tasks.queue.depth(),
            "key_choices": await key_choices(state.sessions) if viewer.is_operator else [],
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
            "names": await key_names(state.sessions, [e["key_id"] for e in events]),
            "key_choices": await key_choices(state.sessions),
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
