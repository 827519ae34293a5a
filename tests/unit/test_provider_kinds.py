"""The upstream kinds are registered by their own modules, and named nowhere else (issue 28,
acceptance 4): adding a provider touches its module, its catalog entries and its tests."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.upstream.config import ProviderKind, UpstreamSettings, provider_kind, provider_kinds, register_kind

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"
# The catalog names the kind that serves each provider model, and its families (`gemini`,
# `imagen`, `stability` are family names as well as kind names).
CATALOG = {APP / "domain" / "catalog.py"}
# The object store has kinds of its own ("local" disk or "s3"): another namespace, same word.
STORAGE_KIND = {APP / "storage" / "config.py": {"local"}, APP / "runtime" / "settings.py": {"local"}}


def string_literals(path: Path) -> set[str]:
    """The string constants of a module, docstrings left out (prose may name a provider)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def home(kind: ProviderKind) -> Path:
    module = sys.modules[kind.build.__module__]
    assert module.__file__ is not None
    return Path(module.__file__).resolve()


def test_every_kind_lives_in_a_module_of_the_providers_package() -> None:
    kinds = provider_kinds()
    assert kinds, "no kind registered"
    for kind in kinds.values():
        assert home(kind).parent == APP / "upstream" / "providers", kind.name


def test_no_kind_name_appears_outside_its_own_module_and_the_catalog() -> None:
    kinds = provider_kinds()
    found: list[str] = []
    for path in sorted(APP.rglob("*.py")):
        path = path.resolve()
        if path in CATALOG:
            continue
        literals = string_literals(path) - STORAGE_KIND.get(path, set())
        for name in sorted(literals & kinds.keys()):
            if home(kinds[name]) != path:
                found.append(f"{path.relative_to(ROOT)}: {name!r}")
    assert found == []


def test_the_default_catalog_names_only_registered_kinds() -> None:
    from app.domain.catalog import Catalog

    catalog = Catalog.from_file(APP / "defaults" / "models.yaml")
    used = {
        caps.provider.kind
        for name in catalog.names()
        if (caps := catalog.get(name)) is not None and caps.provider is not None
    }
    assert used <= provider_kinds().keys()


def test_an_unknown_kind_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValidationError) as caught:
        UpstreamSettings(name="x", kind="nope")
    assert all(name in str(caught.value) for name in provider_kinds())


def test_a_kind_registers_once() -> None:
    existing = next(iter(provider_kinds().values()))
    assert register_kind(existing) is existing  # the same object again: a module re-imported
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(ProviderKind(name=existing.name, build=existing.build))
    assert provider_kind(existing.name) is existing
