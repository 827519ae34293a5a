"""`make run` installs the runtime only; `make test` (through lint) adds the dev extras to the same
venv, even after `make run` (issue 23 item 18). Read from `make -n` in a scratch copy, so nothing
is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.gateway_process import ROOT


def dry_run(workdir: Path, target: str) -> list[str]:
    # Run inside `make test`, a sub-make would print "Entering/Leaving directory" lines (MAKELEVEL
    # and MAKEFLAGS are inherited): this dry run is a top-level make of its own.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return done.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_run_installs_the_runtime_and_test_then_adds_the_dev_extras(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    run = dry_run(tmp_path, "run")
    installs = [line for line in run if "pip install" in line and "--upgrade pip" not in line]
    assert installs == [".venv/bin/python -m pip install -q -e ."]
    assert run[-1] == ".venv/bin/python -m app serve"
    # After `make run` (its stamp made), lint and test still install the dev extras.
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed-runtime").touch()
    assert ".venv/bin/python -m pip install -q -e '.[dev]'" in dry_run(tmp_path, "lint")
    # After the dev install, `make run` has nothing to install.
    (tmp_path / ".venv" / ".installed-dev").touch()
    (tmp_path / ".venv" / ".installed-runtime").touch()
    assert dry_run(tmp_path, "run") == [".venv/bin/python -m app serve"]
