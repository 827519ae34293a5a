"""The charge for an answer's ``svg_usage``: the tokens of the model that authored the SVG.

Image generation reports its own ``usage``; SVG output adds ``svg_usage`` (``model``,
``input_tokens``, ``output_tokens``, ``reasoning_tokens``, ``total_tokens``) for the text model
that wrote the document. Those tokens are priced at that author's rates from the catalog's
``svg_authors`` table, in integer micro-units, rounded up once on their own: the ledger row records
them and their cost apart from the image's. ``svg.model`` is any string (a new OpenAI author model
must not wait for a catalog edit): an author missing from the table is priced at the catalog's
default author rate (``svg_author_default``; unset, the dearest listed author, so nothing is
under-billed) and the row is marked estimated. Reasoning tokens are part of ``output_tokens``, as in every
OpenAI usage object, and are recorded but not billed twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.domain.catalog import SvgAuthorPrice

TOKENS_PER_MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class SvgCharge:
    """What the SVG author used and what it costs, as the ledger records it."""

    model: str | None
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_micros: int
    # Priced at the default author rate: the author is not in the catalog's table.
    estimated: bool = False


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def svg_charge(
    svg_usage: Any, price_of: Mapping[str, SvgAuthorPrice] | None, fallback: SvgAuthorPrice
) -> SvgCharge | None:
    """The charge for one ``svg_usage`` object, or None when the answer has none."""
    if not isinstance(svg_usage, Mapping):
        return None
    model = svg_usage.get("model")
    # The ledger's column holds 100 characters; an upstream's longer name is cut, not refused.
    author = model[:100] if isinstance(model, str) and model else None
    known = (price_of or {}).get(author or "")
    price = known or fallback
    input_tokens = _count(svg_usage.get("input_tokens"))
    output_tokens = _count(svg_usage.get("output_tokens"))
    numerator = input_tokens * price.input + output_tokens * price.output
    return SvgCharge(
        model=author,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        reasoning_tokens=_count(svg_usage.get("reasoning_tokens")),
        cost_micros=-(-numerator // TOKENS_PER_MILLION),
        estimated=known is None and input_tokens + output_tokens > 0,
    )
