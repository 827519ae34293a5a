"""Per-group ledger totals as the console's charts and cards use them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.billing.reports import ActivityRow


@dataclass(slots=True)
class Totals:
    requests: int = 0
    images: int = 0
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    text_output_tokens: int = 0
    image_output_tokens: int = 0
    cost_micros: int = 0
    errors: int = 0
    latency_ms_total: int = 0

    def add(self, row: ActivityRow) -> None:
        self.requests += row.requests
        self.images += row.images
        self.text_input_tokens += row.text_input_tokens
        self.image_input_tokens += row.image_input_tokens
        self.text_output_tokens += row.text_output_tokens
        self.image_output_tokens += row.image_output_tokens
        self.cost_micros += row.cost_micros
        self.errors += row.errors
        self.latency_ms_total += row.latency_ms_total

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def latency_avg_ms(self) -> float:
        return self.latency_ms_total / self.requests if self.requests else 0.0


def by_group(rows: Iterable[ActivityRow]) -> dict[str, Totals]:
    """Totals per group (day, model or key), in group order."""
    groups: dict[str, Totals] = {}
    for row in rows:
        groups.setdefault(row.group, Totals()).add(row)
    return dict(sorted(groups.items()))


def total(rows: Iterable[ActivityRow]) -> Totals:
    whole = Totals()
    for row in rows:
        whole.add(row)
    return whole
