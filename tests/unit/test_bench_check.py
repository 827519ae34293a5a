"""`make bench-check`'s comparison (bench/check.py) with made-up runs: no timing involved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import check


def cell(group: str, row: str, target: str, rps: float, p50_ms: float, errors: int = 0) -> dict[str, Any]:
    return {
        "group": group,
        "row": row,
        "target": target,
        "result": {"requests": int(rps * 10), "duration_s": 10.0, "p50_ms": p50_ms, "errors": errors},
    }


def run(gateway_rps: float, gateway_p50: float) -> dict[str, Any]:
    return {
        "cells": [
            cell("1. small answers", "c=16", "direct", 40_000, 0.4),
            cell("1. small answers", "c=16", "litellm", 100, 10.0),
            cell("1. small answers", "c=16", "gateway", gateway_rps, gateway_p50),
            cell("1. small answers", "c=16", "nginx", 30_000, 0.5),
        ]
    }


def test_ratios_are_oriented_so_that_higher_is_better() -> None:
    found = check.ratios(run(1_000, 2.0))
    assert found == pytest.approx(
        {
            "1. small answers | c=16 | req/s vs direct": 1_000 / 40_000,
            "1. small answers | c=16 | p50 vs direct": 0.4 / 2.0,
            "1. small answers | c=16 | req/s vs litellm": 10.0,
            "1. small answers | c=16 | p50 vs litellm": 5.0,
        }
    )


def test_a_cell_with_errors_or_no_peer_gives_no_ratio() -> None:
    latest = run(1_000, 2.0)
    latest["cells"][1]["result"]["errors"] = 3  # LiteLLM failed some requests
    latest["cells"].append(cell("2. large answers", "n=4, c=1", "gateway", 50, 20.0))
    assert set(check.ratios(latest)) == {
        "1. small answers | c=16 | req/s vs direct",
        "1. small answers | c=16 | p50 vs direct",
    }


@pytest.mark.parametrize(
    ("gateway_rps", "passes"),
    [(1_000, True), (810, True), (790, False), (3_000, True)],
)
def test_a_drop_beyond_20_percent_fails(gateway_rps: float, passes: bool) -> None:
    baseline = check.ratios(run(1_000, 2.0))
    verdicts = check.compare(baseline, check.ratios(run(gateway_rps, 2.0)))
    _, passed = check.report(verdicts)
    assert passed is passes
    assert {v.key for v in verdicts if v.failed} == (
        set()
        if passes
        else {"1. small answers | c=16 | req/s vs direct", "1. small answers | c=16 | req/s vs litellm"}
    )


def test_a_run_that_measured_none_of_the_baseline_fails() -> None:
    baseline = {"2. large answers | 1 image, c=1 | req/s vs direct": 0.5}
    text, passed = check.report(check.compare(baseline, check.ratios(run(1_000, 2.0))))
    assert not passed and "not measured" in text


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    latest, baseline = tmp_path / "latest.json", tmp_path / "baseline.json"
    assert check.main(["--latest", str(latest), "--baseline", str(baseline)]) == 2
    latest.write_text(json.dumps(run(1_000, 2.0)))
    assert check.main(["--latest", str(latest), "--baseline", str(baseline), "--write-baseline"]) == 0
    assert check.main(["--latest", str(latest), "--baseline", str(baseline)]) == 0
    latest.write_text(json.dumps(run(1_000, 3.0)))  # latency up 50%: p50 ratios down by a third
    assert check.main(["--latest", str(latest), "--baseline", str(baseline)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_profile_tables_group_self_time_by_module(tmp_path: Path) -> None:
    from bench.flame import Profile, flame_svg, module_of, top_table

    raw = tmp_path / "stacks.txt"
    raw.write_text(
        "run (asyncio/runners.py);handle (fastapi/routing.py);execute (sqlalchemy/engine/base.py) 6\n"
        "run (asyncio/runners.py);handle (fastapi/routing.py) 3\n"
        "run (asyncio/runners.py);admit (app/images/service.py);solve (fastapi/routing.py) 1\n"
    )
    profile = Profile.read(raw)
    assert profile.total == 10
    assert module_of("execute (sqlalchemy/engine/base.py)") == "sqlalchemy.engine.base"
    assert module_of("f (app/api/__init__.py:12)") == "app.api"
    rows = [line for line in top_table(profile).splitlines()[2:]]
    # The module with the most self time first, its frames by their own share.
    assert rows[0] == "| sqlalchemy.engine.base (60.0%) | `execute` | 60.0% |"
    assert rows[1] == "| fastapi.routing (40.0%) | `handle` | 30.0% |"
    assert rows[2] == "|  | `solve` | 10.0% |"
    svg = flame_svg(profile, "test")
    assert svg.startswith("<svg") and "execute (sqlalchemy/engine/base.py) (6 samples, 60.00%)" in svg
