"""Charts drawn on the server as SVG: real axes, units, value labels and hover titles.

Hand-rolled on purpose: a bar chart is ~100 lines of arithmetic, where a chart library would be a
vendored script to pin, license and audit, plus JSON plumbing and a blank page without JavaScript.
The SVG uses presentation attributes only (no ``style``), so the console's CSP needs no
``'unsafe-inline'``; colours come from console.css through classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

Formatter = Callable[[float], str]


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above ``value`` (axis tops people can read)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    base = 10.0**exponent
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * base * (1 + 1e-9):
            return step * base
    return 10.0 * base


def plain(value: float) -> str:
    if abs(value - round(value)) < 1e-9:
        return f"{int(round(value)):,}"
    return f"{value:,.2f}"


def _tick(text: str) -> str:
    # Axis ticks drop trailing zeros ("0.025000" -> "0.025"); values and tooltips keep them.
    return text.rstrip("0").rstrip(".") if "." in text else text


def bar_chart(
    points: Sequence[tuple[str, float]],
    *,
    title: str,
    unit: str,
    fmt: Formatter = plain,
    chart_id: str,
    axis: str = "day (UTC)",
    width: int = 640,
    height: int = 240,
) -> str:
    """Vertical bars, one per point (a day or a month), with a y axis in ``unit``."""
    left, right, top, bottom = 78, 12, 28, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = _open(chart_id, title, unit, width, height, len(points))
    if not points:
        parts.append(_empty(width, height))
        return "".join([*parts, "</svg>"])
    top_value = nice_ceiling(max(v for _, v in points))
    for i in range(5):
        value = top_value * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(value))}</text>'
        )
    slot = plot_w / len(points)
    bar_w = max(2.0, slot * 0.7)
    label_every = max(1, math.ceil(len(points) / 10))
    for i, (label, value) in enumerate(points):
        h = plot_h * (value / top_value) if top_value else 0
        x = left + i * slot + (slot - bar_w) / 2
        y = top + plot_h - h
        tip = f"{label}: {fmt(value)} {unit}"
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{max(h, 0.5):.1f}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if len(points) <= 16 and value:
            parts.append(
                f'<text class="value" x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">'
                f"{escape(fmt(value))}</text>"
            )
        if i % label_every == 0:
            parts.append(
                f'<text class="tick" x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                f"{escape(_short(label))}</text>"
            )
    parts.append(_axes(left, top, plot_w, plot_h))
    parts.append(
        f'<text class="axis-title" x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{escape(unit)}</text>'
    )
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2:.1f}" y="{height - 6}" '
        f'text-anchor="middle">{escape(axis)}</text>'
    )
    return "".join([*parts, "</svg>"])


def stacked_bar_chart(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    title: str,
    unit: str,
    chart_id: str,
    axis: str = "day (UTC)",
    width: int = 640,
    height: int = 260,
) -> str:
    """Vertical bars stacked by series (``(name, values)``, one value per label), with a legend.

    Each segment's title says the label, the series, its value, its share and the bar's total, so a
    hover answers "how many of that day's requests failed?" without reading the axis. A segment's
    class is ``seg-<name>``: console.css gives each series its colour in both themes.
    """
    left, right, top, bottom = 78, 12, 44, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = _open(chart_id, title, unit, width, height, len(labels))
    for i, (name, _) in enumerate(series):
        lx = 200 + i * 90
        parts.append(f'<rect class="seg-{escape(name)}" x="{lx}" y="{top - 24}" width="10" height="10"/>')
        parts.append(f'<text class="legend" x="{lx + 14}" y="{top - 15}">{escape(name)}</text>')
    totals = [sum(values[i] for _, values in series) for i in range(len(labels))]
    if not labels or not any(totals):
        parts.append(_empty(width, height))
        return "".join([*parts, "</svg>"])
    top_value = nice_ceiling(max(totals))
    for i in range(5):
        value = top_value * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(plain(value))}</text>"
        )
    slot = plot_w / len(labels)
    bar_w = max(2.0, slot * 0.7)
    label_every = max(1, math.ceil(len(labels) / 10))
    for i, label in enumerate(labels):
        x = left + i * slot + (slot - bar_w) / 2
        base: float = top + plot_h
        for name, values in series:
            value = values[i]
            if not value:
                continue
            h = plot_h * value / top_value
            base -= h
            share = 100 * value / totals[i]
            tip = f"{label} · {name}: {plain(value)} {unit} ({share:.0f} % of {plain(totals[i])})"
            parts.append(
                f'<rect class="bar seg-{escape(name)}" x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" '
                f'height="{max(h, 0.5):.1f}"><title>{escape(tip)}</title></rect>'
            )
        if i % label_every == 0:
            parts.append(
                f'<text class="tick" x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                f"{escape(_short(label))}</text>"
            )
    parts.append(_axes(left, top, plot_w, plot_h))
    parts.append(
        f'<text class="axis-title" x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{escape(unit)}</text>'
    )
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2:.1f}" y="{height - 6}" '
        f'text-anchor="middle">{escape(axis)}</text>'
    )
    return "".join([*parts, "</svg>"])


def hbar_chart(
    points: Sequence[tuple[str, float]],
    *,
    title: str,
    unit: str,
    fmt: Formatter = plain,
    chart_id: str,
    width: int = 640,
) -> str:
    """Horizontal bars, one per category (a model, a key), longest names on the left."""
    row_h, left, right, top = 26, 170, 80, 28
    height = top + max(1, len(points)) * row_h + 34
    plot_w = width - left - right
    parts = _open(chart_id, title, unit, width, height, len(points))
    if not points:
        parts.append(_empty(width, height))
        return "".join([*parts, "</svg>"])
    top_value = nice_ceiling(max(v for _, v in points))
    plot_h = len(points) * row_h
    for i in range(5):
        x = left + plot_w * i / 4
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}"/>')
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">'
            f"{escape(_tick(fmt(top_value * i / 4)))}</text>"
        )
    for i, (label, value) in enumerate(points):
        y = top + i * row_h + 4
        w = plot_w * (value / top_value) if top_value else 0
        tip = f"{label}: {fmt(value)} {unit}"
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{y + 13}" text-anchor="end">'
            f"{escape(_short(label, 24))}</text>"
        )
        parts.append(
            f'<rect class="bar" x="{left}" y="{y}" width="{max(w, 0.5):.1f}" height="{row_h - 8}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        parts.append(f'<text class="value" x="{left + w + 4:.1f}" y="{y + 13}">{escape(fmt(value))}</text>')
    parts.append(_axes(left, top, plot_w, plot_h))
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2:.1f}" y="{height - 4}" '
        f'text-anchor="middle">{escape(unit)}</text>'
    )
    return "".join([*parts, "</svg>"])


def _open(chart_id: str, title: str, unit: str, width: int, height: int, count: int) -> list[str]:
    cid = escape(chart_id)
    return [
        f'<svg class="chart" id="{cid}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{cid}-t {cid}-d" data-points="{count}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{cid}-t">{escape(title)}</title>',
        f'<desc id="{cid}-d">{escape(title)}, in {escape(unit)}; {count} bars.</desc>',
        f'<text class="chart-title" x="8" y="16">{escape(title)}</text>',
    ]


def _axes(left: int, top: int, plot_w: float, plot_h: float) -> str:
    return (
        f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>'
        f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}"/>'
    )


def _empty(width: int, height: int) -> str:
    where = f'x="{width / 2}" y="{height / 2}"'
    return f'<text class="empty" {where} text-anchor="middle">No data in this range</text>'


def _short(label: str, limit: int = 12) -> str:
    # Days "2026-12-01" show as "12-01"; other labels are cut with an ellipsis.
    if len(label) == 10 and label[4] == "-" and label[7] == "-":
        return label[5:]
    return label if len(label) <= limit else label[: limit - 1] + "…"
