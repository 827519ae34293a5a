"""One module owns a stream's end (issue 28): ``ImageStream.ending`` in app/images/relay.py.

The SSE writer and a task's streamed run only read the stream's events inside ``ending()``; the
connection's close and the settlement are the stream's own, so neither consumer can settle twice,
forget to settle, or settle outside the cancellation shield.
"""

from __future__ import annotations

import ast
from pathlib import Path

from app.images.relay import ImageStream

APP = Path(__file__).resolve().parents[2] / "app"
OWNER = APP / "images" / "relay.py"
CONSUMERS = {APP / "api" / "streaming.py", APP / "tasks" / "progress.py"}


def test_a_stream_can_only_be_ended_through_ending() -> None:
    public = {name for name in dir(ImageStream) if not name.startswith("_")}
    assert "ending" in public
    assert not {"settle", "close", "aclose"} & public


def test_no_module_but_the_relay_closes_or_settles_a_stream() -> None:
    touched: list[str] = []
    enders: set[Path] = set()
    for path in APP.rglob("*.py"):
        if path == OWNER:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Attribute):
                continue
            # Other classes (the ledger, the health checks) have a ``_settle`` or ``_close`` of their
            # own; a stream's is reached through a name that says so (``stream``, ``opened``...).
            receiver = ast.unparse(node.value)
            if node.attr in {"_settle", "_close"} and "stream" in receiver.lower():
                touched.append(f"{path.relative_to(APP)}:{node.lineno} {receiver}.{node.attr}")
            if node.attr == "ending":
                enders.add(path)
    assert touched == []
    # Both consumers go through the owner; nobody else ends a stream.
    assert enders == CONSUMERS


def test_the_consumers_hold_no_shield_of_their_own() -> None:
    # The shielded close-and-settle lives in the owner; a consumer with its own would be a second
    # place where a stream's end is decided.
    for path in CONSUMERS:
        assert "CancelScope" not in path.read_text(encoding="utf-8"), path
    assert "CancelScope(shield=True)" in OWNER.read_text(encoding="utf-8")
