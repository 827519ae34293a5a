"""Each upstream kind registers its own settings model (issue 28): the config file stays flat, the
fields that are not common are validated by the kind's model at load, and a refused field is named
with the kinds that take it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from app.runtime.settings import ConfigError, load_settings
from app.upstream.config import KindSettings, UpstreamSettings, provider_kinds
from app.upstream.providers.azure import AzureSettings
from app.upstream.providers.local import LocalSettings
from app.upstream.providers.polling import PollingSettings

KEY = "real-key-0123456789abcdef"


def upstream(kind: str, **extra: Any) -> UpstreamSettings:
    base = {"name": f"{kind}-a", "kind": kind, "api_key": KEY, "base_url": "https://example.test"}
    return UpstreamSettings.model_validate({**base, **extra})


def test_every_kind_has_a_settings_model() -> None:
    for kind in provider_kinds().values():
        assert issubclass(kind.settings, KindSettings), kind.name
    assert provider_kinds()["bfl"].settings is PollingSettings
    assert provider_kinds()["local"].settings is LocalSettings
    assert provider_kinds()["azure"].settings is AzureSettings


def test_flat_kind_fields_load_into_the_kinds_model() -> None:
    polled = upstream("fal", poll_budget_s=12, delivery_hosts=["cdn.example:8080"])
    own = polled.options_as(PollingSettings)
    assert (own.poll_budget_s, own.delivery_hosts, own.poll_interval_s) == (12, ["cdn.example:8080"], 0.5)
    assert upstream("azure", api_version="2025-04-01").options_as(AzureSettings).api_version == "2025-04-01"
    local = upstream("local", fallback_for=["gpt-image-1.5"], stream_pace_s=0.1)
    assert local.stands_in_for("gpt-image-1.5") and not local.stands_in_for("gpt-image-1")
    assert not upstream("openai").stands_in_for("gpt-image-1.5")


def test_a_field_of_another_kind_is_refused_naming_the_kinds_that_take_it() -> None:
    with pytest.raises(ValidationError) as caught:
        upstream("openai", poll_budget_s=10)
    message = str(caught.value)
    assert "upstream 'openai-a' (kind openai): poll_budget_s is only for kind bfl, fal, replicate" in message


def test_an_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="pol_budget_s is not an upstream setting"):
        upstream("bfl", pol_budget_s=10)


def test_a_bad_value_names_the_field() -> None:
    with pytest.raises(
        ValidationError, match=r"\(kind replicate\): poll_budget_s: Input should be greater than 0"
    ):
        upstream("replicate", poll_budget_s=0)
    with pytest.raises(ValidationError, match=r"stream_pace_s: Input should be less than or equal to 60"):
        upstream("local", stream_pace_s=61)


def test_the_reader_of_another_kinds_settings_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="has no PollingSettings"):
        upstream("openai").options_as(PollingSettings)


def test_a_dumped_upstream_reads_back_the_same() -> None:
    original = upstream("bfl", poll_budget_s=9, polling_hosts=["api.example"])
    again = UpstreamSettings.model_validate(original.model_dump())
    assert again.options == original.options and again.name == original.name


def test_the_yaml_config_format_is_unchanged(tmp_path: Any) -> None:
    config = {
        "admin_key": "sk-admin-test-0123456789abcdef0123456789",
        "data_dir": str(tmp_path),
        "upstreams": [
            {
                "name": "flux",
                "kind": "bfl",
                "api_key": KEY,
                "poll_budget_s": 60,
                "delivery_hosts": ["*.bfl.ai"],
            },
            {"name": "local", "kind": "local", "fallback_for": ["*"], "stream_pace_s": 0.5},
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(str(path))
    flux, local = settings.upstreams
    assert flux.options_as(PollingSettings).poll_budget_s == 60
    assert local.options_as(LocalSettings).stream_pace_s == 0.5 and local.stands_in_for("anything")
    config["upstreams"][0]["stream_pace_s"] = 1  # type: ignore[index]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="stream_pace_s is only for kind local"):
        load_settings(str(path))


def test_every_adapter_module_stays_under_400_lines() -> None:
    """A provider costs a module of a few hundred lines (issue 28): the adapters share the
    transport, the polling mixin and the kind registry rather than growing their own."""
    from pathlib import Path

    providers = Path(__file__).resolve().parents[2] / "app" / "upstream" / "providers"
    sizes = {p.name: len(p.read_text().splitlines()) for p in providers.glob("*.py")}
    assert {"fal.py", "replicate.py", "bfl.py"} <= sizes.keys()
    assert {name: n for name, n in sizes.items() if n >= 400} == {}
