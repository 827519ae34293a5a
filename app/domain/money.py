"""Money in integer micro-units of the price unit (1 = 0.000001): no float ever touches a charge."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

MICROS = 1_000_000


class MoneyError(ValueError):
    """An amount that is not an exact multiple of one micro-unit; the message names where."""


def to_micros(value: Any, *, where: str) -> int:
    """``2.5``, ``"0.016"`` or ``Decimal("3")`` → exact non-negative integer micro-units.

    Going through ``str`` keeps a YAML float's decimal text (``0.1`` stays 100000, not the binary
    0.1000000000000000055…), and a value finer than a micro-unit is refused rather than rounded.
    """
    try:
        amount = Decimal(str(value)) * MICROS
    except InvalidOperation as exc:
        raise MoneyError(f"{where}: not a number: {value!r}") from exc
    if not amount.is_finite() or amount != amount.to_integral_value() or amount < 0:
        raise MoneyError(f"{where}: {value!r} is not a non-negative multiple of 0.000001")
    return int(amount)


def format_micros(amount: int) -> str:
    """``10880`` → ``"0.010880"``: exact decimal text for headers and reports."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICROS)
    return f"{sign}{whole}.{frac:06d}"


def apply_multiplier(amount: int, multiplier_ppm: int) -> int:
    """A per-key price multiplier (parts per million), rounded up like every charge."""
    if multiplier_ppm == MICROS:
        return amount
    return -(-amount * multiplier_ppm // MICROS)
