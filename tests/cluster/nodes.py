"""Starts the cluster suite's nodes as the Kubernetes manifests describe them, on this machine.

Every process of tests/cluster/ comes from here, so what the suite proves is proven of the pods the
overlay deploys (tests/cluster/test_launcher_source.py holds the test files to it). For each role
(the migrate Job, the API Deployment, the worker Deployment) a node gets, from the rendered overlay
(tests/cluster/manifests.py):

- the container's command and arguments, with this interpreter, a loopback address and, for the
  container port, a free local port;
- the container's environment: plain values as written, and each ``secretKeyRef`` or
  ``configMapKeyRef`` filled with the value the test gives for that key, as the operator's Secret
  would hold it. The variable names are the manifest's; a reference the test has no value for fails
  the start, as the pod would, unless the manifest marks it optional;
- the ConfigMap's gateway.yaml, deep-merged with the test's overrides (the addresses of the services
  and fakes, and the settings a test is about), written where GATEWAY_CONFIG points;
- the pod's filesystem under the node's own folder: GATEWAY_CONFIG, the config's ``data_dir``
  (given to the process as GATEWAY_DATA_DIR) and ``/tmp`` (TMPDIR) are the manifest's paths,
  rooted there, and each must be a volume the container mounts;
- the startup, liveness and readiness probe paths, which decide when an API node is ready.
"""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.gateway_process import ChildProcess, listening, reserve_port
from tests.cluster.manifests import EXAMPLE_OVERLAY, ROOT, ClusterShape, ProcessSpec, load_shape
from tests.conftest import ADMIN_KEY, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, FakeS3

