"""Moderation by an upstream model: ``POST {base_url}/moderations`` (OpenAI's omni-moderation-latest
reads text and images).

Text goes as ``{"model": ..., "input": [prompt]}``; each edit input image as its own request with one
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` item (one image per
request is what the omni model is documented to take; the requests run concurrently). A category
blocks when its score reaches the level's threshold (``thresholds`` in settings); the upstream's
own ``flagged`` is not used, so the operator's thresholds decide.

A failed call (timeout, transport error, error status, unreadable body) follows the configured
policy: ``fail_open`` lets the request through with ``Verdict.degraded`` set and a warning logged;
otherwise ``ModerationUnavailableError`` (503). Neither the log nor the error carries the
upstream's URL or key: the call goes through ``app.upstream.client.JSONClient`` (the gateway's one
outbound HTTP stack, whose errors are scrubbed of both) and only the error class is logged.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from app.core.errors import ModerationUnavailableError, UpstreamError
from app.moderation.base import CheckerName, Level, TextInput, Verdict
from app.moderation.config import UpstreamModerationSettings
from app.upstream.client import JSONClient, Session
from app.upstream.errors import INVALID_RESPONSE, upstream_secrets

logger = logging.getLogger(__name__)

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def image_mime(data: bytes) -> str:
    """The MIME type for the data URL, from the file's signature (PNG when unknown: the edit
    endpoint's own validation has already accepted the file)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def image_item(data: bytes) -> dict[str, Any]:
    encoded = base64.b64encode(data).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{image_mime(data)};base64,{encoded}"}}


def max_scores(payload: Any) -> dict[str, float]:
    """Category → highest score over every ``results[]`` entry; raises ``UpstreamError`` when the
    body is not a moderation response."""
    try:
        results = payload["results"]
        scores: dict[str, float] = {}
        for result in results:
            flagged = result.get("categories") or {}
            table: Mapping[str, Any] = result.get("category_scores") or {}
            for category in {*table, *flagged}:
                value = table.get(category)
                # A category marked true without a score is treated as certain.
                score = float(value) if value is not None else (1.0 if flagged.get(category) else 0.0)
                scores[category] = max(score, scores.get(category, 0.0))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(INVALID_RESPONSE) from exc
    return scores


class UpstreamModerator:
    """A text and image checker over one moderation endpoint, owning its connection pool."""

    name: CheckerName = "upstream"

    def __init__(self, settings: UpstreamModerationSettings, *, client: Session | None = None) -> None:
        if settings.api_key is None:
            raise ValueError("upstream moderation needs an api_key")
        key = settings.api_key.get_secret_value()
        self._url = settings.base_url.rstrip("/") + "/moderations"
        self._headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        self._model = settings.model
        self._thresholds = settings.thresholds
        self.fail_open = settings.fail_open
        self.moderate_images = settings.moderate_images
        # Tests may inject a session; only a session made by the client is closed by it.
        self._client = JSONClient(
            timeout_s=settings.timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            secrets=upstream_secrets(settings.base_url, key),
            session=client,
        )

    def __repr__(self) -> str:  # never the URL or key, even in a debugger or a log of the service
        return f"UpstreamModerator(model={self._model!r}, fail_open={self.fail_open})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def check_text(self, request: TextInput) -> Verdict:
        return await self._checked([request.prompt], request.level)

    async def check_images(self, images: Sequence[bytes], *, level: Level) -> Verdict:
        if not images or not self.moderate_images:
            return Verdict.allow(level, checker=self.name)
        verdicts = await asyncio.gather(*(self._checked([image_item(data)], level) for data in images))
        blocked = [verdict for verdict in verdicts if verdict.blocked]
        if not blocked:
            return Verdict.allow(level, checker=self.name, degraded=any(v.degraded for v in verdicts))
        categories = tuple(dict.fromkeys(c for verdict in blocked for c in verdict.categories))
        scores: dict[str, float] = {}
        for verdict in blocked:
            for category, score in verdict.scores.items():
                scores[category] = max(score, scores.get(category, 0.0))
        return self._blocked(categories, scores, level)

    def decide(self, scores: Mapping[str, float], level: Level) -> Verdict:
        """Block the categories whose score reaches this level's threshold."""
        table = self._thresholds.get(level, {})
        hits: dict[str, float] = {}
        for category, score in scores.items():
            threshold = table.get(category, table.get("*"))
            if threshold is not None and score >= threshold:
                hits[category] = score
        if not hits:
            return Verdict.allow(level, checker=self.name)
        return self._blocked(tuple(sorted(hits, key=lambda c: -hits[c])), hits, level)

    def _blocked(self, categories: tuple[str, ...], scores: Mapping[str, float], level: Level) -> Verdict:
        return Verdict(
            blocked=True,
            level=level,
            categories=categories,
            checker=self.name,
            rules=tuple(f"upstream:{category}" for category in categories),
            scores=dict(scores),
        )

    async def _checked(self, inputs: list[Any], level: Level) -> Verdict:
        try:
            scores = await self._scores(inputs)
        except UpstreamError as exc:
            if self.fail_open:
                logger.warning("moderation upstream failed (%s); failing open", type(exc).__name__)
                return Verdict.allow(level, checker=self.name, degraded=True)
            logger.warning("moderation upstream failed (%s); failing closed", type(exc).__name__)
            raise ModerationUnavailableError() from exc
        return self.decide(scores, level)

    async def _scores(self, inputs: list[Any]) -> dict[str, float]:
        body = orjson.dumps({"model": self._model, "input": inputs})
        return max_scores(await self._client.post(self._url, body, self._headers))
