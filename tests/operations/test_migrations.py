"""One schema, managed by Alembic, on SQLite and PostgreSQL: upgrades reach head with no drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from alembic import command
from alembic.script import ScriptDirectory

from app.db.migrate import alembic_config
from tests.conftest import MODELS_FILE, ROOT, query
from tests.services import fresh_postgres_database


def head() -> str:
    head_revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head_revision is not None
    return head_revision


def migrate_cli(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": url}, "models_file": MODELS_FILE}))
    return subprocess.run(
        [sys.executable, "-m", "app", "--config", str(config), "migrate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_an_empty_postgres_database(tmp_path: Path) -> None:
    with fresh_postgres_database() as url:
        result = migrate_cli(tmp_path, url)
        assert result.returncode == 0, result.stderr
        assert query(url, "SELECT version_num FROM alembic_version") == [{"version_num": head()}]
        command.check(alembic_config(url))  # raises if the models and migrations disagree


def test_migrate_an_existing_sqlite_file_from_the_first_revision(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0001")
    query(
        url,
        "INSERT INTO api_keys (id, name, key_hash, prefix, moderation, enabled, created_at) "
        "VALUES ('key_old', 'old', 'h', 'sk-gw-x', 'default', 1, '2026-01-01 00:00:00')",
    )
    result = migrate_cli(tmp_path, url)
    assert result.returncode == 0, result.stderr
    assert query(url, "SELECT version_num FROM alembic_version") == [{"version_num": head()}]
    (row,) = query(url, "SELECT spent_micros, reserved_micros, price_multiplier_ppm FROM api_keys")
    assert row == {"spent_micros": 0, "reserved_micros": 0, "price_multiplier_ppm": 1_000_000}
    command.check(alembic_config(url))
