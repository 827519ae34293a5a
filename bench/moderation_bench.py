"""Time the built-in moderation classifier on long prompts: ``python -m bench.moderation_bench``.

Measures one full check (normalisation + automaton pass + decision, at ``auto``) on prompts of
1k, 8k and 32k characters, built from the benign half of the test corpus (so they hit the
automaton the way real prompts do: many near-misses, few matches), in five flavours: plain ASCII;
look-alike letters, accents and zero-width characters (the Unicode folding, which ends in ASCII);
a non-Latin script (the path that stays Unicode); text dense with list terms (every sentence of the
harmful corpus half); and the worst case, two listed words repeated (a match every five characters,
feeding a co-occurrence rule). Prints a markdown table of µs per call and µs per kB; the goal is well
under 1 ms per kB. ("blocked" is informational: the benign corpus holds a few prompts that the
lists are known to block at ``auto``.) Each figure is the best of ``--rounds`` rounds (as
``timeit`` advises: the fastest round is the one least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from app.moderation.classifier import Classifier
from app.moderation.config import load_policy

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "app" / "defaults" / "moderation.yaml"
CORPUS = ROOT / "tests" / "data" / "moderation_corpus.jsonl"
SIZES = (1_000, 8_000, 32_000)


def _sentences(*, benign: bool) -> list[str]:
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]
    return [row["prompt"] for row in rows if (row["expect"] == "pass") == benign]


def _prompt(sentences: list[str], size: int) -> str:
    parts: list[str] = []
    total = 0
    index = 0
    while total < size + 2:  # the last sentence has no ". " after it
        sentence = sentences[index % len(sentences)]
        parts.append(sentence)
        total += len(sentence) + 2
        index += 1
    return ". ".join(parts)[:size]


def _time(call: Callable[[], object], repetitions: int, rounds: int) -> float:
    """Seconds per call in the fastest of ``rounds`` rounds of ``repetitions`` calls."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repetitions):
            call()
        samples.append((time.perf_counter() - start) / repetitions)
    return min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget-ms", type=float, default=200.0, help="time per round and prompt")
    args = parser.parse_args()

    started = time.perf_counter()
    classifier = Classifier(load_policy(POLICY))
    build_ms = (time.perf_counter() - started) * 1000

    benign = _sentences(benign=True)
    ascii_only = [s for s in benign if s.isascii()]
    unicode_heavy = [s.replace("a", "\u0430", 1) + " \u00e9t\u00e9 \u200b" for s in ascii_only]
    flavours = {
        "ascii": ascii_only,
        "look-alikes, accents, zero-width": unicode_heavy,
        "non-Latin (CJK)": ["一只猫在花园里睡觉", "窗外下着雨", "a cat 在 Paris"],
        "dense matches": _sentences(benign=False),
        "one listed word repeated": ["kids naked"],
    }
    print(f"classifier: {classifier.size} phrases, compiled in {build_ms:.1f} ms\n")
    print("| prompt | chars | µs per call | µs per kB | blocked at auto |")
    print("|---|---:|---:|---:|---|")
    for flavour, sentences in flavours.items():
        for size in SIZES:
            prompt = _prompt(sentences, size)
            verdict = classifier.classify(prompt, "auto")
            once = _time(lambda p=prompt: classifier.classify(p, "auto"), 1, 3)
            repetitions = max(1, int(args.budget_ms / 1000 / max(once, 1e-7)))
            per_call = _time(lambda p=prompt: classifier.classify(p, "auto"), repetitions, args.rounds)
            micros = per_call * 1e6
            print(
                f"| {flavour} | {len(prompt):,} | {micros:,.0f} | {micros / (len(prompt) / 1000):,.1f} "
                f"| {'yes' if verdict.blocked else 'no'} |"
            )


if __name__ == "__main__":
    main()
