"""The version has one place (app/__init__.py); the changelog, the package metadata and the lint hooks
agree with it and with `make lint`."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import yaml

import app
from tests.conftest import ROOT


def test_the_version_has_one_place() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert version("image-gateway") == app.__version__


def test_the_changelogs_newest_release_is_the_version() -> None:
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert releases and releases[0] == app.__version__


def test_pre_commit_runs_what_make_lint_runs() -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    entries = {hook["entry"].replace(".venv/bin/", "") for hook in hooks}
    commands = {line.strip().replace("$(BIN)/", "") for line in lint.splitlines()[1:] if line.strip()}
    assert entries == commands


def test_healthz_and_the_console_footer_name_the_version(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, [{"name": "local", "kind": "local"}])
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok", "version": app.__version__}
        assert f"Image gateway {app.__version__}" in client.get("/console/login").text
