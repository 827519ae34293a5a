"""Build the adapters of the image providers with their own wire formats from upstream settings."""

from __future__ import annotations

from typing import Any

from app.upstream.base import ImageProvider
from app.upstream.config import UpstreamSettings


def native_provider(upstream: UpstreamSettings) -> ImageProvider:
    """The adapter for a ``gemini``, ``imagen``, ``bfl`` or ``stability`` upstream."""
    common: dict[str, Any] = {
        "name": upstream.name,
        "api_key": upstream.api_key.get_secret_value() if upstream.api_key else None,
        "timeout_s": upstream.timeout_s,
        "connect_timeout_s": upstream.connect_timeout_s,
        "max_connections": upstream.max_concurrency,
    }
    if upstream.kind == "gemini":
        from app.upstream.providers.gemini import DEFAULT_BASE_URL, GeminiProvider

        return GeminiProvider(base_url=upstream.base_url or DEFAULT_BASE_URL, **common)
    if upstream.kind == "imagen":
        from app.upstream.providers.imagen import DEFAULT_BASE_URL as IMAGEN_URL
        from app.upstream.providers.imagen import ImagenProvider

        return ImagenProvider(base_url=upstream.base_url or IMAGEN_URL, **common)
    if upstream.kind == "bfl":
        from app.upstream.providers.bfl import (
            DEFAULT_BASE_URL as BFL_URL,
        )
        from app.upstream.providers.bfl import (
            DEFAULT_DELIVERY_HOSTS,
            DEFAULT_POLLING_HOSTS,
            FluxProvider,
        )

        return FluxProvider(
            base_url=upstream.base_url or BFL_URL,
            polling_hosts=upstream.polling_hosts
            if upstream.polling_hosts is not None
            else DEFAULT_POLLING_HOSTS,
            delivery_hosts=(
                upstream.delivery_hosts if upstream.delivery_hosts is not None else DEFAULT_DELIVERY_HOSTS
            ),
            poll_budget_s=upstream.poll_budget_s,
            poll_interval_s=upstream.poll_interval_s,
            poll_max_interval_s=upstream.poll_max_interval_s,
            **common,
        )
    if upstream.kind == "stability":
        from app.upstream.providers.stability import DEFAULT_BASE_URL as STABILITY_URL
        from app.upstream.providers.stability import StabilityProvider

        return StabilityProvider(base_url=upstream.base_url or STABILITY_URL, **common)
    raise ValueError(f"upstream '{upstream.name}': kind '{upstream.kind}' has no native adapter")
