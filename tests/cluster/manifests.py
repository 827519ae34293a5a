"""What the Kubernetes manifests say each process is, for tests that start the processes themselves.

The cluster suite starts its API and worker nodes from here rather than from commands of its own,
so the manifests are exercised and not only linted: the command and arguments, the plain (non-secret)
environment, the port, the probe paths and the config file (the ConfigMap's gateway.yaml) all come
from the rendered overlay (tests/cluster/kustomize.py renders it as ``kubectl apply -k`` would).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.kustomize import Obj, pod_spec, render

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
EXAMPLE_OVERLAY = KUBERNETES / "overlays" / "example"
API = "image-gateway-api"
WORKER = "image-gateway-worker"
MIGRATE = "image-gateway-migrate"
CONFIG_KEY = "gateway.yaml"


@dataclass(frozen=True)
class ProcessSpec:
    """One workload's container, as the cluster runs it."""

    name: str
    argv: list[str]
    # Plain values only; secrets are named in ``secret_env`` as (Secret, key), never valued.
    env: dict[str, str]
    secret_env: dict[str, tuple[str, str]]
    port: int | None = None
    # Entries valued from a ConfigMap key, as (ConfigMap, key); and every ``optional: true`` reference
    # (a Secret or ConfigMap key that may be missing: the variable is then unset).
    config_env: dict[str, tuple[str, str]] = field(default_factory=dict)
    optional_env: frozenset[str] = frozenset()
    liveness_path: str | None = None
    readiness_path: str | None = None
    startup_path: str | None = None
    mounts: dict[str, str] = field(default_factory=dict)  # volume name -> mount path

    def local_argv(
        self, *, python: str = sys.executable, host: str = "127.0.0.1", port: int | None = None
    ) -> list[str]:
        """The same command for a process on this machine: this interpreter, a loopback address and
        a free port instead of the pod's."""
        argv = [python if self.argv[0] == "python" else self.argv[0], *self.argv[1:]]
        for flag, value in (("--host", host), ("--port", None if port is None else str(port))):
            if value is not None and flag in argv:
                argv[argv.index(flag) + 1] = value
        return argv


@dataclass(frozen=True)
class ClusterShape:
    api: ProcessSpec
    worker: ProcessSpec
    migrate: ProcessSpec
    api_replicas: int
    worker_replicas: int
    gateway_yaml: str  # the ConfigMap's config file, as mounted at GATEWAY_CONFIG

    def gateway_config(self) -> dict[str, Any]:
        """The config file parsed (``${VAR}`` left as written: the loader fills them in)."""
        data = yaml.safe_load(self.gateway_yaml)
        assert isinstance(data, dict)
        return data


@cache
def _rendered(directory: str) -> tuple[Obj, ...]:
    return tuple(render(directory))


def rendered(directory: Path = EXAMPLE_OVERLAY) -> list[Obj]:
    """The rendered objects (a fresh copy each call: callers may change them)."""
    import copy

    return copy.deepcopy(list(_rendered(str(directory))))


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def _probe_path(container: Obj, probe: str) -> str | None:
    spec = container.get(probe)
    return spec["httpGet"]["path"] if spec and "httpGet" in spec else None


def process_spec(workload: Obj) -> ProcessSpec:
    spec = pod_spec(workload)
    assert spec is not None and len(spec["containers"]) == 1, "one container per pod"
    container = spec["containers"][0]
    env: dict[str, str] = {}
    secret_env: dict[str, tuple[str, str]] = {}
    config_env: dict[str, tuple[str, str]] = {}
    optional: set[str] = set()
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        source = entry["valueFrom"]
        # Only the two references a test can fill in; a fieldRef or resourceFieldRef fails here.
        (kind,) = source
        assert kind in ("secretKeyRef", "configMapKeyRef"), f"{entry['name']}: {kind} is not supported"
        ref = source[kind]
        (secret_env if kind == "secretKeyRef" else config_env)[entry["name"]] = (ref["name"], ref["key"])
        if ref.get("optional"):
            optional.add(entry["name"])
    ports = container.get("ports", [])
    return ProcessSpec(
        name=workload["metadata"]["name"],
        argv=[*container.get("command", []), *container.get("args", [])],
        env=env,
        secret_env=secret_env,
        config_env=config_env,
        optional_env=frozenset(optional),
        port=ports[0]["containerPort"] if ports else None,
        liveness_path=_probe_path(container, "livenessProbe"),
        readiness_path=_probe_path(container, "readinessProbe"),
        startup_path=_probe_path(container, "startupProbe"),
        mounts={m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])},
    )


def config_map_data(objects: list[Obj], workload: Obj) -> str:
    """The config file the workload mounts: its ConfigMap volume's gateway.yaml."""
    spec = pod_spec(workload)
    assert spec is not None
    names = [v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v]
    assert len(names) == 1, "one ConfigMap volume"
    return str(find(objects, "ConfigMap", names[0])["data"][CONFIG_KEY])


def load_shape(directory: Path = EXAMPLE_OVERLAY) -> ClusterShape:
    """The API, worker and migrate processes and the config file, from the rendered kustomization."""
    objects = rendered(directory)
    api = find(objects, "Deployment", API)
    worker = find(objects, "Deployment", WORKER)
    config = config_map_data(objects, api)
    assert config_map_data(objects, worker) == config, "API and workers read one config"
    return ClusterShape(
        api=process_spec(api),
        worker=process_spec(worker),
        migrate=process_spec(find(objects, "Job", MIGRATE)),
        api_replicas=int(api["spec"]["replicas"]),
        worker_replicas=int(worker["spec"]["replicas"]),
        gateway_yaml=config,
    )
