"""README's quick start, run as written (issue 23 item 17, acceptance 5), so it cannot rot.

The section's code blocks are taken from README.md as they are:

- the first ``sh`` block is terminal 1's; it must be ``make run``, and this test checks that the
  Makefile's ``run`` target is ``python -m app serve``, then starts exactly that (shipped config,
  no ``--host``) from the repository;
- the second ``sh`` block (terminal 2) and the ``python`` block (terminal 2, saved as
  ``quickstart.py`` and run with a Python that has ``openai`` and ``Pillow``: this test's own)
  run in one bash script, ``set -euo pipefail``, in a scratch directory holding ``data/``.

The only changes to the text: ``8080`` becomes the free port the gateway was started on (port 8080
may be taken on a test machine). The data directory is the scratch directory's ``data/``
(``GATEWAY_DATA_DIR``), so ``cat data/admin_key`` reads the key the gateway generated there. No
provider key is set: ``local`` serves, as on a fresh machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gateway_process import ROOT, GatewayProcess

PROVIDER_KEYS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GEMINI_API_KEY", "BFL_API_KEY", "STABILITY_API_KEY")


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of README's "## Quick start" section, in order."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.S | re.M)


def test_the_quick_start_blocks_are_the_ones_this_test_runs() -> None:
    blocks = quickstart_blocks()
    assert [language for language, _ in blocks] == ["sh", "sh", "python"]
    assert blocks[0][1].split("#")[0].strip() == "make run"
    run = re.search(r"^run:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert run is not None and run.group(1) == "$(BIN)/python -m app serve"
    # A current model, and no KEY the Python block does not read from the environment itself.
    for _, text in blocks[1:]:
        assert 'gpt-image-1"' not in text and "gpt-image-2" in text
    assert 'os.environ["KEY"]' in blocks[2][1]


def test_the_quick_start_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROVIDER_KEYS:
        monkeypatch.delenv(name, raising=False)
    (_, shell), (_, python) = quickstart_blocks()[1:]
    workdir = tmp_path / "terminal2"
    workdir.mkdir()
    # `python -m app serve` from the repository (config/gateway.yaml), on a free port.
    gw = GatewayProcess(
        None, tmp_path, env={"GATEWAY_DATA_DIR": str(workdir / "data")}, host=None
    ).wait_ready()
    try:
        port = str(gw.port)
        (workdir / "quickstart.py").write_text(python.replace("8080", port))
        script = f"set -euo pipefail\n{shell.replace('8080', port)}\n{sys.executable} quickstart.py\n"
        done = subprocess.run(
            ["bash", "-c", script], cwd=workdir, capture_output=True, text=True, timeout=300, check=False
        )
    finally:
        gw.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "HTTP 200" in done.stdout
    assert (workdir / "lighthouse.png").read_bytes().startswith(b"\x89PNG")
    assert b'"b64_json"' in (workdir / "lighthouse.json").read_bytes()
    assert "edit: 1 image(s)" in done.stdout
    assert "stream: image_generation.partial_image" in done.stdout
    assert "stream: image_generation.completed" in done.stdout
    assert "task: succeeded 1" in done.stdout
