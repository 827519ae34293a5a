"""Collapsed stacks (py-spy's ``raw`` format) → a flame graph SVG and self-time tables (issue 25).

py-spy writes one format per recording; recording twice (raw for the tables, SVG for the eye)
would double the time the gateway runs slowed by the sampler, so the SVG is drawn here from the
same stacks the tables come from.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

WIDTH = 1200
ROW = 16
# Frames narrower than this many pixels are left out of the drawing (their time stays in the parent).
MIN_PX = 0.5


@dataclass
class Node:
    name: str
    count: int = 0
    children: dict[str, Node] = field(default_factory=dict)


@dataclass
class Profile:
    """Sample counts per distinct stack, root first."""

    stacks: Counter[tuple[str, ...]]

    @classmethod
    def read(cls, raw: Path) -> Profile:
        stacks: Counter[tuple[str, ...]] = Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks[tuple(stack.split(";"))] += int(count)
        return cls(stacks)

    @property
    def total(self) -> int:
        return sum(self.stacks.values())

    def self_time(self) -> Counter[str]:
        own: Counter[str] = Counter()
        for frames, count in self.stacks.items():
            own[frames[-1]] += count
        return own

    def inclusive(self) -> Counter[str]:
        seen: Counter[str] = Counter()
        for frames, count in self.stacks.items():
            for frame in set(frames):
                seen[frame] += count
        return seen

    def tree(self) -> Node:
        root = Node("all", self.total)
        for frames, count in self.stacks.items():
            node = root
            for frame in frames:
                node = node.children.setdefault(frame, Node(frame))
                node.count += count
        return root


def module_of(frame: str) -> str:
    """``execute (sqlalchemy/engine/base.py:12)`` or ``… (sqlalchemy/engine/base.py)`` →
    ``sqlalchemy.engine.base``; a path py-spy could not shorten keeps its file name only."""
    location = frame.rpartition(" (")[2].rstrip(")")
    path = location.split(":", 1)[0]
    if path.startswith("<"):
        return path
    if path.startswith("/"):
        # Outside every sys.path entry (the standard library of another prefix, a frozen module).
        path = path.rsplit("/lib/python3", 1)[-1].split("/", 1)[-1] if "/lib/python3" in path else path
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def top_table(profile: Profile, top: int = 25) -> str:
    """The ``top`` frames by self time, grouped by module (modules by their summed self time), as
    a Markdown table with each frame's and each module's share of all samples."""
    total = profile.total
    if not total:
        return "no samples"
    own = profile.self_time()
    per_module: Counter[str] = Counter()
    for frame, count in own.items():
        per_module[module_of(frame)] += count
    chosen = own.most_common(top)
    chosen.sort(key=lambda item: (-per_module[module_of(item[0])], -item[1]))
    lines = ["| module (its self share) | frame | self |", "|---|---|---|"]
    last = None
    for frame, count in chosen:
        module = module_of(frame)
        label = f"{module} ({per_module[module] / total:.1%})" if module != last else ""
        last = module
        name = frame.rpartition(" (")[0] or frame
        lines.append(f"| {label} | `{name}` | {count / total:.1%} |")
    return "\n".join(lines)


def package_table(profile: Profile, top: int = 12) -> str:
    """Self time summed per top-level package (``app``, ``sqlalchemy``, ``stdlib``' modules …)."""
    total = profile.total
    packages: Counter[str] = Counter()
    for frame, count in profile.self_time().items():
        packages[module_of(frame).split(".", 1)[0]] += count
    lines = ["| package | self |", "|---|---|"]
    lines += [f"| {name} | {count / total:.1%} |" for name, count in packages.most_common(top)]
    return "\n".join(lines)


def _colour(name: str) -> str:
    digest = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    if "/app/" in name or " (app/" in name:
        return f"rgb({200 + digest % 55},{90 + digest % 60},{40 + digest % 30})"
    return f"rgb({220 + digest % 35},{140 + digest % 90},{30 + digest % 40})"


def flame_svg(profile: Profile, title: str) -> str:
    """A static flame graph (root at the bottom, width = share of samples; hover for the numbers)."""
    root = profile.tree()
    total = max(root.count, 1)
    boxes: list[tuple[float, float, int, Node]] = []

    def place(node: Node, x: float, depth: int) -> None:
        width = node.count / total * WIDTH
        if width < MIN_PX:
            return
        boxes.append((x, width, depth, node))
        child_x = x
        for child in sorted(node.children.values(), key=lambda n: n.name):
            place(child, child_x, depth + 1)
            child_x += child.count / total * WIDTH

    place(root, 0.0, 0)
    height = (max(depth for _, _, depth, _ in boxes) + 3) * ROW
    body = []
    for x, width, depth, node in boxes:
        y = height - (depth + 1) * ROW
        text = ""
        if width > 40:
            chars = int(width / 7)
            short = node.name if len(node.name) <= chars else node.name[: chars - 1] + "…"
            text = f'<text x="{x + 3:.1f}" y="{y + 11}" font-size="11">{html.escape(short)}</text>'
        body.append(
            f"<g><title>{html.escape(node.name)} ({node.count} samples, {node.count / total:.2%})</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{ROW - 1}" '
            f'fill="{_colour(node.name)}"/>{text}</g>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="monospace">'
        f'<text x="4" y="14" font-size="13">{html.escape(title)} — {root.count} samples</text>'
        + "".join(body)
        + "</svg>\n"
    )
