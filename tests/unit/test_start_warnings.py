"""What a node says at start about sharing a database with other nodes (SPEC §10): secrets that it
would otherwise generate into its own data_dir are named, so a second node's 401s are explained
before they happen."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app.runtime.lifespan import _log_capacity
from tests.conftest import make_settings

PG = {"url": "postgresql+asyncpg://postgres@127.0.0.1:5432/test"}
SECRET = "s" * 40


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_shared_database_without_shared_secrets_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.runtime.lifespan")
    _log_capacity(make_settings(tmp_path, [{"name": "local", "kind": "local"}], database=PG))
    (said,) = warnings(caplog)
    assert "security.key_pepper and storage.signing_key not set" in said


def test_shared_secrets_or_an_embedded_database_say_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.runtime.lifespan")
    upstreams = [{"name": "local", "kind": "local"}]
    _log_capacity(
        make_settings(
            tmp_path,
            upstreams,
            database=PG,
            security={"key_pepper": SECRET},
            storage={"signing_key": SECRET},
        )
    )
    _log_capacity(make_settings(tmp_path, upstreams))  # SQLite: one node by construction
    assert warnings(caplog) == []
