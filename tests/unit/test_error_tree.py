"""One error tree and one body builder (issue 17).

Every ``GatewayError`` subclass in app/ lives in app/core/errors.py and is named in its drawing, and
the ``{"error": {...}}`` body is written in exactly one function, ``app.core.errors.error_body``: a scan
of app/'s source finds no other dict literal, string or bytes that spells one out.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import app
import app.core.errors as errors
from app.core.errors import GatewayError, ModerationBlockedError, ModerationUnavailableError, error_body

APP = Path(app.__file__).resolve().parent
# Entry points and migration scripts run things on import; they define no errors.
SKIPPED = ("app.__main__", "app.migrations")
PENDING_ELSEWHERE: list[str] = []


def every_subclass(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= every_subclass(sub)
    return found


def test_every_client_visible_error_is_in_app_errors_and_its_drawing() -> None:
    for module in pkgutil.walk_packages([str(APP)], prefix="app."):
        if not module.name.startswith(SKIPPED):
            importlib.import_module(module.name)
    classes = every_subclass(GatewayError)
    assert len(classes) >= 20
    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes if c.__module__ != "app.core.errors")
    assert outside == []
    drawing = errors.__doc__ or ""
    assert [c.__name__ for c in classes if f"── {c.__name__} " not in drawing] == []


def test_moderation_errors_keep_their_answers() -> None:
    blocked = ModerationBlockedError(["violence"], stage="output")
    assert (blocked.status_code, blocked.error_type, blocked.code, blocked.param) == (
        400,
        "image_generation_user_error",
        "moderation_blocked",
        None,
    )
    assert blocked.to_body()["error"]["moderation_details"] == {
        "moderation_stage": "output",
        "categories": ["violence"],
    }
    unavailable = ModerationUnavailableError()
    assert (unavailable.status_code, unavailable.error_type, unavailable.code) == (
        503,
        "api_error",
        "moderation_unavailable",
    )
    # Still importable where checkers and tests have always found them.
    from app.moderation import base

    assert base.ModerationBlockedError is ModerationBlockedError
    assert base.ModerationUnavailableError is ModerationUnavailableError


def test_error_body_always_carries_the_four_keys() -> None:
    assert error_body("m", "invalid_request_error", None, None) == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
    }


def _spells_an_error_body(node: ast.AST) -> bool:
    if isinstance(node, ast.Dict):
        keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
        return {"message", "type"} <= keys or (
            "error" in keys and any(isinstance(v, ast.Dict) for v in node.values)
        )
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {"message", "type"} <= {k.arg for k in node.keywords}
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
        return '"error"' in text and '"message"' in text
    return False


def test_exactly_one_function_builds_the_error_body() -> None:
    builders: list[str] = []
    for path in sorted(APP.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in [tree, *ast.walk(tree)]:
            if function is not tree and not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            # Only nodes of this function itself, not of functions nested in it.
            own = [function]
            nodes = []
            while own:
                node = own.pop()
                for child in ast.iter_child_nodes(node):
                    if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        nodes.append(child)
                        own.append(child)
            if any(_spells_an_error_body(node) for node in nodes):
                name = getattr(function, "name", "<module>")
                builders.append(f"{path.relative_to(APP.parent)}:{name}")
    # app/tasks/queue.py writes an abandoned task's error object by hand; app/tasks/ belongs to
    # another change in flight (issue 17), which is to build it with error_body(...)["error"]. It
    # is named here so that any further builder still fails this test.
    assert builders == ["app/core/errors.py:error_body", *PENDING_ELSEWHERE]
