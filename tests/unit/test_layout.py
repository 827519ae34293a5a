"""The folders of app/ are its layers (issue 28), and import-linter reads every file of them.

``ls app/`` shows one folder per layer and no loose module but the command line and the app
factory; the layers contract in pyproject.toml names every folder; every folder holding Python is
a package, so import-linter's graph holds every file (the migrations included, whose env.py is the
one module that reads the settings from below). ARCHITECTURE.md names only paths that exist.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import grimp

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"


def python_files() -> list[Path]:
    return sorted(p for p in APP.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layers_contract() -> dict[str, Any]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    found = [c for c in contracts if c["type"] == "layers" and c.get("containers") == ["app"]]
    assert len(found) == 1, "one layers contract over app/"
    return found[0]


def test_app_root_holds_only_the_command_line_and_the_app_factory() -> None:
    files = sorted(p.name for p in APP.iterdir() if p.is_file())
    assert files == ["__init__.py", "__main__.py", "main.py", "py.typed"]


def test_the_layers_contract_names_every_folder_and_nothing_else() -> None:
    contract = layers_contract()
    assert contract.get("exhaustive") is True
    named = [part.strip() for layer in contract["layers"] for part in layer.split("|")]
    assert len(named) == len(set(named))
    present = {p.stem for p in APP.glob("*.py") if p.name != "__init__.py"}
    present |= {p.name for p in APP.iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    assert set(named) == present


def test_every_folder_holding_python_is_a_package() -> None:
    folders = {p.parent for p in python_files()}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []
    assert (APP / "migrations" / "__init__.py").is_file()
    assert (APP / "migrations" / "versions" / "__init__.py").is_file()


def test_import_linter_reads_every_file_migrations_included() -> None:
    graph = grimp.build_graph("app", cache_dir=None)
    files = {module_name(p) for p in python_files()}
    assert files - graph.modules == set()
    assert {m for m in files if m.startswith("app.migrations.versions.")}, "the revisions are read"
    # The one import of the gateway by the migrations is in the graph, so the contract judges it.
    assert "app.runtime.settings" in graph.find_modules_directly_imported_by("app.migrations.env")


def test_admission_names_its_entry_point() -> None:
    import app.images.admission as admission
    from app.images.admission.preparation import JobPreparer

    assert "``JobPreparer.validate``" in (admission.__doc__ or "")
    assert callable(JobPreparer.validate)


def test_architecture_names_only_paths_that_exist() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(app/[\w./]+?)/?`", text))
    # Paths inside app/ are often written from the package down (`images/service.py`).
    outside = ("app/", "tests/", "bench/", "deploy/", "docs/", "tools/")
    named |= {f"app/{p}" for p in re.findall(r"`([\w]+/[\w/]*\w\.py)`", text) if not p.startswith(outside)}
    assert len(named) > 40
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
    for layer in layers_contract()["layers"]:
        for part in layer.split("|"):
            name = part.strip()
            assert f"app/{name}/" in text or f"app/{name}.py" in text, name