# What uvicorn logs when the port is taken (errno 98, EADDRINUSE): the node restarts on another.


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it: mappings merge key by key, anything else (lists
    included) replaces, and ``None`` removes the key (a setting the test environment has no use for,
    such as the Ingress host as public_url)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _within(path: str, mounts: Mapping[str, str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts.values())


class Node(ChildProcess):
    """One process of the shape, started from its ProcessSpec. ``url`` is set for a node with a
    container port once ``wait_ready`` returned (a restart on a lost port changes it)."""

    def __init__(self, name: str, spec: ProcessSpec, root: Path, config: dict[str, Any], env: dict[str, str]):
        self.name, self.spec, self.root = name, spec, root
        self.root.mkdir(parents=True, exist_ok=True)
        pod_config = env["GATEWAY_CONFIG"]
        pod_data_dir = str(config["data_dir"])
        for what, path in (("GATEWAY_CONFIG", pod_config), ("data_dir", pod_data_dir)):
            assert _within(path, spec.mounts), f"{spec.name}: {what} {path} is on no volume it mounts"
        self.config_path = self.pod_path(pod_config)
        self.data_dir = self.pod_path(pod_data_dir)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        own = {"GATEWAY_CONFIG": str(self.config_path), "GATEWAY_DATA_DIR": str(self.data_dir)}
        if _within("/tmp", spec.mounts):
            tmp = self.pod_path("/tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            own["TMPDIR"] = str(tmp)
        self.env = {**env, **own}
        self.log_path = self.root / f"{name}.log"
        self.port: int | None = None
        self.url = ""
        self._start()

    def pod_path(self, path: str) -> Path:
        """Where a path of the pod's filesystem is on this machine: under the node's folder."""
        return self.root / path.lstrip("/")

    def _start(self) -> None:
        if self.spec.port is not None:
            self.port = reserve_port()
            self.url = f"http://127.0.0.1:{self.port}"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.spec.local_argv(port=self.port),
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _probe(self, path: str | None) -> bool:
        if path is None:
            return True
        try:
            return httpx.get(self.url + path, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 240.0, *, restarts: int = 3) -> Node:
        """Until the manifest's probes pass: the startup (else liveness) probe, on this child's own
        listener, then the readiness probe. A node without a port has no probe: it is ready once
        started. The deadline only bounds a failure (a loaded machine starts slowly)."""
        if self.spec.port is None:
            return self
        first = self.spec.startup_path or self.spec.liveness_path

        def probes_pass() -> bool:
            owned = any(port == self.port for _, port in listening(self.proc.pid))
            return owned and self._probe(first) and self._probe(self.spec.readiness_path)

        self._wait(probes_pass, what=self.name, timeout=timeout, restarts=restarts)
        return self

    def exec(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
        """``kubectl exec <pod> -- python -m app <args>``: the CLI in this node's environment."""
        entry = self.spec.local_argv()[:3]
        assert entry[1:] == ["-m", "app"], f"{self.spec.name} does not run the gateway: {entry}"
        return subprocess.run(
            [*entry, *args], cwd=ROOT, env=self.env, capture_output=True, timeout=timeout, check=False
        )


class Launcher:
    """The shape's processes for one test: ``secrets`` holds the value of each Secret (or ConfigMap)
    key the manifests reference, by key, as the operator's Secret would; ``config`` is laid over the
    ConfigMap's gateway.yaml for every process, and each node may add its own overrides."""

    def __init__(
        self,
        root: Path,
        *,
        secrets: Mapping[str, str],
        config: Mapping[str, Any] | None = None,
        directory: Path = EXAMPLE_OVERLAY,
    ) -> None:
        self.root = root
        self.shape: ClusterShape = load_shape(directory)
        self.secrets = dict(secrets)
        self.config = deep_merge(self.shape.gateway_config(), config or {})
        self.nodes: list[Node] = []

    def environment(self, spec: ProcessSpec) -> dict[str, str]:
        """The container's environment as the kubelet would set it, on this machine's own (less its
        GATEWAY_ variables, which would configure the node behind the manifest's back)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(spec.env)
        for name, (source, key) in {**spec.secret_env, **spec.config_env}.items():
            if key in self.secrets:
                env[name] = self.secrets[key]
            else:
                assert name in spec.optional_env, f"{spec.name}: no value for {source}/{key} ({name})"
        return env

    def _node(self, name: str, spec: ProcessSpec, overrides: Mapping[str, Any]) -> Node:
        node = Node(name, spec, self.root / name, deep_merge(self.config, overrides), self.environment(spec))
        self.nodes.append(node)
        return node

    def migrate(self) -> None:
        """The migrate Job, run to completion (as ``kubectl apply -k`` runs it before the rollout)."""
        node = self._node("migrate", self.shape.migrate, {})
        code = node.proc.wait(300)
        node.stop()
        assert code == 0, node.logs()[-3000:]

    def api(self, name: str, *, ready: bool = True, **overrides: Any) -> Node:
        """An API replica; ready (its probes pass) unless ``ready=False`` (then call wait_ready)."""
        node = self._node(name, self.shape.api, overrides)
        return node.wait_ready() if ready else node

    def worker(self, name: str, **overrides: Any) -> Node:
        """A worker replica (no port, no probe: it is running once started)."""
        return self._node(name, self.shape.worker, overrides)

    def stop_all(self) -> None:
        """SIGTERM to every node still running, the last started first."""
        for node in reversed(self.nodes):
            node.stop()


def service_secrets(
    *, database_url: str, redis_url: str, upstream: FakeOpenAI, key_pepper: str, signing_key: str
) -> dict[str, str]:
    """The Secret's keys for this machine's services (README: the keys the operator puts in it)."""
    return {
        "database-url": database_url,
        "redis-url": redis_url,
        "admin-key": ADMIN_KEY,
        "key-pepper": key_pepper,
        "signing-key": signing_key,
        "s3-access-key-id": ACCESS_KEY_ID,
        "s3-secret-access-key": SECRET_ACCESS_KEY,
        "openai-api-key": upstream.api_key,
    }


def service_config(*, s3: FakeS3, upstream: FakeOpenAI, redis_prefix: str) -> dict[str, Any]:
    """What every cluster test lays over the ConfigMap: this machine's addresses, and what the
    suite does not exercise turned off, each for the reason given."""
    return {
        "server": {
            # No Ingress: each node is reached at its own address, and links are made from it.
            "public_url": None,
            # No load balancer has to see /readyz turn 503 before a node drains.
            "drain_delay_s": 0,
        },
        "storage": {
            "endpoint_url": s3.endpoint_url,
            "region": REGION,
            "create_bucket": True,
            "addressing_style": "path",
        },
        # Each test under its own keys in the one Redis, so parallel tests never meet.
        "redis": {"prefix": redis_prefix},
        "rate_limits": {"prefix": redis_prefix + "rl:"},
        # The fake upstream counts every request in flight: moderation calls would blur the counts
        # the tests assert (tests/moderation/ covers it); pointed at the fake all the same.
        "moderation": {"enabled": False, "upstream": {"base_url": upstream.base_url}},
        "upstreams": [fake_upstream_config(upstream)],
        # Hundreds of tasks on a loaded 2-core box: access logs would only slow it down.
        "logging": {"level": "WARNING"},
    }
