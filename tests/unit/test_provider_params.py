"""Provider-specific fields checked from the catalog (``provider.params`` rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.domain.catalog import Catalog
from app.domain.provider_spec import ParamRule, ProviderSpec, ProviderSpecError


@pytest.mark.parametrize(
    ("rule", "value", "parsed", "ok"),
    [
        (ParamRule(type="integer", min=0, max=6), 6, 6, True),
        (ParamRule(type="integer", min=0, max=6), 7, 7, False),
        (ParamRule(type="integer", min=0, max=6), "3", 3, True),  # multipart text
        (ParamRule(type="integer", min=0, max=6), 2.0, 2, True),
        (ParamRule(type="integer"), 2.5, 2.5, False),
        (ParamRule(type="integer"), True, True, False),
        (ParamRule(type="number", min=1.5, max=10), "4.5", 4.5, True),
        (ParamRule(type="number", min=1.5, max=10), 1, 1, False),
        (ParamRule(type="number"), float("nan"), None, False),
        (ParamRule(type="boolean"), "false", False, True),
        (ParamRule(type="boolean"), "maybe", "maybe", False),
        (ParamRule(type="string", values=("a", "b")), "b", "b", True),
        (ParamRule(type="string", values=("a", "b")), "c", "c", False),
        (ParamRule(type="string"), 3, 3, False),
        (ParamRule(), {"any": "thing"}, {"any": "thing"}, True),
    ],
)
def test_param_rules(rule: ParamRule, value: Any, parsed: Any, ok: bool) -> None:
    got, reason = rule.parse(value)
    assert (reason is None) == ok, reason
    if parsed is not None:
        assert got == parsed


def test_mapped_params_sends_the_parsed_value_under_the_providers_name() -> None:
    spec = ProviderSpec.from_mapping(
        {
            "kind": "bfl",
            "model": "m",
            "params": {"st": {"to": "safety_tolerance", "type": "integer"}, "seed": "seed"},
        },
        where="p",
    )
    assert spec.mapped_params({"st": "2", "seed": "7", "other": 1}) == {"safety_tolerance": 2, "seed": "7"}


@pytest.mark.parametrize(
    "params",
    [{"st": {"type": "integer"}}, {"st": {"to": "x", "type": "date"}}],
)
def test_malformed_rules_are_refused_at_load(params: dict[str, Any]) -> None:
    with pytest.raises(ProviderSpecError):
        ProviderSpec.from_mapping({"kind": "bfl", "model": "m", "params": params}, where="p")


def test_the_default_catalog_checks_the_documented_provider_fields() -> None:
    catalog = Catalog.from_file(Path(__file__).resolve().parents[2] / "app" / "defaults" / "models.yaml")
    checks = {
        ("imagen-4.0-generate-001", "person_generation"): ("allow_all", "everyone"),
        ("flux-pro-1.1", "safety_tolerance"): (6, 7),
        ("flux-2-pro", "safety_tolerance"): (5, 6),
        ("flux-2-flex", "steps"): (50, 0),
        ("stable-image-core", "style_preset"): ("anime", "watercolour"),
        ("stable-image-ultra", "seed"): (0, -1),
    }
    for (model, field), (good, bad) in checks.items():
        caps = catalog.get(model)
        assert caps is not None and caps.provider is not None
        assert caps.provider.parse_param(field, good)[1] is None, (model, field)
        assert caps.provider.parse_param(field, bad)[1] is not None, (model, field)
    gemini_pro = catalog.get("gemini-3-pro-image-preview")
    assert gemini_pro is not None and gemini_pro.edit is not None and gemini_pro.edit.max_images == 14
    kontext = catalog.get("flux-kontext-pro")
    assert kontext is not None and kontext.legacy and kontext.replacement == "flux-2-pro"
