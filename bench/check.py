"""``python -m bench.check`` (``make bench-check``): has the gateway fallen behind its peers? (issue 25)

``make bench`` writes bench/results/latest.json; this compares the gateway's ratios to LiteLLM and
to the direct path in that run with the committed bench/baseline.json, and fails when any of them
dropped by more than 20%. Ratios, not absolute figures: the peers ran on the same machine at the
same time, so a busier or slower machine moves them together and the ratio stays put.

Every ratio is oriented so that higher is better for the gateway:
- ``req/s``: the gateway's requests per second over the peer's;
- ``p50``: the peer's median latency over the gateway's.

``--write-baseline`` replaces the baseline with the ratios of latest.json (after a run worth keeping).
Timing does not belong in unit tests, so this is not part of ``make test``; tests/unit covers the
comparison itself with made-up figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.servers import ROOT

LATEST = ROOT / "bench" / "results" / "latest.json"
BASELINE = ROOT / "bench" / "baseline.json"
PEERS = ("direct", "litellm")
TOLERANCE = 0.20


def ratios(latest: Mapping[str, Any]) -> dict[str, float]:
    """``{"<group> | <row> | <metric> vs <peer>": ratio}`` for every row where the gateway and a
    peer both have an error-free measurement."""
    rows: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for cell in latest.get("cells", []):
        result = cell.get("result")
        if not result or result.get("errors") or not result.get("requests") or not result.get("duration_s"):
            continue
        rows.setdefault((cell["group"], cell["row"]), {})[cell["target"]] = result
    found: dict[str, float] = {}
    for (group, row), by_target in rows.items():
        gateway = by_target.get("gateway")
        if gateway is None:
            continue
        for peer in PEERS:
            other = by_target.get(peer)
            if other is None:
                continue
            found[f"{group} | {row} | req/s vs {peer}"] = _rps(gateway) / _rps(other)
            if gateway.get("p50_ms", 0) > 0 and other.get("p50_ms", 0) > 0:
                found[f"{group} | {row} | p50 vs {peer}"] = other["p50_ms"] / gateway["p50_ms"]
    return found


def _rps(result: Mapping[str, Any]) -> float:
    return float(result["requests"]) / float(result["duration_s"])


@dataclass(frozen=True)
class Verdict:
    key: str
    baseline: float
    current: float | None

    @property
    def change(self) -> float | None:
        return None if self.current is None else self.current / self.baseline - 1

    @property
    def failed(self) -> bool:
        return self.change is not None and self.change < -TOLERANCE


def compare(baseline: Mapping[str, float], current: Mapping[str, float]) -> list[Verdict]:
    return [Verdict(key, value, current.get(key)) for key, value in sorted(baseline.items()) if value > 0]


def report(verdicts: list[Verdict]) -> tuple[str, bool]:
    """The comparison as text, and whether it passes: no ratio down by more than 20%, and at
    least one ratio of the baseline measured (a run that measured nothing proves nothing)."""
    lines = []
    for v in verdicts:
        if v.current is None:
            lines.append(f"  not measured  {v.key} (baseline {v.baseline:.4g})")
            continue
        mark = "FAIL" if v.failed else "ok  "
        lines.append(f"  {mark} {v.change:+7.1%}  {v.key}: {v.baseline:.4g} → {v.current:.4g}")
    measured = [v for v in verdicts if v.current is not None]
    passed = bool(measured) and not any(v.failed for v in measured)
    if not measured:
        lines.append("  no ratio of the baseline was measured in this run")
    return "\n".join(lines), passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__.splitlines()[0])
    parser.add_argument("--latest", type=Path, default=LATEST)
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--write-baseline", action="store_true")
    args = parser.parse_args(argv)
    if not args.latest.exists():
        print(f"{args.latest} is missing: run `make bench` first", file=sys.stderr)
        return 2
    current = ratios(json.loads(args.latest.read_text()))
    if args.write_baseline:
        source = f"ratios of {args.latest.name}, written by python -m bench.check --write-baseline"
        args.baseline.write_text(json.dumps({"source": source, "ratios": current}, indent=1) + "\n")
        print(f"{args.baseline} rewritten with {len(current)} ratios")
        return 0
    baseline = json.loads(args.baseline.read_text())
    text, passed = report(compare(baseline["ratios"], current))
    print(f"gateway ratios vs the baseline ({baseline.get('source', '?')}); fails below -{TOLERANCE:.0%}:")
    print(text)
    print("bench-check: " + ("passed" if passed else "FAILED"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
