"""deploy/kubernetes: rendered offline, validated against the Kubernetes schemas, and held to what
the gateway itself expects (its routes, its settings, its drain timings).

``kubernetes_validate`` is imported at the top on purpose: without it this module fails to import
and the suite fails; it never skips. The schemas are those of one pinned Kubernetes version.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import openai
import pytest
import yaml

from app.__main__ import build_parser
from app.main import create_app
from app.runtime.settings import Settings, build_settings, load_settings
from tests.cluster.kustomize import KustomizeError, config_map_hash, pod_spec, render, strategic_merge
from tests.cluster.manifests import (
    API,
    BASE,
    EXAMPLE_OVERLAY,
    MIGRATE,
    ROOT,
    WORKER,
    config_map_data,
    find,
    load_shape,
    process_spec,
    rendered,
)
from tests.cluster.nodes import Launcher
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.s3_server import ACCESS_KEY_ID as S3_ACCESS_KEY_ID
from tests.fakes.s3_server import SECRET_ACCESS_KEY as S3_SECRET_ACCESS_KEY
from tests.fakes.s3_server import FakeS3
from tests.services import fresh_postgres_database, require_redis

# The oldest Kubernetes release still in upstream support when the manifests were written; they use
# nothing newer (autoscaling/v2, policy/v1, networking.k8s.io/v1 are all GA well before it).
KUBERNETES_VERSION = "1.32.0"
KUSTOMIZATIONS = [BASE, EXAMPLE_OVERLAY]
# server.drain_delay_s's default (SPEC §10: readiness turns 503 first, then the node drains): read
# from the settings once they have it, this value until then.
DRAIN_DELAY_DEFAULT_S = 5.0
# uvicorn's own slack past shutdown_grace_s (app/__main__.py: timeout_graceful_shutdown).
UVICORN_SLACK_S = 2
SECRET_WORDS = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|PEPPER|DATABASE__URL|REDIS__URL", re.I)
# Keys the manifests mark optional (secretKeyRef optional: true): providers one may not use.
OPTIONAL_SECRET_KEYS = {"gemini-api-key", "bfl-api-key", "stability-api-key"}
DUMMY_SECRETS = {
    "GATEWAY_DATABASE__URL": "postgresql+asyncpg://gateway:pw@db.internal:5432/gateway",
    "GATEWAY_REDIS__URL": "redis://redis.internal:6379/0",
    "GATEWAY_ADMIN_KEY": "admin-" + "a1" * 16,
    "GATEWAY_SECURITY__KEY_PEPPER": "pepper-" + "b2" * 20,
    "GATEWAY_STORAGE__SIGNING_KEY": "signing-" + "c3" * 20,
    "GATEWAY_STORAGE__ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE",
    "GATEWAY_STORAGE__SECRET_ACCESS_KEY": "s3-" + "d4" * 20,
    "OPENAI_API_KEY": "sk-test-" + "e5" * 16,
    "GEMINI_API_KEY": "gm-" + "f6" * 16,
    "BFL_API_KEY": "bfl-" + "a7" * 16,
    "STABILITY_API_KEY": "st-" + "b8" * 16,
}


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if pod_spec(o) is not None]


def _settings_for(
    config: str, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The settings a pod gets: its config file under its environment (secrets as dummies)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(config, encoding="utf-8")
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(str(path))


# -- schemas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_every_object_validates_against_the_kubernetes_schemas(directory: Path) -> None:
    objects = render(directory)
    kinds = sorted({o["kind"] for o in objects})
    assert {"ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Job"} <= set(kinds)
    assert {"PodDisruptionBudget", "Service"} <= set(kinds)
    for obj in objects:
        # strict: a field the schema does not know (a typo, a misplaced key) fails too.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    deployment = find(rendered(BASE), "Deployment", API)
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    ingress = find(rendered(BASE), "Ingress", "image-gateway")
    ingress["spec"]["rules"][0]["http"]["paths"][0]["timeout"] = 600
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ingress, KUBERNETES_VERSION, strict=True)


# -- the renderer ---------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_the_renderer_agrees_with_kubectl_kustomize(directory: Path) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
    theirs = [o for o in yaml.safe_load_all(out.stdout) if o]

    def key(obj: dict) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(render(directory), key=key) == sorted(theirs, key=key)


def test_config_map_hash_is_kustomizes() -> None:
    # `configMapGenerator: [{name: c, literals: [a=b]}]` renders as c-4h2mbtbbt6 with kustomize 5.5.
    assert config_map_hash({"a": "b"}) == "4h2mbtbbt6"
    assert config_map_hash({"a": "c"}) != config_map_hash({"a": "b"})


def test_strategic_merge_keys_lists_and_deletes() -> None:
    base = {"containers": [{"name": "g", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}]}
    patch = {"containers": [{"name": "g", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}]}
    merged = strategic_merge(base, patch)
    assert merged["containers"][0]["env"] == [
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
        {"name": "A", "value": "1"},
    ]
    assert strategic_merge({"a": 1, "b": 2}, {"a": None}) == {"b": 2}
    assert strategic_merge({"args": [1, 2]}, {"args": [3]}) == {"args": [3]}


def test_the_renderer_refuses_what_it_does_not_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: [{path: p.yaml}]\n")
    (tmp_path / "p.yaml").write_text("- {op: replace, path: /spec/replicas, value: 3}\n")
    with pytest.raises(KustomizeError, match="strategic merge"):
        render(tmp_path)


# -- promises the gateway relies on ----------------------------------------------------------------


def test_probes_are_routes_of_the_app_on_the_container_port(tmp_path: Path) -> None:
    app = create_app(build_settings({"data_dir": str(tmp_path)}))
    paths = app.openapi()["paths"]
    objects = rendered()
    api = find(objects, "Deployment", API)
    spec = process_spec(api)
    assert (spec.liveness_path, spec.readiness_path, spec.startup_path) == ("/healthz", "/readyz", "/healthz")
    for path in (spec.liveness_path, spec.readiness_path):
        assert "get" in paths[path]
    container = pod_spec(api)["containers"][0]
    assert spec.port == int(spec.argv[spec.argv.index("--port") + 1])
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    assert container["ports"] == [{"name": "http", "containerPort": spec.port}]
    service = find(objects, "Service", "image-gateway")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    worker_labels = find(objects, "Deployment", WORKER)["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= worker_labels.items(), "workers serve no HTTP"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_a_pod_outlives_its_drain(directory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = rendered(directory)
    api = find(objects, "Deployment", API)
    settings = _settings_for(
        config_map_data(objects, api), {**process_spec(api).env, **DUMMY_SECRETS}, tmp_path, monkeypatch
    )
    spec = pod_spec(api)
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = getattr(settings.server, "drain_delay_s", DRAIN_DELAY_DEFAULT_S)
    # The kubelet's grace period starts with preStop: the wait, the drain delay, the drain and
    # uvicorn's slack must all fit, or a drain that is on time gets SIGKILL.
    needed = float(pre_stop[1]) + drain + math.ceil(settings.server.shutdown_grace_s) + UVICORN_SLACK_S
    assert spec["terminationGracePeriodSeconds"] > needed
    worker = pod_spec(find(objects, "Deployment", WORKER))
    # A worker finishes the tasks in hand, which may retry upstream for up to retry.deadline_s.
    assert worker["terminationGracePeriodSeconds"] > settings.retry.deadline_s


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_no_secret_is_written_in_the_manifests(directory: Path) -> None:
    objects = rendered(directory)
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are the operator's, by reference"
    for workload in _workloads(objects):
        for container in pod_spec(workload)["containers"]:
            assert "envFrom" not in container
            for entry in container.get("env", []):
                if SECRET_WORDS.search(entry["name"]):
                    assert "value" not in entry, entry["name"]
                    assert set(entry["valueFrom"]) == {"secretKeyRef"}, entry["name"]
    for config_map in [o for o in objects if o["kind"] == "ConfigMap"]:
        text = config_map["data"]["gateway.yaml"]
        config = yaml.safe_load(text)
        secrets = [
            config.get("admin_key"),
            config.get("database", {}).get("url"),
            config.get("redis", {}).get("url"),
            *(
                config.get("storage", {}).get(k)
                for k in ("signing_key", "access_key_id", "secret_access_key")
            ),
            config.get("security", {}).get("key_pepper"),
            config.get("metrics", {}).get("token"),
            config.get("moderation", {}).get("upstream", {}).get("api_key"),
            *(u.get("api_key") for u in config["upstreams"]),
        ]
        assert all(s is None or re.fullmatch(r"\$\{[A-Z_]+\}", s) for s in secrets), secrets


def _settings_path(name: str) -> bool:
    """Whether ``GATEWAY_A__B_C`` names a setting (``a.b_c``) of the Settings tree."""
    model: type = Settings
    parts = name.removeprefix("GATEWAY_").lower().split("__")
    for part in parts:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        annotation = fields[part].annotation
        model = next(
            (a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")),
            annotation,
        )
    return True


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_every_variable_is_one_the_gateway_reads(directory: Path) -> None:
    objects = rendered(directory)
    for workload in _workloads(objects):
        config = config_map_data(objects, workload)
        for entry in pod_spec(workload)["containers"][0].get("env", []):
            name = entry["name"]
            if name == "GATEWAY_CONFIG":
                continue
            if name.startswith("GATEWAY_"):
                assert _settings_path(name), f"{name} is no setting"
            else:
                assert "${" + name + "}" in config, f"{name} is not read by the config file"
    assert _settings_path("GATEWAY_STORAGE__ACCESS_KEY_ID") and not _settings_path("GATEWAY_STORAGE__NOPE")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_the_config_map_loads_as_the_production_shape(
    directory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered(directory)
    for name, kind in ((API, "Deployment"), (WORKER, "Deployment"), (MIGRATE, "Job")):
        workload = find(objects, kind, name)
        spec = process_spec(workload)
        secrets = {k: v for k, v in DUMMY_SECRETS.items() if k in spec.secret_env}
        settings = _settings_for(
            config_map_data(objects, workload), {**spec.env, **secrets}, tmp_path, monkeypatch
        )
        # The file is where GATEWAY_CONFIG says, on the ConfigMap volume.
        assert Path(spec.env["GATEWAY_CONFIG"]).parent == Path(spec.mounts["config"])
        assert settings.database.url.startswith("postgresql+asyncpg://")
        if name == MIGRATE:
            continue
        assert settings.redis.url and settings.redis.url.startswith("redis://")
        assert settings.storage.kind == "s3" and settings.storage.bucket
        assert settings.storage.access_key_id is not None
        assert [u for u in settings.upstreams if u.kind == "local"] == []
        assert [u.name for u in settings.upstreams if u.active] == [
            "openai",
            "gemini",
            "imagen",
            "flux",
            "stability",
        ]
        assert settings.tasks.workers == 0, "API pods leave the queue to the worker Deployment"
        assert settings.admin_key is not None and settings.security.key_pepper is not None
        # Everything the process writes is on an emptyDir, since the root filesystem is read-only.
        assert settings.data_dir == spec.mounts["data"]
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        assert "emptyDir" in volumes["data"] and "emptyDir" in volumes[_tmp_volume(spec.mounts)]
        assert settings.metrics.enabled and settings.metrics.token is None
        assert settings.server.port == spec.port or name == WORKER


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_every_workload_starts_when_the_operator_turns_on_gateway_links(
    directory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``storage.gateway_links`` needs the signing key in every process that loads the config, the
    migrate Job included (it failed at start without it)."""
    objects = rendered(directory)
    for name, kind in ((API, "Deployment"), (WORKER, "Deployment"), (MIGRATE, "Job")):
        workload = find(objects, kind, name)
        spec = process_spec(workload)
        config = yaml.safe_load(config_map_data(objects, workload))
        config.setdefault("storage", {})["gateway_links"] = True
        secrets = {k: v for k, v in DUMMY_SECRETS.items() if k in spec.secret_env}
        settings = _settings_for(yaml.safe_dump(config), {**spec.env, **secrets}, tmp_path, monkeypatch)
        assert settings.storage.gateway_links, name


