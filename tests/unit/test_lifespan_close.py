"""``open_state`` closes every resource at shutdown, even when one of the closes fails (issue 17)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.console.thumbnails import Thumbnailer
from app.moderation import ModerationService
from app.runtime.lifespan import open_state
from app.upstream.registry import ProviderRegistry
from tests.conftest import LOCAL_UPSTREAM, make_settings


async def test_a_failing_close_is_logged_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    closed: list[str] = []

    async def failing_moderation_close(self: ModerationService) -> None:
        closed.append("moderation")
        raise RuntimeError("moderation pool would not close")

    def recording(name: str, original: object) -> object:
        async def close(self: object) -> None:
            closed.append(name)
            await original(self)  # type: ignore[operator]

        return close

    monkeypatch.setattr(ModerationService, "aclose", failing_moderation_close)
    # Opened before moderation (closed after it) and after it (closed before it).
    monkeypatch.setattr(ProviderRegistry, "aclose", recording("registry", ProviderRegistry.aclose))
    monkeypatch.setattr(Thumbnailer, "drain", recording("thumbnails", Thumbnailer.drain))
    monkeypatch.setattr(AsyncEngine, "dispose", recording("engine", AsyncEngine.dispose))

    settings = make_settings(tmp_path, [LOCAL_UPSTREAM])
    with caplog.at_level(logging.ERROR, logger="app.runtime.lifespan"):
        async with open_state(settings):
            pass
    # In reverse order of opening, and the engine (opened first) is still disposed last.
    assert closed == ["thumbnails", "moderation", "registry", "engine"]
    failures = [r for r in caplog.records if r.getMessage() == "closing a resource failed"]
    assert len(failures) == 1
    assert failures[0].fields == {"resource": "moderation"}  # type: ignore[attr-defined]
    assert failures[0].exc_info is not None and "would not close" in str(failures[0].exc_info[1])
