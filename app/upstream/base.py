"""The port every upstream adapter implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

from app.domain.jobs import ImageJob, ImageResult, ProviderEvent

# Set by the request path around an upstream call; see ``mark_answered``.
_ON_ANSWER: ContextVar[Callable[[], None] | None] = ContextVar("on_answer", default=None)


@contextmanager
def answered_scope(callback: Callable[[], None]) -> Iterator[None]:
    """Within the block, ``mark_answered`` calls ``callback`` (the request path stops letting a
    client's disconnect cut the call from then on: the upstream has done the work)."""
    token = _ON_ANSWER.set(callback)
    try:
        yield
    finally:
        _ON_ANSWER.reset(token)


def mark_answered() -> None:
    """An adapter calls this when the upstream has answered with success, before it reads the
    body: from here on the work is billed even if the client leaves while the body arrives."""
    callback = _ON_ANSWER.get()
    if callback is not None:
        callback()


class ImageProvider(Protocol):
    """An upstream that turns an ``ImageJob`` into images.

    Adapters raise only ``app.core.errors`` upstream errors (``UpstreamTimeout``,
    ``UpstreamUnavailable``, ``UpstreamRejected``, ``UpstreamError``), never transport exceptions.
    """

    name: str

    async def generate(self, job: ImageJob, *, upstream_model: str) -> ImageResult:
        """Run a generation and return the ImagesResponse-shaped result."""
        ...

    async def edit(self, job: ImageJob, *, upstream_model: str) -> ImageResult:
        """Run an edit (``job.images``, ``job.mask``) and return the ImagesResponse-shaped result."""
        ...

    def stream(self, job: ImageJob, *, upstream_model: str) -> AsyncIterator[ProviderEvent]:
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
