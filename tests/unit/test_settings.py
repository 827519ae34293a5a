"""Config loading: interpolation, env overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.runtime.settings import ConfigError, build_settings, interpolate, load_settings


def test_interpolation_with_defaults() -> None:
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate("a ${SET} b", env) == "a value b"
    assert interpolate("${MISSING}", env) == ""
    assert interpolate("${MISSING:-fallback}", env) == "fallback"
    assert interpolate("${EMPTY:-fallback}", env) == "fallback"
    assert interpolate("${SET:-fallback}", env) == "value"
    assert interpolate("$NOT_BRACED", env) == "$NOT_BRACED"


def test_yaml_file_with_env_interpolation_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        """
admin_key: ${TEST_ADMIN:-a-long-enough-admin-key-for-the-gateway}
database: {url: "sqlite+aiosqlite:///./x.db"}
upstreams:
  - name: openai
    kind: openai
    base_url: ${TEST_BASE:-https://api.openai.com/v1}
    api_key: ${TEST_OPENAI_KEY}
    models: [gpt-image-1, {name: gpt-image-1-mini, upstream_model: mini-2}]
  - {name: local, kind: local}
"""
    )
    monkeypatch.setenv("GATEWAY_DATABASE__URL", "postgresql+asyncpg://u@h/db")
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "9999")
    settings = load_settings(str(config))
    assert settings.database.url == "postgresql+asyncpg://u@h/db"
    assert settings.server.port == 9999
    assert settings.admin_key is not None
    assert settings.admin_key.get_secret_value() == "a-long-enough-admin-key-for-the-gateway"
    openai_up, local_up = settings.upstreams
    assert openai_up.api_key is None and not openai_up.active
    assert local_up.active
    assert openai_up.model_map(["x"]) == {"gpt-image-1": "gpt-image-1", "gpt-image-1-mini": "mini-2"}

    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-real-upstream-key-123")
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    settings = load_settings()
    assert settings.upstreams[0].active
    assert "sk-real-upstream-key-123" not in repr(settings)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"server": {"port": 70000}}, "server.port"),
        ({"upstreams": [{"name": "x", "kind": "nope"}]}, "upstreams.0.kind"),
        ({"upstreams": [{"name": "x", "kind": "openai"}]}, "base_url is required"),
        ({"upstreams": [{"name": "a", "kind": "local"}, {"name": "a", "kind": "local"}]}, "duplicate"),
        ({"admin_key": "changeme"}, "admin_key"),
        ({"database": {"urll": "x"}}, "database.urll"),
        (
            {"upstreams": [{"name": "o", "kind": "openai", "base_url": "http://x", "api_key": "changeme"}]},
            "placeholder",
        ),
    ],
)
def test_bad_config_names_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings(data)
    assert field in str(caught.value)


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "absent.yaml"))
