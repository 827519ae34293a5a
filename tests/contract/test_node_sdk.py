"""The official OpenAI Node SDK (npm `openai`, installed by `make test` into tests/node) against
the gateway: streamed partial images, a multi-image edit, a gpt-image-2.5 model at a free size,
and an OpenAI-shaped error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Gateway, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


def test_node_sdk_streams_edits_free_sizes_and_errors(
    gateway_with: Callable[..., Gateway], upstream: FakeOpenAI
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").exists():
        if os.environ.get("CI"):
            pytest.fail("node and tests/node/node_modules are required in CI (make test installs them)")
        pytest.skip("node or the npm openai package is missing; run make test")
    gateway = gateway_with(fake_upstream_config(upstream, models=["*"]))
    key, _ = gateway.create_key(name="node")
    result = subprocess.run(
        [node, str(NODE_DIR / "images.mjs"), gateway.url + "/v1", key],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_DIR,
    )
    assert result.returncode == 0, result.stderr
    stream, edit, free, error = (json.loads(line) for line in result.stdout.splitlines())
    assert [e["type"] for e in stream["stream"]] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [e["index"] for e in stream["stream"][:2]] == [0, 1]
    assert edit == {"edit": 1, "usage": upstream.usage["total_tokens"]}
    (edited,) = [r for r in upstream.requests if r.path == "/v1/images/edits"]
    assert len(edited.files_for("image[]")) == 2
    assert free == {"free": {"size": "1536x864", "quality": "xhigh", "width": 1536, "height": 864}}
    sent = upstream.last.json  # the free-size generation (the error never left the gateway)
    assert sent["model"] == "gpt-image-2.5-flare" and sent["size"] == "1536x864"
    assert sent["complexity"] == "high"
    assert error == {"error": {"status": 400, "code": "empty_string", "param": "prompt"}}