def _tmp_volume(mounts: dict[str, str]) -> str:
    return next(name for name, path in mounts.items() if path == "/tmp")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_commands_are_the_gateways_own(directory: Path) -> None:
    objects = rendered(directory)
    expected = {API: "serve", WORKER: "worker", MIGRATE: "migrate"}
    for workload in _workloads(objects):
        argv = process_spec(workload).argv
        assert argv[:3] == ["python", "-m", "app"]
        args = build_parser().parse_args(argv[3:])
        assert args.command == expected[workload["metadata"]["name"]]
        if args.command == "serve":
            assert args.host == "0.0.0.0"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_pods_are_locked_down_and_sized(directory: Path) -> None:
    for workload in _workloads(rendered(directory)):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_each_deployment_has_its_replicas_autoscaler_and_budget(directory: Path) -> None:
    objects = rendered(directory)
    for name in (API, WORKER):
        deployment = find(objects, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        hpa = find(objects, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["minReplicas"] >= 2, "one pod lost must not stop the service"
        pdb = find(objects, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1
        other = WORKER if name == API else API
        other_labels = find(objects, "Deployment", other)["spec"]["template"]["metadata"]["labels"]
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= other_labels.items()


def _megabytes(size: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", size.lower()).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1 / 2**20, "k": 1 / 1024, "m": 1, "g": 1024}[unit]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_the_ingress_streams_waits_and_admits_large_edits(directory: Path) -> None:
    objects = rendered(directory)
    ingress = find(objects, "Ingress", "image-gateway")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-request-buffering"] == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) >= 600
    assert int(notes[prefix + "proxy-send-timeout"]) >= 600
    # 16 images of 50 MB each: the largest edit the gateway admits.
    assert _megabytes(notes[prefix + "proxy-body-size"]) >= 16 * 50
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert "/v1" in paths and "/metrics" not in paths and "/" not in paths
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"] == {"name": "image-gateway", "port": {"name": "http"}}
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert hosts == {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}


def test_prometheus_scrapes_the_api_pods_metrics_port() -> None:
    api = find(rendered(), "Deployment", API)
    notes = api["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == process_spec(api).port


def test_the_overlay_sets_what_a_real_deployment_changes() -> None:
    base, overlay = rendered(BASE), rendered(EXAMPLE_OVERLAY)
    assert {o["metadata"].get("namespace") for o in overlay if o["kind"] != "Namespace"} == {"image-gateway"}
    for workload in _workloads(overlay):
        assert (
            pod_spec(workload)["containers"][0]["image"]
            == "registry.example.com/platform/image-gateway:0.1.0"
        )
    assert find(overlay, "Deployment", API)["spec"]["replicas"] == 3
    for name in (API, WORKER):
        # Every apply sets this count and the HPA scales from it; never outside the HPA's bounds.
        hpa = find(overlay, "HorizontalPodAutoscaler", name)
        assert find(overlay, "Deployment", name)["spec"]["replicas"] == hpa["spec"]["minReplicas"]
    assert find(overlay, "Ingress", "image-gateway")["spec"]["rules"][0]["host"] == "images.acme.example"
    secrets = {
        name for workload in _workloads(overlay) for name, _ in process_spec(workload).secret_env.values()
    }
    assert secrets == {"image-gateway-app", "image-gateway-db"}
    assert {n for w in _workloads(base) for n, _ in process_spec(w).secret_env.values()} == {"image-gateway"}
    # Its config is its own (a replaced ConfigMap, so a new hash and a rollout).
    assert config_map_data(overlay, find(overlay, "Deployment", API)) != config_map_data(
        base, find(base, "Deployment", API)
    )


# -- the helper the cluster suite starts its processes from ------------------------------------------


def test_load_shape_reads_processes_from_the_manifests() -> None:
    shape = load_shape()
    assert shape.api.argv == ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert shape.worker.argv == ["python", "-m", "app", "worker"]
    assert shape.migrate.argv == ["python", "-m", "app", "migrate"]
    assert shape.api.port == 8080 and shape.worker.port is None
    assert (shape.api.liveness_path, shape.api.readiness_path) == ("/healthz", "/readyz")
    assert shape.api.env == {"GATEWAY_CONFIG": "/etc/gateway/gateway.yaml"}
    assert shape.api.secret_env["GATEWAY_DATABASE__URL"] == ("image-gateway-db", "database-url")
    assert set(shape.api.secret_env) == set(shape.worker.secret_env)
    assert (shape.api_replicas, shape.worker_replicas) == (3, 2)
    assert shape.gateway_config()["storage"]["kind"] == "s3"
    local = shape.api.local_argv(python="/venv/python", port=18080)
    assert local == ["/venv/python", "-m", "app", "serve", "--host", "127.0.0.1", "--port", "18080"]
    assert shape.worker.local_argv(python="py") == ["py", "-m", "app", "worker"]


def test_readme_shows_the_overlay_as_it_is_and_the_apply_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Production shape") :]
    section = section[: section.index("\n## ")]
    assert "kubectl apply -k deploy/kubernetes/overlays/example" in section
    shown = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    real = yaml.safe_load((EXAMPLE_OVERLAY / "kustomization.yaml").read_text(encoding="utf-8"))
    for field in ("namespace", "resources", "images", "replicas", "configMapGenerator", "patches"):
        assert shown[field] == real[field], field
    # Its replica and HPA figures are the rendered ones.
    objects = rendered()
    hpa = find(objects, "HorizontalPodAutoscaler", API)["spec"]
    assert f"({hpa['minReplicas']}–{hpa['maxReplicas']} API" in section


# -- the manifests' processes, run ------------------------------------------------------------------


def _finished_task(client: openai.OpenAI, task_id: str) -> dict[str, Any]:
    """The task once it ended; the deadline only bounds a failure."""
    deadline = time.monotonic() + 90
    while True:
        task = client.get(f"/tasks/{task_id}", cast_to=object)
        assert isinstance(task, dict)
        if task["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return task
        time.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.redis
def test_the_manifests_processes_run_an_async_task_across_api_and_worker(tmp_path: Path) -> None:
    """migrate, serve and worker exactly as the overlay's pods run them (command, environment, config
    file), on PostgreSQL, Redis and an S3 server; only the external services' addresses and each
    process's data directory are this machine's."""
    shape = load_shape()
    redis_url = require_redis()
    with fresh_postgres_database() as database_url, FakeS3() as s3, FakeOpenAI() as upstream:
        upstreams = shape.gateway_config()["upstreams"]
        config = {
            "storage": {"endpoint_url": s3.endpoint_url, "create_bucket": True, "addressing_style": "path"},
            "moderation": {"upstream": {"base_url": upstream.base_url}},
            "upstreams": [
                {**u, "base_url": upstream.base_url} if u["name"] == "openai" else u for u in upstreams
            ],
            "redis": {"prefix": f"gw:test:{secrets.token_hex(6)}:"},
        }
        # The Secret the operator creates, by key; the launcher puts each value in the variable the
        # manifests name for it (a required key missing here fails the start).
        values = {
            "database-url": database_url,
            "redis-url": redis_url,
            "admin-key": "sk-admin-" + "k8" * 12,
            "key-pepper": "pepper-" + "p8" * 16,
            "signing-key": "signing-" + "s8" * 16,
            "s3-access-key-id": S3_ACCESS_KEY_ID,
            "s3-secret-access-key": S3_SECRET_ACCESS_KEY,
            "openai-api-key": upstream.api_key,
        }
        assert set(values) | OPTIONAL_SECRET_KEYS == {k for _, k in shape.api.secret_env.values()}
        nodes = Launcher(tmp_path, secrets=values, config=config)
        try:
            nodes.migrate()
            api = nodes.api("api")  # its startup and readiness probes pass
            worker = nodes.worker("worker")
            url = api.url
            assert httpx.get(url + shape.api.readiness_path, timeout=5).status_code == 200
            admin = {"Authorization": f"Bearer {values['admin-key']}"}
            key = httpx.post(url + "/admin/keys", headers=admin, json={"name": "k8s"}, timeout=30).json()
            with openai.OpenAI(base_url=url + "/v1", api_key=key["key"], max_retries=0) as client:
                submitted = client.images.with_raw_response.generate(
                    model="gpt-image-1.5",
                    prompt="a lighthouse",
                    response_format="url",
                    extra_query={"async": "true"},
                )
                assert submitted.status_code == 202
                # The API pods take no tasks (tasks.workers: 0): only the worker process can run it.
                task = _finished_task(client, submitted.http_response.json()["id"])
            assert task["status"] == "succeeded", task
            assert upstream.count("/v1/images/generations") == 1
            link = task["result"]["data"][0]["url"]
            assert link.startswith(s3.endpoint_url), "images live in the object store"
            assert httpx.get(link, timeout=10).content.startswith(b"\x89PNG")
            codes = [node.stop() for node in (api, worker)]
        finally:
            nodes.stop_all()
        assert codes == [0, 0], "both drain and exit 0 on SIGTERM"
