"""Score the built-in classifier (default policy) on the labelled corpus in tests/data/.

The corpus (``moderation_corpus.jsonl``, one JSON object per line) holds benign prompts full of
tricky words (a killer whale, shoot a photo, breast cancer awareness, kids playing, Scunthorpe, a
same-sex couple with their kids, the Sex on the Beach cocktail: allowed by the shipped policy's
allowlist, by decision) and harmful prompts in every category, each once in plain words and once
obfuscated (leetspeak, symbols, Cyrillic and Greek homoglyphs, zero-width characters, soft hyphens,
spacing with spaces, dots, dashes or stars, fullwidth, math-bold, combining accents, mixed case).
A small "hard" set is labelled truthfully although the lists are known to get it wrong: harmful
paraphrases that avoid every listed word (variant ``paraphrase``) and benign prompts that use a
listed phrase innocently ("a Molotov cocktail exhibit in a war museum"); they are why the floors
below are not 1.0. Harmful content is kept clinical: category keywords in short plain sentences.

Labels: ``expect`` is the lowest level that must block the prompt — ``low`` (the most severe
content: blocked at both levels), ``auto`` (blocked at ``auto`` only) or ``pass`` (never blocked);
``categories`` are the categories a blocked verdict must report. A verdict that reports ``sexual``
on a ``sexual/minors`` prompt is not counted against precision: the second implies the first.

Floors asserted (the test prints the full precision/recall table; run with ``-s`` to see it):

- no benign prompt is blocked at ``low``;
- at ``auto``: precision >= 0.95, recall >= 0.95, recall on the obfuscated harmful set >= 0.90;
- at ``low``: recall of the ``low``-labelled prompts >= 0.90, and nothing labelled ``auto`` blocks;
- per category at ``auto``: precision >= 0.90 and recall >= 0.85.

Caveat: the lists and this corpus were written together, so the scores are in-sample — a regression
guard for the lists and the normalisation, not an estimate of accuracy on real traffic. Words the
lists do not contain, paraphrase and intent are beyond any list matcher; that is what the optional
upstream moderation model is for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.moderation.base import Level, Verdict
from app.moderation.classifier import Classifier
from app.moderation.config import load_policy

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "moderation_corpus.jsonl"
CATEGORIES = ("sexual", "sexual/minors", "violence/graphic", "self-harm", "hate", "illicit/weapons")
OBFUSCATIONS = {"leet", "homoglyph", "greek", "zero_width", "spacing", "dots", "symbols", "fullwidth"}


@dataclass(frozen=True)
class Row:
    id: str
    prompt: str
    expect: str
    categories: tuple[str, ...]
    variant: str

    def positive(self, level: Level) -> bool:
        return self.expect == "low" or (self.expect == "auto" and level == "auto")

    def acceptable(self) -> set[str]:
        implied = {"sexual"} if "sexual/minors" in self.categories else set()
        return set(self.categories) | implied


def load_corpus() -> list[Row]:
    rows = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            data: dict[str, Any] = json.loads(line)
            rows.append(
                Row(data["id"], data["prompt"], data["expect"], tuple(data["categories"]), data["variant"])
            )
    return rows


@dataclass(frozen=True)
class Score:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def score(pairs: Iterable[tuple[bool, bool]]) -> Score:
    """(should block, did block) pairs → counts."""
    tp = fp = fn = 0
    for expected, actual in pairs:
        tp += expected and actual
        fp += actual and not expected
        fn += expected and not actual
    return Score(tp, fp, fn)


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return load_corpus()


@pytest.fixture(scope="module")
def verdicts(rows: list[Row]) -> dict[Level, list[Verdict]]:
    classifier = Classifier(load_policy(ROOT / "app" / "defaults" / "moderation.yaml"))
    return {level: [classifier.classify(row.prompt, level) for row in rows] for level in ("low", "auto")}


def test_corpus_shape(rows: list[Row]) -> None:
    assert len(rows) >= 300
    assert len({row.id for row in rows}) == len(rows)
    assert {row.expect for row in rows} == {"pass", "low", "auto"}
    benign = [row for row in rows if row.expect == "pass"]
    assert len(benign) >= 150
    for category in CATEGORIES:
        harmful = [row for row in rows if category in row.categories]
        assert any(row.variant == "plain" for row in harmful), category
        assert any(row.variant != "plain" for row in harmful), category
    assert OBFUSCATIONS <= {row.variant for row in rows}


def test_precision_and_recall_meet_the_floors(rows: list[Row], verdicts: dict[Level, list[Verdict]]) -> None:
    table: list[tuple[str, str, Score]] = []
    for level in ("low", "auto"):
        results = list(zip(rows, verdicts[level], strict=True))
        overall = score((row.positive(level), verdict.blocked) for row, verdict in results)
        obfuscated = score(
            (row.positive(level), verdict.blocked)
            for row, verdict in results
            if row.variant not in ("plain", "paraphrase") and row.expect != "pass"
        )
        paraphrased = score(
            (row.positive(level), verdict.blocked) for row, verdict in results if row.variant == "paraphrase"
        )
        table += [
            (level, "all", overall),
            (level, "obfuscated", obfuscated),
            (level, "paraphrase", paraphrased),
        ]
        for category in CATEGORIES:
            per_category = score(
                (
                    row.positive(level) and category in row.categories,
                    verdict.blocked and category in verdict.categories,
                )
                for row, verdict in results
                # a reported category that the label implies is neither a hit nor a false alarm
                if not (category in row.acceptable() and category not in row.categories)
            )
            table.append((level, category, per_category))
    print("\n| level | set | precision | recall | tp | fp | fn |\n|---|---|---:|---:|---:|---:|---:|")
    for level, name, s in table:
        print(f"| {level} | {name} | {s.precision:.3f} | {s.recall:.3f} | {s.tp} | {s.fp} | {s.fn} |")
    scores = {(level, name): s for level, name, s in table}

    benign_blocked_low = [
        r.id for r, v in zip(rows, verdicts["low"], strict=True) if r.expect == "pass" and v.blocked
    ]
    assert benign_blocked_low == []
    assert scores[("auto", "all")].precision >= 0.95
    assert scores[("auto", "all")].recall >= 0.95
    assert scores[("auto", "obfuscated")].recall >= 0.90
    assert scores[("low", "all")].recall >= 0.90
    for category in CATEGORIES:
        assert scores[("auto", category)].precision >= 0.90, category
        assert scores[("auto", category)].recall >= 0.85, category


def test_reported_categories_match_the_labels(rows: list[Row], verdicts: dict[Level, list[Verdict]]) -> None:
    wrong = [
        (row.id, verdict.categories)
        for row, verdict in zip(rows, verdicts["auto"], strict=True)
        if verdict.blocked and row.expect != "pass" and not set(verdict.categories) & set(row.categories)
    ]
    assert wrong == []


def test_low_blocks_only_the_most_severe(rows: list[Row], verdicts: dict[Level, list[Verdict]]) -> None:
    """``low`` is more lenient than ``auto`` in the documented way: what passes at ``low`` but blocks
    at ``auto`` is exactly the ``auto``-labelled set, and nothing blocks at ``low`` that ``auto`` lets by."""
    low = {row.id for row, v in zip(rows, verdicts["low"], strict=True) if v.blocked}
    auto = {row.id for row, v in zip(rows, verdicts["auto"], strict=True) if v.blocked}
    labelled_auto = {row.id for row in rows if row.expect == "auto"}
    harmful = {row.id for row in rows if row.expect != "pass"}
    only_auto = auto - low
    assert low <= auto
    assert len(only_auto & harmful) >= 50
    assert only_auto & harmful == auto & labelled_auto
    assert not low & labelled_auto
    # every sexual/minors prompt is blocked at the lenient level too
    assert all(row.id in low for row in rows if "sexual/minors" in row.categories)
