"""The job is pure data, and no context variable carries a request's state (issue 28).

``ImageJob`` holds what the client asked for and what admission decided: it imports nothing above
the domain floor and has no field for transport state (headers, callbacks, a provider job to
resume). How a job is run travels beside it, explicitly (``app/upstream/call.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import grimp

from app.domain import jobs
from app.domain.jobs import ImageJob

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"

# The context variables the app may hold, and why neither is a request's state:
# - core/logging.py: the request id stamped on log lines. It decorates what is logged and is
#   never read to decide anything;
# - db/transient.py: how long a database caller waits out a transient error. The task worker
#   sets it once for its whole loop (a role, not a request): ``None`` for "until it is back".
ALLOWED_CONTEXT_VARS = {"app/core/logging.py": 1, "app/db/transient.py": 1}


def test_the_job_module_imports_nothing_above_the_domain_floor() -> None:
    graph = grimp.build_graph("app")
    upstream = graph.find_upstream_modules("app.domain.jobs")
    above = sorted(m for m in upstream if not m.startswith(("app.domain", "app.core")))
    assert above == []


def test_the_job_has_no_transport_state() -> None:
    names = {f.name for f in dataclasses.fields(ImageJob)}
    assert not names & {"headers", "resume", "on_submitted", "trace", "source", "on_answer"}
    hints = typing.get_type_hints(ImageJob, vars(jobs))
    callables = sorted(
        name for name, hint in hints.items() if "Callable" in str(hint) or "Awaitable" in str(hint)
    )
    assert callables == [], "a job holds data, not callbacks"


def context_vars(path: Path) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    made = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            made += name == "ContextVar"
    return made


def test_no_context_variable_carries_request_state() -> None:
    found = {
        str(path.relative_to(ROOT)): count
        for path in sorted(APP.rglob("*.py"))
        if (count := context_vars(path))
    }
    assert found == ALLOWED_CONTEXT_VARS


def test_the_scan_finds_a_context_variable(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import contextvars\nfrom contextvars import ContextVar\n"
        "a = ContextVar('a')\nb = contextvars.ContextVar('b')\n"
    )
    assert context_vars(sample) == 2
