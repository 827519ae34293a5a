"""`python -m app` as an operator runs it: key commands, migrate, and serve with a config file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from bench.gateway_process import reserve_port
from tests.conftest import MODELS_FILE, ROOT


def write_config(tmp_path: Path, **extra: Any) -> Path:
    config = {
        "data_dir": str(tmp_path / "data"),
        "models_file": MODELS_FILE,
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'gw.db'}"},
        "upstreams": [{"name": "local", "kind": "local", "models": ["*"]}],
        **extra,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,  # bounds a hang only: a loaded box starts the CLI slowly
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_keys_cli_lifecycle(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    created = run_cli(config, "keys", "create", "--name", "cli-key", "--models", "gpt-image-1,dall-e-2")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith("sk-gw-") and key["models"] == ["gpt-image-1", "dall-e-2"]

    listed = json.loads(run_cli(config, "keys", "list").stdout)
    assert [k["id"] for k in listed["data"]] == [key["id"]]
    assert key["key"] not in run_cli(config, "keys", "list").stdout

    shown = json.loads(run_cli(config, "keys", "show", key["id"]).stdout)
    assert shown["status"] == "active" and "key" not in shown

    revoked = json.loads(run_cli(config, "keys", "revoke", key["id"]).stdout)
    assert revoked["status"] == "revoked"

    missing = run_cli(config, "keys", "show", "key_missing")
    assert missing.returncode == 2 and "No API key" in missing.stderr
    bad_model = run_cli(config, "keys", "create", "--name", "x", "--models", "gpt-image-9")
    assert bad_model.returncode == 1 and "gpt-image-9" in bad_model.stderr

    db = (tmp_path / "data" / "gw.db").read_bytes()
    assert key["key"].encode() not in db


def test_bad_config_fails_naming_the_field(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"port": "eighty"})
    result = run_cli(config, "migrate")
    assert result.returncode == 2
    assert "server.port" in result.stderr
    unknown_kind = write_config(tmp_path, upstreams=[{"name": "x", "kind": "carrier-pigeon"}])
    result = run_cli(unknown_kind, "migrate")
    assert result.returncode == 2 and "upstreams.0.kind" in result.stderr


def test_migrate_reaches_head(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli(config, "migrate")
    assert result.returncode == 0, result.stderr
    again = run_cli(config, "migrate")
    assert again.returncode == 0


@pytest.mark.parametrize("use_env_config", [False, True])
def test_serve_generates_admin_key_and_answers_the_sdk(tmp_path: Path, use_env_config: bool) -> None:
    config = write_config(tmp_path)
    port = reserve_port()
    env = {**os.environ, "GATEWAY_ADMIN_KEY": ""}
    args = [sys.executable, "-m", "app"]
    if use_env_config:
        env["GATEWAY_CONFIG"] = str(config)
        args += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    else:
        args += ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # bounds a failure only (xdist, coverage)
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)

        admin_file = tmp_path / "data" / "admin_key"
        assert admin_file.stat().st_mode & 0o777 == 0o600
        admin_key = admin_file.read_text().strip()
        created = httpx.post(
            base + "/admin/keys", json={"name": "served"}, headers={"Authorization": f"Bearer {admin_key}"}
        )
        assert created.status_code == 201
        with openai.OpenAI(base_url=base + "/v1", api_key=created.json()["key"], max_retries=0) as client:
            result = client.images.generate(model="gpt-image-1-mini", prompt="a kite", quality="low")
        assert result.data and result.data[0].b64_json
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert "curl" in stdout and "from openai import OpenAI" in stdout
    assert admin_key not in stdout and admin_key not in stderr
    assert created.json()["key"] not in stderr
