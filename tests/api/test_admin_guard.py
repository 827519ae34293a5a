"""The admin key is checked in one place (issue 17): ``AdminGuardMiddleware``, before routing.

Behaviour over HTTP for every admin route (no key, a wrong key, a tenant key, another scheme: 401
before the body is read; the right key: through), ``require_admin`` reading only the middleware's
mark, and a source scan that finds one comparison of the admin key and one Bearer parser in app/.
"""

from __future__ import annotations

import ast
import re
import tempfile
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from app.api.deps import ADMIN_MARK, require_admin
from app.core.errors import AuthenticationError
from app.main import create_app
from tests.conftest import ADMIN_KEY, LOCAL_UPSTREAM, ROOT, Gateway, make_settings


def admin_routes() -> list[tuple[str, str]]:
    """Every admin operation the served document lists, path parameters filled with "x"."""
    app = create_app(make_settings(Path(tempfile.gettempdir()) / "unused", [LOCAL_UPSTREAM]))
    found = [
        (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/admin")
        for method in operations
    ]
    assert len(found) >= 10
    return found


def test_every_admin_route_refuses_without_the_admin_key_before_reading_the_body(gateway: Gateway) -> None:
    tenant_key, _ = gateway.create_key(name="tenant")
    refused = (
        {},
        {"Authorization": "Bearer sk-admin-wrong-0123456789abcdef"},
        {"Authorization": f"Bearer {tenant_key}"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"Authorization": ADMIN_KEY},
    )
    for method, path in admin_routes():
        for headers in refused:
            # A body no route could parse: the 401 must come first, never a 400 about it.
            response = httpx.request(
                method,
                gateway.url + path,
                headers={**headers, "content-type": "application/json"},
                content=b"{not json",
                timeout=30,
            )
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_the_admin_key_passes_on_every_admin_route(gateway: Gateway) -> None:
    for method, path in admin_routes():
        for scheme in ("Bearer", "bearer"):
            response = httpx.request(
                method,
                gateway.url + path,
                headers={"Authorization": f"{scheme} {ADMIN_KEY}", "content-type": "application/json"},
                content=b"{not json",
                timeout=30,
            )
            # Past the guard: whatever the route says about a missing key id or a bad body.
            assert response.status_code != 401, (method, path, response.text)


async def test_require_admin_reads_only_the_middlewares_mark() -> None:
    """The dependency does not compare keys: the right key without the mark is still refused."""
    headers = [(b"authorization", f"Bearer {ADMIN_KEY}".encode())]
    unmarked = Request({"type": "http", "headers": headers, "state": {}})
    with pytest.raises(AuthenticationError):
        await require_admin(unmarked)
    marked = Request({"type": "http", "headers": [], "state": {ADMIN_MARK: True}})
    await require_admin(marked)


def _calls(tree: ast.AST, path: Path) -> list[tuple[str, str, ast.AST]]:
    """(file, enclosing function, node) for every node, so hits can be placed."""
    found: list[tuple[str, str, ast.AST]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            found.append((str(path.relative_to(ROOT)), name, child))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_one_admin_key_comparison_and_one_bearer_parser_in_the_source() -> None:
    compares: set[tuple[str, str]] = set()
    bearer_parsers: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "app").rglob("*.py")):
        for file, function, node in _calls(ast.parse(path.read_text()), path):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
                called = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                if called in ("secrets_equal", "compare_digest") and "admin_key" in ast.unparse(node):
                    compares.add((file, function))
            if (
                isinstance(node, ast.Compare)
                and "admin_key" in ast.unparse(node)
                and not all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops)  # `is None` checks
            ):
                compares.add((file, function))
            if isinstance(node, ast.Constant) and node.value == "bearer":
                bearer_parsers.add((file, function))
    assert compares == {("app/api/deps.py", "is_admin_key")}
    assert bearer_parsers == {("app/api/deps.py", "parse_bearer")}
