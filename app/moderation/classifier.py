"""The built-in text classifier: category word/phrase lists with per-entry severity, plus
co-occurrence rules, matched in one automaton pass over the normalised prompt.

Decision per level: an entry blocks when its severity reaches the level's threshold for its
category (``levels`` in the policy file: by default ``low`` blocks ``high`` entries only, ``auto``
blocks ``medium`` and ``high``; ``low``-severity entries never block alone and serve as context).
A rule blocks its category when one match of each of its clauses lies within ``window_chars`` of
the others, e.g. ``sexual/minors`` = a term that denotes a minor near a sexualising term. Matches
inside an allowed span (the policy's ``allow`` list, the operator's global and per-key allowlists)
are dropped before either decision, so "breast cancer awareness" cannot feed a rule.

It is a list matcher, not a language model: it cannot tell "how to kill a process" from a threat
if both are listed. The lists therefore hold phrases rather than bare ambiguous words, and the
upstream model is the place for judgement.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from app.moderation.base import LEVELS, SEVERITY_RANK, CheckerName, Level, Severity, TextInput, Verdict
from app.moderation.config import PolicyFile, RuleClause, RuleSpec, Threshold
from app.moderation.lists import Hit, PhraseMatcher, Spans, TermCache, expand_braces
from app.moderation.normalize import SENTENCE, NormalizedText, normalize

_NEVER = 99


def _rank(threshold: Threshold | Severity) -> int:
    return SEVERITY_RANK.get(threshold, _NEVER)


# eq=False: entries are compared and hashed by identity, which keeps the per-match set lookups in
# ``classify`` cheap (a field-wise hash of a frozen dataclass costs more than the match itself).
@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    """What a list phrase means: a category term with its severity, a rule-group term, or an
    allowed phrase. ``term`` is the expanded phrase from the policy (the audit identifier)."""

    kind: Literal["term", "group", "allow"]
    name: str
    term: str
    severity: Severity = "low"


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    spec: RuleSpec
    clauses: tuple[frozenset[Entry], ...]  # the entries that satisfy each clause
    active: frozenset[Level]  # the levels at which the rule's severity blocks


def _sentence_ends(text: str) -> list[int]:
    ends, index = [], text.find(SENTENCE)
    while index != -1:
        ends.append(index)
        index = text.find(SENTENCE, index + 1)
    return ends


def _co_occur(positions: Sequence[Sequence[int]], rule: RuleSpec, sentence_ends: Sequence[int]) -> bool:
    """True when one position from every list fits in ``rule.window_chars``, or in
    ``rule.cross_sentence_chars`` if a sentence ends between them. Sliding window over the merged,
    sorted positions: every minimal covering window is checked once, O(n log n)."""
    merged = sorted((pos, index) for index, plist in enumerate(positions) for pos in plist)
    counts = [0] * len(positions)
    covered = left = 0
    for pos, index in merged:
        counts[index] += 1
        covered += counts[index] == 1
        while covered == len(positions):
            first, first_index = merged[left]
            crosses = bisect.bisect_left(sentence_ends, first) != bisect.bisect_left(sentence_ends, pos)
            if pos - first <= (rule.cross_sentence_chars if crosses else rule.window_chars):
                return True
            counts[first_index] -= 1
            covered -= counts[first_index] == 0
            left += 1
    return False


class Classifier:
    """Compiled once from the policy file (and the operator's global allowlist) at start."""

    name: CheckerName = "classifier"

    def __init__(
        self, policy: PolicyFile, *, allowlist: Iterable[str] = (), cache: TermCache | None = None
    ) -> None:
        self.policy = policy
        self._cache = cache or TermCache()
        entries: list[tuple[str, Entry]] = []
        for category, terms in policy.categories.items():
            for severity, words in terms.by_severity():
                entries += [(term, Entry("term", category, term, severity)) for term in _expanded(words)]
        for group, words in policy.groups.items():
            entries += [(term, Entry("group", group, term)) for term in _expanded(words)]
        entries += [(phrase, Entry("allow", "allow", phrase)) for phrase in [*policy.allow, *allowlist]]
        self._matcher = PhraseMatcher(entries)
        # Everything that depends only on the policy is decided here, once, not per match.
        term_entries = [entry for _, entry in entries if entry.kind == "term"]
        self._blocking: dict[Level, frozenset[Entry]] = {
            level: frozenset(
                e for e in term_entries if _rank(e.severity) >= _rank(policy.threshold(level, e.name))
            )
            for level in LEVELS
        }
        self._rules = [
            _CompiledRule(
                spec=rule,
                clauses=tuple(frozenset(e for _, e in entries if _satisfies(c, e)) for c in rule.all_of),
                active=frozenset(
                    level
                    for level in LEVELS
                    if _rank(rule.severity) >= _rank(policy.threshold(level, rule.category))
                ),
            )
            for rule in policy.rules
        ]
        order = [*policy.categories, *(rule.category for rule in policy.rules)]
        self._order = {category: index for index, category in enumerate(dict.fromkeys(order))}

    @property
    def size(self) -> int:
        """Distinct normalised phrases in the automaton."""
        return self._matcher.size

    async def check_text(self, request: TextInput) -> Verdict:
        return self.classify(request.text, request.level, key_allow=request.key_allow)

    def classify(
        self, text: NormalizedText | str, level: Level, *, key_allow: tuple[str, ...] = ()
    ) -> Verdict:
        normalized = normalize(text) if isinstance(text, str) else text
        found = self._evidence(normalized, key_allow)
        blocked: dict[str, None] = {}
        rules: dict[str, None] = {}
        blocking = self._blocking[level]
        for _, entry in found:
            if entry in blocking:
                blocked[entry.name] = None
                rules[f"{entry.name}:{entry.term}"] = None
        for rule in self._rules:
            if level in rule.active and self._fires(rule, found, normalized):
                blocked[rule.spec.category] = None
                rules[f"rule:{rule.spec.name}"] = None
        if not blocked:
            return Verdict.allow(level, checker=self.name)
        categories = tuple(sorted(blocked, key=lambda c: self._order.get(c, len(self._order))))
        return Verdict(
            blocked=True, level=level, categories=categories, checker=self.name, rules=tuple(rules)
        )

    def _evidence(self, text: NormalizedText, key_allow: tuple[str, ...]) -> list[tuple[int, Entry]]:
        """(start, entry) for every match not inside an allowed span."""
        hits: list[Hit[Entry]] = self._matcher.find(text)
        allowed = [(hit.start, hit.end) for hit in hits if any(e.kind == "allow" for e in hit.payloads)]
        if key_allow:
            allowed += [(hit.start, hit.end) for hit in self._cache.get(key_allow).find(text)]
        spans = Spans(allowed)
        return [
            (hit.start, entry)
            for hit in hits
            if not (spans and spans.covers(hit.start, hit.end))
            for entry in hit.payloads
            if entry.kind != "allow"
        ]

    @staticmethod
    def _fires(rule: _CompiledRule, found: list[tuple[int, Entry]], text: NormalizedText) -> bool:
        positions = [[start for start, entry in found if entry in members] for members in rule.clauses]
        if not all(positions):
            return False
        return _co_occur(positions, rule.spec, _sentence_ends(text.canon))


def _expanded(words: Iterable[str]) -> list[str]:
    """Each entry's expansions, so that audits name the phrase that matched, not the pattern."""
    return [variant for word in words for variant in expand_braces(word)]


def _satisfies(clause: RuleClause, entry: Entry) -> bool:
    if entry.kind == "group":
        return entry.name in clause.groups
    minimum = clause.categories.get(entry.name)
    return minimum is not None and _rank(entry.severity) >= _rank(minimum)
