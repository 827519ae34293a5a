"""docker-compose.yml: no Docker engine runs here, so the file is held to the Kubernetes manifests
(same commands, same variables, same config file) and its settings are loaded by the gateway's
own loader, as each container would load them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from app.runtime.settings import load_settings
from tests.cluster.manifests import BASE, ROOT, load_shape

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
# Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _example_names() -> list[str]:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    return [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]


def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        given = env.get(name)
        if operator and operator.endswith("?") and not given:
            raise AssertionError(f"compose would refuse to start: {argument}")
        if given:
            return given
        return argument if operator and operator.endswith("-") else ""

    return _REFERENCE.sub(sub, value)


def test_the_shape_is_the_manifests_shape() -> None:
    services = _compose()["services"]
    assert {"gateway", "worker", "migrate", "postgres", "redis", "minio"} <= set(services)
    assert services["gateway"]["deploy"]["replicas"] == 2
    shape = load_shape(BASE)
    assert services["gateway"]["command"] == shape.api.argv
    assert services["worker"]["command"] == shape.worker.argv
    assert services["migrate"]["command"] == shape.migrate.argv
    for name, spec in (("gateway", shape.api), ("worker", shape.worker), ("migrate", shape.migrate)):
        service = services[name]
        environment = service["environment"]
        # The same variables as the pods get, secrets included, under the same names.
        assert set(spec.secret_env) | set(spec.env) <= set(environment), name
        assert service["read_only"] is True
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if ":" in v}
        assert (ROOT / mounts[environment["GATEWAY_CONFIG"]]).resolve() == BASE / "gateway.yaml"
        assert spec.mounts["data"] in service["volumes"], "the spool is the container's own"
    # No volume is shared for request state: only the read-only config and each container's own.
    for name in ("gateway", "worker"):
        assert all(":" not in v or v.endswith(":ro") for v in services[name]["volumes"]), name


def test_every_secret_is_named_in_env_example_and_none_is_written() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    referenced = {m.group(1) for m in _REFERENCE.finditer(text)}
    names = _example_names()
    assert sorted(set(names)) == sorted(referenced)
    assert len(names) == len(set(names))
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            assert line.endswith("="), f"no value is shipped: {line}"
    secret = re.compile(r"KEY|SECRET|PASSWORD|PEPPER|TOKEN", re.I)
    for service in _compose()["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if secret.search(name):
                assert re.search(r"\$\{[A-Z_]+(:[-?][^}]*)?\}", str(value)), f"{name} is written inline"


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_each_container_loads_the_production_settings(
    service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = {name: f"{name.lower()}-{'x9' * 16}" for name in _example_names()}
    environment = _compose()["services"][service]["environment"]
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, _interpolate(str(value), dotenv))
    settings = load_settings(str(BASE / "gateway.yaml"))
    assert settings.database.url == (
        f"postgresql+asyncpg://gateway:{dotenv['POSTGRES_PASSWORD']}@postgres:5432/gateway"
    )
    assert settings.redis.url == "redis://redis:6379/0"
    # Images and task inputs in MinIO, which every container reaches by its service name.
    assert settings.storage.kind == "s3"
    assert settings.storage.endpoint_url == "http://minio:9000"
    assert settings.storage.access_key_id is not None
    assert settings.storage.access_key_id.get_secret_value() == dotenv["MINIO_ROOT_USER"]
    assert settings.tasks.workers == 0
    assert settings.admin_key is not None


def test_compose_refuses_to_start_without_a_required_secret() -> None:
    environment = _compose()["services"]["gateway"]["environment"]
    with pytest.raises(AssertionError, match="GATEWAY_ADMIN_KEY"):
        _interpolate(environment["GATEWAY_ADMIN_KEY"], {})
