"""The port every upstream adapter implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from app.domain.jobs import ImageJob, ImageResult, ProviderEvent
from app.upstream.call import DIRECT, UpstreamCall


class ImageProvider(Protocol):
    """An upstream that turns an ``ImageJob`` into images.

    Adapters raise only ``app.core.errors`` upstream errors (``UpstreamTimeout``,
    ``UpstreamUnavailable``, ``UpstreamRejected``, ``UpstreamError``), never transport exceptions.
    ``call`` is how the job is being run (``app/upstream/call.py``); the router always passes it,
    a direct call (a test) may leave it out.
    """

    name: str

    async def generate(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> ImageResult:
        """Run a generation and return the ImagesResponse-shaped result."""
        ...

    async def edit(self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT) -> ImageResult:
        """Run an edit (``job.images``, ``job.mask``) and return the ImagesResponse-shaped result."""
        ...

    def stream(
        self, job: ImageJob, *, upstream_model: str, call: UpstreamCall = DIRECT
    ) -> AsyncIterator[ProviderEvent]:
        """Yield partial and completed events as the upstream produces them.

        Errors before the first event are raised from the first ``__anext__``; closing the
        iterator early releases the upstream connection.
        """
        ...

    async def probe(self) -> bool:
        """Whether the upstream answers at all (any HTTP status counts), for ``/readyz``."""
        ...

    async def aclose(self) -> None:
        """Release pooled connections."""
        ...
