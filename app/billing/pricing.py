"""Cost of a request in integer micro-units of the price unit (no floats anywhere).

Token-priced models: cost = ceil(Σ tokens_kind × price_kind / 1e6), with prices held in micro-units
per 1M tokens, so the only rounding is one ceiling on the total (never under-bill by a micro-unit).
Per-image models (dall-e) are charged from the catalog's per-image table.
"""

from __future__ import annotations

import math

from app.domain.catalog import ModelCapabilities
from app.domain.jobs import ImageJob, TokenUsage
from app.domain.money import MICROS

TOKENS_PER_MILLION = 1_000_000


def estimate_text_tokens(text: str) -> int:
    """Rough prompt token count (≈4 characters a token) for when an upstream reports none."""
    return math.ceil(len(text) / 4)


def _input_image_tokens(job: ImageJob, *, worst: bool = False) -> int:
    count = len(job.images) + (1 if job.mask is not None else 0)
    if not count or job.caps.edit is None:
        return 0
    fidelity = job.input_fidelity
    if fidelity is None and worst and "high" in job.caps.edit.input_image_tokens:
        fidelity = "high"  # a reservation must cover the dearer reading
    return job.caps.edit.input_tokens(fidelity, count)


def estimated_usage(job: ImageJob, images: int) -> TokenUsage:
    """What the catalog says a request like this uses, marked as an estimate."""
    per_image = job.caps.output_tokens_per_image(job.quality, job.size)
    return TokenUsage(
        text_input=estimate_text_tokens(job.prompt),
        image_input=_input_image_tokens(job),
        image_output=per_image * images,
        estimated=True,
    )


def token_cost(caps: ModelCapabilities, usage: TokenUsage) -> int:
    prices = caps.prices
    numerator = (
        usage.text_input * prices.text_input
        + usage.image_input * prices.image_input
        + usage.text_output * prices.text_output
        + usage.image_output * prices.image_output
    )
    return -(-numerator // TOKENS_PER_MILLION)


def per_image_cost(caps: ModelCapabilities, *, quality: str, size: str, images: int) -> int:
    table = caps.prices.per_image.get(quality) or next(iter(caps.prices.per_image.values()), {})
    price = table.get(caps.resolve_size(size))
    if price is None:
        price = max(table.values(), default=0)
    return price * images


def request_cost(job: ImageJob, usage: TokenUsage | None, images: int) -> tuple[int, TokenUsage | None]:
    """The charge for a completed request, and the usage it was computed from.

    GPT-Image without reported usage falls back to the catalog estimate (marked ``estimated``).
    """
    caps = job.caps
    if caps.prices.per_image and not caps.reports_usage:
        return per_image_cost(caps, quality=job.quality, size=job.size, images=images), usage
    if usage is None:
        usage = estimated_usage(job, images)
    return token_cost(caps, usage), usage


# OpenAI bills each streamed partial image as this many extra image output tokens.
PARTIAL_IMAGE_OUTPUT_TOKENS = 100


def worst_case_usage(job: ImageJob) -> TokenUsage:
    """The most tokens of each kind the upstream can bill for this request, from the catalog.

    Text input is bounded by the prompt's UTF-8 length (a token is at least one byte); image
    output by the catalog's table for the request's size (pixel-scaled for sizes off the table)
    at its quality (``auto``, for either, takes the dearest), times ``n``, plus each partial
    image a stream may send; image input by the dearer fidelity for every input image and the
    mask. Text output has no catalog bound: it is covered by the safety margin, else it is an
    overrun (see ``Settlement``).
    """
    caps = job.caps
    sizes = [s for s in caps.sizes if s != "auto"] if job.size == "auto" else [job.size]
    if job.quality == "auto":
        per_image = max((caps.max_output_tokens_per_image(size) for size in sizes), default=0)
    else:
        per_image = max((caps.output_tokens_per_image(job.quality, size) for size in sizes), default=0)
    partials = job.partial_images * PARTIAL_IMAGE_OUTPUT_TOKENS * job.n if job.stream else 0
    return TokenUsage(
        text_input=len(job.prompt.encode("utf-8")),
        image_input=_input_image_tokens(job, worst=True),
        image_output=per_image * job.n + partials,
    )


def worst_case_cost(job: ImageJob, *, margin_ppm: int = 0) -> int:
    """What a request can cost at most, reserved before any upstream is called: the catalog's
    worst case, plus ``margin_ppm`` parts per million of it for upstreams that bill more than
    the catalog says (rounded up, like every charge)."""
    caps = job.caps
    if caps.prices.per_image and not caps.reports_usage:
        base = per_image_cost(caps, quality=job.quality, size=job.size, images=job.n)
    else:
        base = token_cost(caps, worst_case_usage(job))
    return base + -(-base * margin_ppm // MICROS)
