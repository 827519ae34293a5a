"""tests/cluster/nodes.py follows the manifests: change a value in a copy of deploy/kubernetes and the
launcher's node changes with it (variable names, Secret keys, config path, port, probe paths).

The node here runs a stand-in for the gateway (the copy's command is changed to it): a small HTTP
server that records the environment it was given and every path it was asked, and answers 200 only
on the probe paths the copy declares. So the launcher can only call it ready if it probed those.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.cluster.manifests import KUBERNETES
from tests.cluster.nodes import Launcher, deep_merge

STAND_IN = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

host, port = sys.argv[sys.argv.index("--host") + 1], int(sys.argv[sys.argv.index("--port") + 1])
record = os.environ["STAND_IN_RECORD"]
with open(record + ".env", "w") as out:
    json.dump({"argv": sys.argv, "env": dict(os.environ)}, out)

class Probe(BaseHTTPRequestHandler):
    def do_GET(self):
        with open(record + ".paths", "a") as out:
            out.write(self.path + "\\n")
        self.send_response(200 if self.path in ("/alive-now", "/ready-now") else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

HTTPServer((host, port), Probe).serve_forever()
"""


def changed_copy(tmp_path: Path) -> Path:
    """deploy/kubernetes copied, with the values the launcher must follow changed."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN, encoding="utf-8")
    api = copy / "base" / "api.yaml"
    text = api.read_text(encoding="utf-8")
    for old, new in (
        (
            'command: [python, -m, app, serve, --host, 0.0.0.0, --port, "8080"]',
            f'command: [python, {script}, --host, 0.0.0.0, --port, "9090"]',
        ),
        ("containerPort: 8080", "containerPort: 9090"),
        ("path: /healthz", "path: /alive-now"),
        ("path: /readyz", "path: /ready-now"),
        ("value: /etc/gateway/gateway.yaml", "value: /etc/gw/conf.yaml"),
        ("mountPath: /etc/gateway", "mountPath: /etc/gw"),
        ("mountPath: /srv/data", "mountPath: /var/gw"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    api.write_text(text, encoding="utf-8")
    # The variable renamed in the base and the overlay (env entries merge by name), its key too.
    for workload in ("api.yaml", "worker.yaml"):
        path = copy / "base" / workload
        text = path.read_text(encoding="utf-8")
        assert "- name: GATEWAY_ADMIN_KEY\n" in text
        path.write_text(text.replace("- name: GATEWAY_ADMIN_KEY\n", "- name: GATEWAY_ADMIN_KEY_RENAMED\n"))
    secrets = copy / "overlays" / "example" / "secrets.yaml"
    text = secrets.read_text(encoding="utf-8")
    assert "key: admin-key}" in text
    secrets.write_text(
        text.replace("- name: GATEWAY_ADMIN_KEY\n", "- name: GATEWAY_ADMIN_KEY_RENAMED\n").replace(
            "key: admin-key}", "key: admin-token}"
        ),
        encoding="utf-8",
    )
    config = copy / "overlays" / "example" / "gateway.yaml"
    text = config.read_text(encoding="utf-8")
    assert "data_dir: /srv/data" in text
    config.write_text(text.replace("data_dir: /srv/data", "data_dir: /var/gw/state"), encoding="utf-8")
    return copy / "overlays" / "example"


SECRETS = {
    "database-url": "postgresql+asyncpg://db.invalid/gateway",
    "redis-url": "redis://redis.invalid:6379/0",
    "admin-token": "sk-admin-from-the-secret",
    "key-pepper": "pepper-" + "p" * 32,
    "signing-key": "signing-" + "s" * 32,
    "s3-access-key-id": "AKIA",
    "s3-secret-access-key": "secret",
    "openai-api-key": "sk-upstream",
}


def test_the_launcher_follows_a_changed_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = changed_copy(tmp_path)
    record = tmp_path / "record"
    monkeypatch.setenv("STAND_IN_RECORD", str(record))
    launcher = Launcher(
        tmp_path / "nodes",
        secrets=SECRETS,
        directory=overlay,
        config={"tasks": {"poll_s": 0.5}, "server": {"public_url": None}},
    )
    try:
        node = launcher.api("a")  # returns once the stand-in answered the copy's probe paths
    finally:
        launcher.stop_all()

    probed = set(record.with_suffix(".paths").read_text().split())
    assert probed == {"/alive-now", "/ready-now"}
    started = json.loads(record.with_suffix(".env").read_text())
    env, argv = started["env"], started["argv"]
    # The command and its port: the copy's, on a local port instead of 9090.
    assert argv[0].endswith("stand_in.py") and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert node.port is not None and argv[argv.index("--port") + 1] == str(node.port) != "9090"
    # The Secret reference under its new variable name and key; the old name is not set.
    assert env["GATEWAY_ADMIN_KEY_RENAMED"] == "sk-admin-from-the-secret"
    assert "GATEWAY_ADMIN_KEY" not in env
    assert env["GATEWAY_DATABASE__URL"] == SECRETS["database-url"]
    assert "GEMINI_API_KEY" not in env  # optional, and the test gave no value
    # The config at the copy's GATEWAY_CONFIG and data dir at its data_dir, under the node's folder.
    assert env["GATEWAY_CONFIG"] == str(tmp_path / "nodes" / "a" / "etc" / "gw" / "conf.yaml")
    assert env["GATEWAY_DATA_DIR"] == str(tmp_path / "nodes" / "a" / "var" / "gw" / "state")
    assert env["TMPDIR"] == str(tmp_path / "nodes" / "a" / "tmp")
    written = yaml.safe_load(Path(env["GATEWAY_CONFIG"]).read_text())
    assert written["tasks"] == {"workers": 0, "poll_s": 0.5}  # the ConfigMap's, merged with the test's
    assert "public_url" not in written["server"] and written["server"]["port"] == 8080
    assert written["storage"]["bucket"] == "acme-image-gateway"


def test_a_secret_the_test_does_not_fill_stops_the_start(tmp_path: Path) -> None:
    """As a pod whose required Secret key is missing never starts."""
    launcher = Launcher(
        tmp_path / "nodes",
        secrets={k: v for k, v in SECRETS.items() if k != "admin-token"},
        directory=changed_copy(tmp_path),
    )
    with pytest.raises(AssertionError, match="admin-token"):
        launcher.api("a")
    assert launcher.nodes == []


def test_a_config_path_on_no_volume_stops_the_start(tmp_path: Path) -> None:
    """The config's data_dir must be a volume the container mounts (the root filesystem is read-only)."""
    launcher = Launcher(
        tmp_path / "nodes",
        secrets=SECRETS,
        directory=changed_copy(tmp_path),
        config={"data_dir": "/opt/data"},
    )
    with pytest.raises(AssertionError, match="/opt/data is on no volume"):
        launcher.worker("w")


def test_deep_merge_merges_mappings_replaces_the_rest_and_deletes_on_none() -> None:
    base = {"server": {"host": "0.0.0.0", "public_url": "https://x"}, "upstreams": [{"name": "a"}]}
    merged = deep_merge(base, {"server": {"public_url": None, "port": 1}, "upstreams": [{"name": "b"}]})
    assert merged == {"server": {"host": "0.0.0.0", "port": 1}, "upstreams": [{"name": "b"}]}
    assert base["server"] == {"host": "0.0.0.0", "public_url": "https://x"}  # not changed in place
