"""Config paths resolve against the config file and data_dir, never the working directory (issue 17).

A gateway started as ``python -m app serve --config /etc/gateway/gateway.yaml`` from ``/``, or
installed from its wheel and started with no config file in an empty directory, must find its
catalog and moderation policy and keep its state where the settings say.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import openai
import pytest

from app.runtime.settings import DEFAULT_MODELS_FILE, build_settings, load_settings
from bench.gateway_process import ROOT, GatewayProcess

DEFAULTS = ROOT / "app" / "defaults"


def test_relative_paths_in_a_file_are_read_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "gw.yaml").write_text(
        "data_dir: state\n"
        "models_file: catalog/models.yaml\n"
        "moderation: {policy_file: lists.yaml}\n"
        "storage: {path: pictures}\n"
        'database: {url: "sqlite+aiosqlite:///db/gw.db"}\n'
        "tasks: {inputs_dir: inputs}\n"
    )
    monkeypatch.chdir("/")
    settings = load_settings(str(etc / "gw.yaml"))
    assert settings.data_dir == str(etc / "state")
    assert settings.models_file == str(etc / "catalog" / "models.yaml")
    assert settings.moderation.policy_file == str(etc / "lists.yaml")
    # Data paths live under data_dir.
    assert settings.storage.path == str(etc / "state" / "pictures")
    assert settings.database.url == f"sqlite+aiosqlite:///{etc / 'state' / 'db' / 'gw.db'}"
    assert settings.tasks.inputs_dir == str(etc / "state" / "inputs")


def test_defaults_need_no_file_and_no_working_directory(tmp_path: Path) -> None:
    settings = build_settings({"data_dir": str(tmp_path)})
    assert settings.models_file == DEFAULT_MODELS_FILE
    assert Path(settings.models_file).is_file() and Path(settings.moderation.policy_file).is_file()
    assert settings.database.url == f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    assert settings.storage.path == str(tmp_path / "images")
    # Absolute paths and other databases are left as they are.
    other = build_settings({"data_dir": str(tmp_path), "database": {"url": "postgresql+asyncpg://u@h/db"}})
    assert other.database.url == "postgresql+asyncpg://u@h/db"
    memory = build_settings({"database": {"url": "sqlite+aiosqlite:///:memory:"}})
    assert memory.database.url == "sqlite+aiosqlite:///:memory:"


def _generate(url: str, admin_key: str) -> None:
    import httpx

    created = httpx.post(
        url + "/admin/keys", json={"name": "paths"}, headers={"Authorization": f"Bearer {admin_key}"}
    )
    assert created.status_code == 201, created.text
    with openai.OpenAI(base_url=url + "/v1", api_key=created.json()["key"], max_retries=0) as client:
        image = client.images.generate(model="gpt-image-1.5", prompt="a lighthouse", size="1024x1024")
    assert image.data and image.data[0].b64_json


def test_serve_with_a_config_elsewhere_started_from_root(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "gateway"
    etc.mkdir(parents=True)
    shutil.copy(DEFAULTS / "moderation.yaml", etc / "policy.yaml")
    config = {
        "data_dir": "state",
        "moderation": {"policy_file": "policy.yaml", "checkers": ["blocklist", "classifier"]},
        "upstreams": [{"name": "local", "kind": "local"}],
    }
    gateway = GatewayProcess(
        config, etc, cwd=Path("/"), env={"GATEWAY_ADMIN_KEY": "sk-admin-paths-0123456789abcdef0123456789"}
    )
    try:
        gateway.wait_ready()
        _generate(gateway.url, "sk-admin-paths-0123456789abcdef0123456789")
    finally:
        assert gateway.stop() == 0, gateway.logs()
    assert (etc / "state" / "gateway.db").is_file()
    assert not Path("/state").exists() and not Path("/data").exists()


def test_an_installed_wheel_serves_with_no_config_from_an_empty_directory(tmp_path: Path) -> None:
    # Built from a copy of the sources, so the checkout gets no build/ directory.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "app", source / "app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("image_gateway-*.whl")
    assert {"app/defaults/models.yaml", "app/defaults/moderation.yaml"} <= set(
        zipfile.ZipFile(wheel).namelist()
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {
        "PYTHONPATH": str(target),
        "GATEWAY_CONFIG": "",
        "GATEWAY_ADMIN_KEY": "sk-admin-wheel-0123456789abcdef0123456789",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import app; print(app.__file__)"],
        cwd=empty,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(target)), "the test must run the installed copy"
    gateway = GatewayProcess(None, tmp_path, cwd=empty, env=env)
    try:
        gateway.wait_ready()
        _generate(gateway.url, "sk-admin-wheel-0123456789abcdef0123456789")
    finally:
        assert gateway.stop() == 0, gateway.logs()
    assert (empty / "data" / "gateway.db").is_file()
