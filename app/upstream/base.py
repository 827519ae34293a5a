"""The port every upstream adapter implements."""

from __future__ import annotations

from typing import Protocol

from app.images.jobs import ImageJob, ImageResult


class ImageProvider(Protocol):
    """An upstream that turns an ``ImageJob`` into images.

    Adapters raise only ``app.errors`` upstream errors (``UpstreamTimeout``,
    ``UpstreamUnavailable``, ``UpstreamRejected``, ``UpstreamError``), never transport exceptions.
    """

    name: str

    async def generate(self, job: ImageJob, *, upstream_model: str) -> ImageResult:
        """Run a generation and return the ImagesResponse-shaped result."""
        ...

    async def probe(self) -> bool:
        """Whether the upstream answers at all (any HTTP status counts), for ``/readyz``."""
        ...

    async def aclose(self) -> None:
        """Release pooled connections."""
        ...
