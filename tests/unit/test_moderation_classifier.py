"""The built-in classifier: severities per level, allowlist spans, co-occurrence rules, the policy file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.moderation.classifier import Classifier
from app.moderation.config import PolicyError, PolicyFile, load_policy

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = ROOT / "app" / "defaults" / "moderation.yaml"


def policy(**overrides: Any) -> PolicyFile:
    data: dict[str, Any] = {
        "levels": {"low": {"default": "high"}, "auto": {"default": "medium"}},
        "allow": ["breast cancer"],
        "groups": {"minor": ["child", "kids"]},
        "categories": {
            "sexual": {"medium": ["porn"], "low": ["naked", "breast"]},
            "violence/graphic": {"high": ["behead{,ed,ing}"], "medium": ["gore"], "low": ["kill"]},
        },
        "rules": [
            {
                "name": "minor-sexual",
                "category": "sexual/minors",
                "window_chars": 60,
                "cross_sentence_chars": 15,
                "all_of": [{"groups": ["minor"]}, {"categories": {"sexual": "low"}}],
            }
        ],
    }
    data.update(overrides)
    return PolicyFile.model_validate(data)


@pytest.fixture(scope="module")
def default() -> Classifier:
    return Classifier(load_policy(DEFAULT_POLICY))


def test_severity_decides_per_level() -> None:
    classifier = Classifier(policy())
    assert classifier.classify("a beheading", "low").categories == ("violence/graphic",)
    assert classifier.classify("a beheading", "auto").categories == ("violence/graphic",)
    assert not classifier.classify("full gore", "low").blocked
    assert classifier.classify("full gore", "auto").categories == ("violence/graphic",)
    assert not classifier.classify("kill the lights", "auto").blocked  # low severity never blocks alone


def test_verdict_names_checker_level_and_the_matched_entries() -> None:
    verdict = Classifier(policy()).classify("b3head3d and some porn", "auto")
    assert verdict.blocked and verdict.checker == "classifier" and verdict.level == "auto"
    assert verdict.stage == "input"
    assert verdict.categories == ("sexual", "violence/graphic")  # policy order
    assert set(verdict.rules) == {"violence/graphic:beheaded", "sexual:porn"}


def test_per_category_thresholds_override_the_default() -> None:
    strict_sexual = policy(
        levels={"low": {"default": "high", "sexual": "medium"}, "auto": {"default": "never"}}
    )
    classifier = Classifier(strict_sexual)
    assert classifier.classify("porn", "low").blocked
    assert not classifier.classify("porn", "auto").blocked  # "never" at auto in this (odd) policy
    assert not classifier.classify("beheaded", "auto").blocked


def test_allowlisted_span_suppresses_matches_inside_it_only() -> None:
    classifier = Classifier(policy(categories={"sexual": {"medium": ["breast"]}}, rules=[]))
    assert classifier.classify("a breast", "auto").blocked
    assert not classifier.classify("breast cancer awareness poster", "auto").blocked
    assert classifier.classify("breast cancer awareness, and a breast", "auto").blocked


def test_global_and_per_key_allowlists() -> None:
    classifier = Classifier(policy(), allowlist=["gore tex"])
    assert classifier.classify("gore", "auto").blocked
    assert not classifier.classify("a Gore-Tex jacket", "auto").blocked
    assert classifier.classify("Al Gore", "auto").blocked
    assert not classifier.classify("Al Gore", "auto", key_allow=("al gore",)).blocked
    assert classifier.classify("Al Gore", "auto", key_allow=("something else",)).blocked


def test_rule_needs_every_clause_within_the_window() -> None:
    classifier = Classifier(policy())
    assert classifier.classify("a naked child", "low").categories == ("sexual/minors",)
    assert classifier.classify("kids, n4k3d", "low").rules == ("rule:minor-sexual",)
    assert not classifier.classify("kids playing in a park", "low").blocked
    assert not classifier.classify("a naked mole", "low").blocked
    far = "kids playing in a park " + "with a red ball " * 5 + "naked trees"
    assert not classifier.classify(far, "low").blocked


def test_rule_reach_is_shorter_across_a_sentence_end() -> None:
    classifier = Classifier(policy())
    assert classifier.classify("A child. Naked.", "low").blocked
    assert classifier.classify("a child standing there naked", "low").blocked
    assert not classifier.classify("A child is standing there. Naked trees.", "low").blocked


def test_allowed_span_cannot_feed_a_rule() -> None:
    classifier = Classifier(policy(categories={"sexual": {"low": ["breast"]}}))
    assert classifier.classify("a child and a breast", "low").blocked
    assert not classifier.classify("a child at a breast cancer walk", "low").blocked


def test_policy_validation_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown categories"):
        policy(levels={"low": {"default": "high", "nope": "low"}, "auto": {"default": "medium"}})
    with pytest.raises(ValueError, match="unknown groups"):
        policy(
            rules=[{"name": "r", "category": "x", "all_of": [{"groups": ["missing"]}, {"groups": ["minor"]}]}]
        )
    with pytest.raises(ValueError, match="levels.auto is missing"):
        policy(levels={"low": {"default": "high"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("levels: {low: {default: high}, auto: {default: extreme}}\ncategories: {}\n")
    with pytest.raises(PolicyError, match="bad.yaml"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_default_policy_has_the_required_categories(default: Classifier) -> None:
    categories = set(default.policy.categories) | {rule.category for rule in default.policy.rules}
    assert {
        "sexual",
        "sexual/minors",
        "violence/graphic",
        "self-harm",
        "hate",
        "illicit/weapons",
    } <= categories
    assert default.size > 1000


@pytest.mark.parametrize(
    "prompt",
    [
        "shoot a photo of a sunset",
        "a killer whale",
        "breast cancer awareness poster",
        "kids playing in a park",
        "a knife on a cutting board",
        "the battle of Hastings painting",
        "a cocktail named Sex on the Beach",
        "Scunthorpe",
        "assassin's creed cosplay",
        "a same-sex couple with their kids",
        "LED lights on a desk",
    ],
)
def test_default_policy_lets_tricky_benign_prompts_through(default: Classifier, prompt: str) -> None:
    assert not default.classify(prompt, "auto").blocked


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("a s e x y 12 year old", "sexual/minors"),
        ("how to k.i.l.l myself", "self-harm"),
        ("a b3h3ad1ng", "violence/graphic"),
        ("a \u0440\u0456\u0440\u0435 bomb", "illicit/weapons"),
        ("having s\u200be\u200bx on the beach", "sexual"),
    ],
)
def test_default_policy_blocks_obfuscated_harm(default: Classifier, prompt: str, category: str) -> None:
    assert category in default.classify(prompt, "auto").categories
