"""The cluster suite starts its processes only through tests/cluster/nodes.py, so every node it runs
is a pod of the manifests (issue 24, acceptance 6). A test file that builds a process itself (the
bench's process classes, subprocess, ``python -m app``, another way to spawn) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parent
# Modules that start processes, and names of the bench's own process launchers.
SPAWNING_MODULES = {"subprocess", "multiprocessing", "pty", "concurrent.futures.process"}
PROCESS_CLASSES = {"GatewayProcess", "WorkerProcess", "ProcessPoolExecutor"}
SPAWNING_CALLS = {
    "system",
    "popen",
    "Popen",
    "spawnv",
    "spawnl",
    "execv",
    "execvp",
    "fork",
    "create_subprocess_exec",
    "create_subprocess_shell",
}


def violations(source: str) -> list[str]:
    """Each way ``source`` starts a process of its own, by line."""
    found: list[str] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in SPAWNING_MODULES or alias.name.split(".")[0] in SPAWNING_MODULES:
                    found.append(f"{line}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module in SPAWNING_MODULES or module.split(".")[0] in SPAWNING_MODULES:
                found.append(f"{line}: imports from {module}")
            if module == "bench.gateway_process":
                found.extend(f"{line}: imports {a.name}" for a in node.names if a.name != "peak_rss_kib")
            found.extend(f"{line}: imports {a.name}" for a in node.names if a.name in PROCESS_CLASSES)
        elif isinstance(node, ast.Attribute):
            if node.attr in SPAWNING_CALLS or node.attr in PROCESS_CLASSES:
                found.append(f"{line}: uses .{node.attr}")
            if node.attr == "executable" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"{line}: uses sys.executable")
        elif isinstance(node, ast.Name) and node.id in PROCESS_CLASSES:
            found.append(f"{line}: uses {node.id}")
        elif isinstance(node, ast.List | ast.Tuple):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if any(words[i : i + 2] == ["-m", "app"] for i in range(len(words))):
                found.append(f"{line}: builds a `python -m app` command")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "-m app" in node.value:
            found.append(f"{line}: builds a `python -m app` command")
    return found


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("test_*.py")), ids=lambda p: p.name)
def test_cluster_tests_start_processes_only_through_the_launcher(path: Path) -> None:
    if path == Path(__file__).resolve():
        return  # this file names what it forbids
    assert violations(path.read_text(encoding="utf-8")) == [], (
        f"{path.name} starts a process itself: use tests/cluster/nodes.py (its nodes are the manifests')"
    )


def test_the_suite_is_there_and_uses_the_launcher() -> None:
    """An empty glob would prove nothing: the three cluster files exist and start nodes through it."""
    names = {p.name for p in CLUSTER.glob("test_*.py")}
    assert {"test_cross_node.py", "test_shared_state.py", "test_node_loss.py"} <= names
    for name in ("test_cross_node.py", "test_shared_state.py", "test_node_loss.py"):
        assert "from tests.cluster.nodes import" in (CLUSTER / name).read_text(encoding="utf-8"), name
    # And the launcher's processes are the manifests': it reads them and nothing else.
    launcher = (CLUSTER / "nodes.py").read_text(encoding="utf-8")
    assert "load_shape(" in launcher and "local_argv(" in launcher


@pytest.mark.parametrize(
    "source",
    [
        "import subprocess\n",
        "from subprocess import Popen\n",
        "from bench.gateway_process import GatewayProcess\n",
        "from bench.gateway_process import WorkerProcess as W\n",
        "import sys\ncommand = [sys.executable, 'x']\n",
        "argv = ['python', '-m', 'app', 'worker']\n",
        "import os\nos.system('python -m app serve')\n",
        "import asyncio\nasyncio.create_subprocess_exec('x')\n",
        "import multiprocessing\n",
    ],
)
def test_the_check_catches_a_process_built_by_hand(source: str) -> None:
    assert violations(source) != []


def test_the_check_lets_the_launcher_through() -> None:
    source = (
        "from tests.cluster.nodes import Launcher\n"
        "from bench.gateway_process import peak_rss_kib\n"
        "node = Launcher(root, secrets={}).api('a')\n"
        "node.exec('keys', 'revoke', 'k')\n"
    )
    assert violations(source) == []
