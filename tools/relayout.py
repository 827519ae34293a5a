#!/usr/bin/env python3
"""Move app/ into folders that show its layers (issue 28), and rewrite every reference to match.

Why a script and not a commit: several branches change app/ at the same time, and a commit that
moves sixteen modules would conflict with each of them. This runs once on the merged tree instead:

    python tools/relayout.py            # from the repository root (or: --root PATH)
    python tools/relayout.py --check    # says what it would do, changes nothing, exits 1 if anything

It moves only the files in ``MOVES`` (a directory entry moves every file under it, including ones
added since this table was written), so files other branches add stay where they are and their
imports of moved modules are rewritten like everyone else's. Running it twice changes nothing. It
stops before changing anything when a mapped source is missing (and not already moved), when a
source and its destination both exist, when app/ has a root module this table does not place, or
when a moved module finds its way by ``__file__`` with no fix-up below.

What it rewrites, in every tracked text file (this script and CHANGELOG.md excepted: history keeps
the names it had):

- imports: ``from app.settings import x``, ``import app.errors as e``, ``from app import keys``;
- dotted names in strings and comments (``"app.keys.time"`` for ``monkeypatch``, ``app.errors`` in
  a docstring, ``logger="app.lifespan"``) and in non-Python files (pyproject, docs). A name
  followed by an attribute that the module does not define (``app.state.gateway``, FastAPI's
  ``app.state``) is left alone and listed, so nothing but module paths changes;
- paths: ``app/settings.py``, ``images/requests.py``, ``db/migrations``, and joined paths in tests
  (``APP / "settings.py"``).

Then it writes the layers contract in pyproject.toml (other contracts are kept) and runs ruff
(format, and ``check --fix`` for import order) on the Python files it changed.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import tokenize
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# Source → destination, relative to the repository root. A directory moves as a whole.
MOVES: dict[str, str] = {
    # core: the floor, imports nothing of the gateway.
    "app/errors.py": "app/core/errors.py",
    "app/security.py": "app/core/security.py",
    "app/logging.py": "app/core/logging.py",
    "app/memory.py": "app/core/memory.py",
    # telemetry: Prometheus and OpenTelemetry (they name domain types, so they sit above it).
    "app/metrics.py": "app/telemetry/metrics.py",
    "app/tracing.py": "app/telemetry/tracing.py",
    # runtime: one running gateway, from its settings to its shutdown.
    "app/settings.py": "app/runtime/settings.py",
    "app/lifespan.py": "app/runtime/lifespan.py",
    "app/state.py": "app/runtime/state.py",
    "app/drain.py": "app/runtime/drain.py",
    "app/standalone.py": "app/runtime/standalone.py",
    "app/cli.py": "app/runtime/cli.py",
    # auth: tenant API keys.
    "app/keys.py": "app/auth/keys.py",
    # the SSE writer is HTTP: it belongs with the routes.
    "app/streaming.py": "app/api/streaming.py",
    # admission, one package.
    "app/images/requests.py": "app/images/admission/requests.py",
    "app/images/preparation.py": "app/images/admission/preparation.py",
    "app/images/validation.py": "app/images/admission/validation.py",
    "app/images/output_rules.py": "app/images/admission/output_rules.py",
    "app/images/lifecycle.py": "app/images/admission/lifecycle.py",
    # Alembic's env.py reads the settings, which sit above db: the migrations become an entry
    # point of their own, like __main__ (what the full-stack FastAPI template does with app/alembic).
    "app/db/migrations": "app/migrations",
}

# Root modules of app/ that stay: the command line, the app factory, the package itself.
ROOT_MODULES = {"__init__.py", "__main__.py", "main.py"}

# Packages this layout creates, with the docstring of their __init__.py (written only if missing).
PACKAGES: dict[str, str] = {
    "app/core": (
        "The floor every layer stands on; it imports nothing of the gateway.\n\n"
        "The error tree and the one error body (``errors.py``), key hashing (``security.py``), JSON\n"
        "logs and the request id (``logging.py``), the allocator's tuning (``memory.py``).\n"
    ),
    "app/telemetry": (
        "Prometheus metrics and OpenTelemetry tracing, each owned by one app instance.\n\n"
        "Above the domain floor because they label what they count with its types (breaker states,\n"
        "token usage); below every layer that reports through them.\n"
    ),
    "app/runtime": (
        "One running gateway, from its settings to its shutdown.\n\n"
        "``settings.py`` assembles the config sections each package owns; ``lifespan.py`` opens every\n"
        "resource into the per-app container the routes read (``state.py``) and closes them;\n"
        "``drain.py`` is SIGTERM's two steps; ``standalone.py`` the task worker in its own process;\n"
        "``cli.py`` the database commands. ``app/main.py`` composes this with the routes.\n"
    ),
    "app/auth": (
        "Tenant API keys: create, authenticate (a keyed hash, cached per process and invalidated\n"
        "through Redis), change, revoke. The admin key is checked at the HTTP edge (``app/api/deps.py``).\n"
    ),
    "app/images/admission": (
        "Admission's validation step: a client's draft becomes an ``ImageJob``, or an OpenAI-shaped\n"
        "400/403/404, before anything is reserved or called.\n\n"
        "The entry point is ``JobPreparer.validate`` (``preparation.py``), which ``ImageService.admit``\n"
        "(``app/images/service.py``) runs before moderation, the rate limits and the hold. The rest is\n"
        "what it consults: the request path's types (``requests.py``: drafts, admissions, outcomes),\n"
        "the catalog's rules (``validation.py``, ``output_rules.py`` for GIF/SVG) and the models'\n"
        "lifecycle (``lifecycle.py``: retirements, remaps, Sunset headers).\n"
    ),
    "app/migrations": (
        "Alembic's migrations, a package so that import-linter reads them.\n\n"
        "Alembic loads ``env.py`` and ``versions/`` by path (``app/db/migrate.py``, ``alembic.ini``).\n"
        "``env.py`` is an entry point like ``__main__``: it may read the runtime's settings (for the\n"
        "bare ``alembic`` command line), and nothing in the gateway imports it.\n"
    ),
    "app/migrations/versions": "One revision per schema change; Alembic's listing skips this file.\n",
}

# Moved modules that find files relative to themselves: (destination, old text, new text).
FIXUPS: list[tuple[str, str, str]] = [
    (
        "app/runtime/settings.py",
        'DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"',
        'DEFAULTS_DIR = Path(__file__).resolve().parents[1] / "defaults"',
    ),
    (
        "app/db/migrate.py",
        'MIGRATIONS = Path(__file__).parent / "migrations"',
        'MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"',
    ),
]

# The layers contract, top to bottom; ``|`` separates packages of one layer that must not import
# each other. Every top-level module and package of app/ must appear here.
LAYERS: list[tuple[str, str]] = [
    ("__main__ | migrations", "entry points: the command line; Alembic's env.py"),
    ("main", "the app factory: the routes on the runtime"),
    ("api", "HTTP: routers, deps, middleware, SSE, console routes"),
    ("runtime", "settings, lifespan, state, drain, worker, CLI"),
    ("batches", "OpenAI's Files and Batch APIs"),
    ("tasks | console", "async tasks; the console's read models"),
    ("images", "admission, the request path, relay, settlement"),
    ("auth | webhooks", "tenant API keys; webhook outbox and sender"),
    ("moderation | billing | storage", "moderation; prices, ledger, limits; images"),
    ("upstream", "every outbound image call"),
    ("telemetry | db | cluster", "metrics, tracing; tables, writers; Redis bus"),
    ("domain | schemas", "catalog, jobs, money; the wire contract"),
    ("core", "the floor: errors, security, logging, memory"),
]
LAYERS_CONTRACT_NAME = "Layers import downward only"

# Never rewritten: this script holds the old names on purpose; a changelog keeps history's names.
SKIP_REWRITE = {"tools/relayout.py", "CHANGELOG.md"}
TEXT_SUFFIXES = {
    ".py", ".md", ".toml", ".ini", ".cfg", ".txt", ".yaml", ".yml", ".json", ".mako", ".html",
    ".js", ".sh", ".example",
}  # fmt: skip
TEXT_NAMES = {"Makefile", "Dockerfile", ".pre-commit-config.yaml", ".gitignore", ".dockerignore", "run"}


class RelayoutError(Exception):
    pass


@dataclass
class Report:
    moved: list[tuple[str, str]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RelayoutError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def tracked_files(root: Path) -> list[str]:
    out = git(root, "ls-files", "-z", "--cached")
    return sorted({p for p in out.split("\0") if p and (root / p).is_file() and not (root / p).is_symlink()})


# ------------------------------------------------------------------ planning the moves


def plan_moves(root: Path, files: list[str]) -> list[tuple[str, str]]:
    """Every (source file, destination file) still to move; raises before anything is changed."""
    plan: list[tuple[str, str]] = []
    problems: list[str] = []
    for src, dst in MOVES.items():
        s, d = root / src, root / dst
        if src.endswith(".py"):
            if s.exists() and d.exists():
                problems.append(f"{src} and {dst} both exist: merge them by hand, then re-run")
            elif s.exists():
                plan.append((src, dst))
            elif not d.exists():
                problems.append(f"{src} is missing (and {dst} does not exist either)")
            continue
        under = [f for f in files if f.startswith(src + "/")]
        if not under and not any(f.startswith(dst + "/") for f in files):
            problems.append(f"{src}/ is missing (and {dst}/ does not exist either)")
        for f in under:
            target = dst + f[len(src) :]
            if (root / target).exists():
                problems.append(f"{f} and {target} both exist: merge them by hand, then re-run")
            else:
                plan.append((f, target))
    moving = {s for s, _ in plan} | {s for s in MOVES if not s.endswith(".py")}
    for entry in sorted((root / "app").glob("*.py")):
        rel = f"app/{entry.name}"
        if entry.name not in ROOT_MODULES and rel not in MOVES and rel not in moving:
            problems.append(f"{rel} is a root module this layout does not place: add it to MOVES")
    for package in PACKAGES:
        if (root / f"{package}.py").exists():
            problems.append(f"{package}.py exists where the package {package}/ goes")
    moved_py = [(s, d) for s, d in plan if s.endswith(".py")] + [
        (d, d)
        for s, d in MOVES.items()
        if s.endswith(".py") and not (root / s).exists() and (root / d).exists()
    ]
    fixed = {dst for dst, _, _ in FIXUPS}
    for src, dst in moved_py:
        text = (root / src).read_text(encoding="utf-8")
        if "__file__" in text and dst not in fixed:
            problems.append(f"{src} uses __file__ and moves to {dst}: add a FIXUPS entry")
    if problems:
        raise RelayoutError("nothing was changed:\n  " + "\n  ".join(problems))
    return plan


# ------------------------------------------------------------------ name and path maps


def module_of(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def module_map() -> dict[str, str]:
    return {module_of(s): module_of(d) for s, d in MOVES.items()}


def defined_names(root: Path) -> dict[str, set[str] | None]:
    """Top-level names of each moved module (None: a package, where anything may follow)."""
    names: dict[str, set[str] | None] = {}
    for src, dst in MOVES.items():
        if not src.endswith(".py"):
            names[module_of(src)] = None
            continue
        path = root / dst if (root / dst).exists() else root / src
        found: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    found.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                        found.add(sub.name)
                    elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                        found.update((a.asname or a.name).split(".")[0] for a in sub.names)
        names[module_of(src)] = found
    return names


def alternation(keys: list[str]) -> str:
    return "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))


class Rewriter:
    def __init__(self, root: Path) -> None:
        self.modules = module_map()
        self.names = defined_names(root)
        self.dotted = re.compile(
            rf"(?<![\w.])(?P<mod>{alternation(list(self.modules))})(?![\w])(?:\.(?P<attr>\w+))?"
        )
        self.paths: dict[str, str] = {}
        for src, dst in MOVES.items():
            self.paths[src] = dst
        self.full_path = re.compile(
            rf"(?:(?<![\w/.-])|(?<=\./))(?P<p>{alternation(list(self.paths))})(?![\w])"
        )
        # Paths relative to app/ ("images/requests.py", "db/migrations"), only where they have a folder.
        self.relative: dict[str, str] = {
            s.removeprefix("app/"): d.removeprefix("app/") for s, d in MOVES.items() if "/" in s[4:]
        }
        self.rel_path = re.compile(rf"(?<![\w/.-])(?P<p>{alternation(list(self.relative))})(?![\w])")
        self.joined = re.compile(r'(?P<head>\bAPP\b\s*|"app"\)?\s*)(?P<segs>(?:/\s*"[\w.-]+"\s*)+)')
        self.left_alone: list[str] = []

    # -- pieces

    def _dotted(self, text: str, where: str) -> str:
        def sub(m: re.Match[str]) -> str:
            mod, attr = m.group("mod"), m.group("attr")
            known = self.names.get(mod)
            if attr is not None and known is not None and attr not in known:
                self.left_alone.append(f"{where}: {m.group(0)} ({attr!r} is not a name of {mod})")
                return m.group(0)
            return self.modules[mod] + m.group(0)[len(mod) :]

        return self.dotted.sub(sub, text)

    def _paths(self, text: str) -> str:
        text = self.full_path.sub(lambda m: self.paths[m.group("p")], text)
        return self.rel_path.sub(lambda m: self.relative[m.group("p")], text)

    def _joined(self, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            segs = re.findall(r'"([\w.-]+)"', m.group("segs"))
            rel = "/".join(segs)
            new = None
            for src, dst in MOVES.items():
                s, d = src.removeprefix("app/"), dst.removeprefix("app/")
                if rel == s or rel.startswith(s + "/"):
                    new = d + rel[len(s) :]
                    break
            if new is None:
                return m.group(0)
            tail = m.group("segs")[len(m.group("segs").rstrip()) :]
            return m.group("head") + "/ " + " / ".join(f'"{p}"' for p in new.split("/")) + tail

        return self.joined.sub(sub, text)

    def text(self, text: str, where: str) -> str:
        return self._paths(self._dotted(text, where))

    # -- Python

    def python(self, source: str, where: str) -> str:
        bound = self._bound_modules(source, where)
        source = self._imports(source, where)
        edits: list[tuple[int, int, str]] = []
        offsets = _line_offsets(source)
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (tokenize.TokenError, SyntaxError) as exc:
            raise RelayoutError(f"{where}: cannot tokenize ({exc})") from exc
        code_start = 0
        for tok in tokens:
            start = offsets[tok.start[0] - 1] + tok.start[1]
            end = offsets[tok.end[0] - 1] + tok.end[1]
            if tok.type in (tokenize.STRING, tokenize.COMMENT):
                if bound and start > code_start:
                    self._code(source, code_start, start, bound, edits)
                piece = source[start:end]
                new = self.text(piece, f"{where}:{tok.start[0]}")
                if new != piece:
                    edits.append((start, end, new))
                code_start = end
        if bound:
            self._code(source, code_start, len(source), bound, edits)
        for start, end, new in sorted(edits, reverse=True):
            source = source[:start] + new + source[end:]
        return self._joined(source)

    def _code(
        self, source: str, start: int, end: int, bound: set[str], edits: list[tuple[int, int, str]]
    ) -> None:
        """``app.x.y`` in code, in a file that did ``import app.x``: the module, by that binding."""
        pattern = re.compile(rf"(?<![\w.])(?:{alternation(sorted(bound))})(?![\w])")
        for m in pattern.finditer(source, start, end):
            edits.append((m.start(), m.end(), self.modules[m.group(0)]))

    def _bound_modules(self, source: str, where: str) -> set[str]:
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            raise RelayoutError(f"{where}: cannot parse ({exc})") from exc
        bound: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound.update(a.name for a in node.names if a.asname is None and a.name in self.modules)
        return bound

    def _imports(self, source: str, where: str) -> str:
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            raise RelayoutError(f"{where}: cannot parse ({exc})") from exc
        offsets = _line_offsets(source)
        edits: list[tuple[int, int, str]] = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            start = offsets[node.lineno - 1] + node.col_offset
            end = offsets[node.end_lineno - 1] + node.end_col_offset  # type: ignore[operator]
            segment = source[start:end]
            if isinstance(node, ast.Import):
                new = segment
                for alias in node.names:
                    target = self._module(alias.name)
                    if target != alias.name:
                        new = re.sub(rf"(?<![\w.]){re.escape(alias.name)}(?![\w])", target, new, count=1)
                if new != segment:
                    edits.append((start, end, new))
                continue
            if node.level or node.module is None:
                continue
            target = self._module(node.module)
            if target != node.module:
                new = re.sub(rf"^from\s+{re.escape(node.module)}(?![\w])", f"from {target}", segment)
                edits.append((start, end, new))
                continue
            moved = [a for a in node.names if f"{node.module}.{a.name}" in self.modules]
            if not moved:
                continue
            if "(" in segment or "\n" in segment or ";" in source[end : source.find("\n", end)]:
                raise RelayoutError(f"{where}:{node.lineno}: rewrite this multi-line import by hand")
            indent = source[offsets[node.lineno - 1] : start]
            kept = [a for a in node.names if a not in moved]
            lines = []
            if kept:
                lines.append(f"from {node.module} import " + ", ".join(_alias(a) for a in kept))
            for a in moved:
                parent, _, leaf = self.modules[f"{node.module}.{a.name}"].rpartition(".")
                bound_as = a.asname or (a.name if leaf != a.name else None)
                lines.append(f"from {parent} import {leaf}" + (f" as {bound_as}" if bound_as else ""))
            edits.append((start, end, ("\n" + indent).join(lines)))
        for start, end, new in sorted(edits, reverse=True):
            source = source[:start] + new + source[end:]
        return source

    def _module(self, name: str) -> str:
        for old in sorted(self.modules, key=len, reverse=True):
            if name == old or name.startswith(old + "."):
                return self.modules[old] + name[len(old) :]
        return name


def wrap_long_lines(new: str, old: str, limit: int) -> str:
    """Break the comment and docstring lines a longer path pushed past the limit (ruff cannot).

    Only lines this script wrote are touched; code lines are left to ``ruff format``."""
    before = set(old.splitlines())
    lines = new.splitlines(keepends=True)
    in_string: set[int] = set()
    comments: dict[int, int] = {}
    for tok in tokenize.generate_tokens(io.StringIO(new).readline):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            in_string.update(range(tok.start[0], tok.end[0] + 1))
        elif tok.type == tokenize.COMMENT and tok.start[1] == len(lines[tok.start[0] - 1]) - len(
            lines[tok.start[0] - 1].lstrip()
        ):
            comments[tok.start[0]] = tok.start[1]
    out: list[str] = []
    for number, line in enumerate(lines, start=1):
        body = line.rstrip("\n")
        cut = body.rfind(" ", 0, limit + 1)
        if len(body) <= limit or body in before or cut <= len(body) - len(body.lstrip()):
            out.append(line)
            continue
        indent = body[: len(body) - len(body.lstrip())]
        if number in comments:
            out.append(body[:cut] + "\n" + indent + "# " + body[cut + 1 :] + line[len(body) :])
        elif number in in_string:
            out.append(body[:cut] + "\n" + indent + body[cut + 1 :] + line[len(body) :])
        else:
            out.append(line)
    return "".join(out)


def line_limit(root: Path) -> int:
    with (root / "pyproject.toml").open("rb") as f:
        config = tomllib.load(f)
    return int(config.get("tool", {}).get("ruff", {}).get("line-length", 88))


def _alias(a: ast.alias) -> str:
    return a.name + (f" as {a.asname}" if a.asname else "")


def _line_offsets(source: str) -> list[int]:
    offsets, total = [], 0
    for line in source.splitlines(keepends=True):
        offsets.append(total)
        total += len(line)
    offsets.append(total)
    return offsets


# ------------------------------------------------------------------ the contract


def layers_block() -> str:
    width = max(len(layer) for layer, _ in LAYERS) + 5
    rows = "\n".join(f"    {f'{chr(34)}{layer}{chr(34)},':<{width}}# {why}" for layer, why in LAYERS)
    return (
        "[[tool.importlinter.contracts]]\n"
        f'name = "{LAYERS_CONTRACT_NAME}"\n'
        'type = "layers"\n'
        'containers = ["app"]\n'
        "# tests/unit/test_layout.py checks that it names every folder of app/, and nothing else.\n"
        f"layers = [\n{rows}\n]\n"
        "exhaustive = true\n"
    )


HEADER_COMMENT = (
    "# One-way layers (issue 17), in folders since issue 28, checked by `make lint`: a module may import\n"
    "# only from layers below its own, and `|` separates packages of one layer that must not import\n"
    "# each other. ARCHITECTURE.md draws the same list. The migrations are a package (app/migrations/)\n"
    "# so that their one import of the gateway (env.py reads the runtime's settings) is checked too.\n"
)


def write_contract(text: str) -> str:
    table = re.search(r"^\[tool\.importlinter\][ \t]*$", text, re.M)
    if table is None:
        raise RelayoutError("pyproject.toml has no [tool.importlinter] table")
    start = table.start()
    # The comment lines right above the table are its explanation: replaced with the new one.
    head_start = start
    before = text[:start].splitlines(keepends=True)
    while before and before[-1].startswith("#"):
        head_start -= len(before.pop())
    text = text[:head_start] + HEADER_COMMENT + text[start:]
    blocks = list(re.finditer(r"^\[\[tool\.importlinter\.contracts\]\]\n", text, re.M))
    for m in blocks:
        following = re.search(r"^\[", text[m.end() :], re.M)
        end = m.end() + following.start() if following else len(text)
        body = text[m.start() : end]
        if f'name = "{LAYERS_CONTRACT_NAME}"' not in body:
            continue
        # Keep the comment lines that introduce the next table with that table.
        lines = body.splitlines(keepends=True)
        trailing = ""
        while lines and (lines[-1].startswith("#") or not lines[-1].strip()):
            trailing = lines.pop() + trailing
        return text[: m.start()] + layers_block() + trailing + text[end:]
    return text.rstrip("\n") + "\n\n" + layers_block()


def destination(path: str) -> str:
    for src, dst in MOVES.items():
        if path == src or path.startswith(src + "/"):
            return dst + path[len(src) :]
    return path


def check_layers_cover(files: list[str]) -> None:
    """Every top-level module and package app/ will have is in LAYERS; checked before any change."""
    named = {part.strip() for layer, _ in LAYERS for part in layer.split("|")}
    after = {destination(f) for f in files if f.startswith("app/") and f.endswith(".py")}
    after |= {f"{package}/__init__.py" for package in PACKAGES}
    present = {Path(f).parts[1].removesuffix(".py") for f in after} - {"__init__"}
    missing = sorted(present - named)
    if missing:
        raise RelayoutError(
            f"nothing was changed: app/ would have {', '.join(missing)}, which no layer names: add to LAYERS"
        )


# ------------------------------------------------------------------ main


def is_text(path: str) -> bool:
    p = Path(path)
    return p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES


def ruff(root: Path) -> list[str]:
    local = root / ".venv" / "bin" / "ruff"
    found = str(local) if local.exists() else shutil.which("ruff")
    if found is None:
        raise RelayoutError("ruff is not installed: run `make install-dev` first")
    return [found]


def run(root: Path, check: bool) -> Report:
    report = Report()
    if not (root / "app").is_dir() or not (root / ".git").exists():
        raise RelayoutError(f"{root} is not the repository root (no app/ or .git)")
    files = tracked_files(root)
    plan = plan_moves(root, files)
    check_layers_cover(files)
    rewriter = Rewriter(root)
    if check:
        report.moved = plan
        report.created = [f"{p}/__init__.py" for p in PACKAGES if not (root / p / "__init__.py").exists()]
    else:
        for src, dst in plan:
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            git(root, "mv", src, dst)
            report.moved.append((src, dst))
        for src in MOVES:
            gone = root / src
            if not src.endswith(".py") and gone.is_dir():
                # Once every tracked file has gone, only caches can be left: they go too.
                if not [p for p in gone.rglob("*") if p.is_file() and "__pycache__" not in p.parts]:
                    shutil.rmtree(gone)
        for package, doc in PACKAGES.items():
            init = root / package / "__init__.py"
            if not init.exists():
                init.parent.mkdir(parents=True, exist_ok=True)
                init.write_text(f'"""{doc}"""\n', encoding="utf-8")
                git(root, "add", str(init.relative_to(root)))
                report.created.append(str(init.relative_to(root)))
        for dst, old, fixed in FIXUPS:
            text = (root / dst).read_text(encoding="utf-8")
            if old in text:
                (root / dst).write_text(text.replace(old, fixed), encoding="utf-8")
            elif fixed not in text:
                raise RelayoutError(f"{dst}: neither the old nor the fixed line is there: {old!r}")
        files = tracked_files(root)

    changed_py: list[str] = []
    limit = line_limit(root)
    for rel in files:
        if rel in SKIP_REWRITE or not is_text(rel) or rel.startswith(("tests/node/node_modules/", ".venv/")):
            continue
        path = root / rel
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if rel.endswith(".py"):
            new = wrap_long_lines(rewriter.python(text, rel), text, limit)
        else:
            new = rewriter.text(text, rel)
        if rel == "pyproject.toml":
            new = write_contract(new)
            try:
                tomllib.loads(new)
            except tomllib.TOMLDecodeError as exc:
                raise RelayoutError(f"the rewritten pyproject.toml does not parse ({exc})") from exc
        if new != text:
            report.rewritten.append(rel)
            if not check:
                path.write_text(new, encoding="utf-8")
                if rel.endswith(".py"):
                    changed_py.append(rel)
    report.left_alone = rewriter.left_alone

    moved_py = [d for _, d in report.moved if d.endswith(".py")]
    to_lint = sorted(set(changed_py) | set(moved_py) | set(report.created))
    if to_lint and not check:
        cmd = ruff(root)
        # The moves and rewrites are done by now; what ruff reports (above) is left to fix by hand,
        # possibly a line that was already too long in the merged tree.
        after = "the moves and rewrites are done; fix the lines above, then run `make format lint`"
        if subprocess.run([*cmd, "format", "--quiet", *to_lint], cwd=root).returncode != 0:
            raise RelayoutError(f"ruff format failed: {after}")
        if subprocess.run([*cmd, "check", "--fix", "--quiet", *to_lint], cwd=root).returncode != 0:
            raise RelayoutError(f"ruff check found problems it cannot fix: {after}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--check", action="store_true", help="report what would change; change nothing")
    parser.add_argument(
        "--move",
        action="append",
        default=[],
        metavar="SRC=DST",
        help="one more move (e.g. a root module added since this table was written); repeatable",
    )
    args = parser.parse_args(argv)
    for extra in args.move:
        src, sep, dst = extra.partition("=")
        if not sep or not src.startswith("app/") or not dst.startswith("app/"):
            parser.error(f"--move {extra!r}: expected app/SRC=app/DST")
        MOVES[src.rstrip("/")] = dst.rstrip("/")
    try:
        report = run(args.root.resolve(), args.check)
    except RelayoutError as exc:
        sys.stderr.write(f"relayout: {exc}\n")
        return 2
    would = "would " if args.check else ""
    lines = [f"{would}move: {src} -> {dst}" for src, dst in report.moved]
    lines += [f"{would}create: {path}" for path in report.created]
    lines += [f"{would}rewrite: {path}" for path in report.rewritten]
    lines += [f"left alone (not a module path): {note}" for note in report.left_alone]
    counts = f"{len(report.moved)} moved, {len(report.created)} created, {len(report.rewritten)} rewritten"
    lines.append(f"relayout: {counts}" + (" (nothing done: --check)" if args.check else ""))
    sys.stdout.write("\n".join(lines) + "\n")
    busy = bool(report.moved or report.created or report.rewritten)
    return 1 if args.check and busy else 0


if __name__ == "__main__":
    sys.exit(main())
