"""Word and phrase lists compiled into Aho–Corasick automata, and the operator's block/allow lists.

One automaton pass finds every entry of a list in a prompt, whatever the list's size
(``pyahocorasick``: the cost follows the prompt's length and the number of matches). Entries and
prompts go through the same normalisation (``normalize.py``), and each entry is stored with a
space on both sides, so it only ever matches whole words: "shoot" never fires inside "photoshoot",
"cunt" never inside "Scunthorpe".

Entry syntax: plain words or phrases; ``{a,b,c}`` expands to alternatives (``kill{,s,ing}`` is
"kill", "kills", "killing"), so inflections are listed explicitly instead of matched as prefixes
("killer" is not "kill").

Operator lists: the global ones come from settings, the per-key ones from the key row. A blocked
term blocks at every level (the operator asked for it explicitly) and wins over any allowlist;
an allowlisted phrase suppresses *classifier* matches that lie inside its span.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar, cast

import ahocorasick  # type: ignore[import-not-found]  # C extension without type stubs

from app.moderation.base import CheckerName, TextInput, Verdict
from app.moderation.normalize import NormalizedText, term_key

T = TypeVar("T")

MAX_EXPANSIONS = 512
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(term: str) -> list[str]:
    """``"kill{,s,ing} {him,her}"`` → every combination, in order."""
    parts = _BRACES.split(term)
    literals, choices = parts[0::2], [group.split(",") for group in parts[1::2]]
    if not choices:
        return [term]
    total = 1
    for options in choices:
        total *= len(options)
    if total > MAX_EXPANSIONS:
        raise ValueError(f"list entry {term!r} expands to {total} phrases (at most {MAX_EXPANSIONS})")
    expanded = []
    for combination in itertools.product(*choices):
        pieces = [literals[0]]
        for option, literal in zip(combination, literals[1:], strict=True):
            pieces += [option, literal]
        expanded.append("".join(pieces))
    return expanded


def validate_terms(terms: Iterable[str]) -> list[str]:
    """Check operator-supplied entries (admin API, settings): every one must expand and keep at
    least one letter or digit after normalisation. Returns them unchanged; raises ``ValueError``."""
    checked = []
    for term in terms:
        for variant in expand_braces(term):
            if not term_key(variant)[0]:
                raise ValueError(f"list entry {term!r} has no letters or digits")
        checked.append(term)
    return checked


class Hit(NamedTuple, Generic[T]):
    """A match: ``[start, end)`` in the normalised text, and the payloads of every entry that
    normalises to the matched phrase. A NamedTuple: built once per match, so it must be cheap."""

    start: int
    end: int
    payloads: tuple[T, ...]


def _has_letter(span: str) -> bool:
    return any(c.isalpha() for c in span)


class PhraseMatcher(Generic[T]):
    """Entries (term, payload) compiled once; ``find`` is one pass over the prompt."""

    def __init__(self, entries: Iterable[tuple[str, T]], *, strict: bool = True) -> None:
        grouped: dict[str, tuple[list[T], set[str]]] = {}
        for term, payload in entries:
            for variant in expand_braces(term):
                canon, plain = term_key(variant)
                if not canon:
                    if strict:
                        raise ValueError(f"list entry {term!r} has no letters or digits")
                    continue
                payloads, plains = grouped.setdefault(canon, ([], set()))
                if payload not in payloads:
                    payloads.append(payload)
                plains.add(plain)
        self.size = len(grouped)
        self._automaton: Any = None
        if grouped:
            self._automaton = ahocorasick.Automaton()
            for canon, (payloads, plains) in grouped.items():
                self._automaton.add_word(canon, (len(canon), tuple(payloads), frozenset(plains)))
            self._automaton.make_automaton()

    def find(self, text: NormalizedText) -> list[Hit[T]]:
        if self._automaton is None:
            return []
        hits: list[Hit[T]] = []
        plain = text.plain
        for end, value in self._automaton.iter(text.canon):
            length, payloads, plains = cast(tuple[int, tuple[T, ...], frozenset[str]], value)
            start = end - length + 1
            # Leetspeak folding turns digits into letters; a span that was only digits ("8008")
            # is a number, not the word it folds to, unless the entry itself is that number.
            # (A span that starts with a letter needs no slicing: the common case, kept cheap.)
            if not plain[start + 1].isalpha():
                span = plain[start : end + 1]
                if span not in plains and not _has_letter(span):
                    continue
            hits.append(Hit(start + 1, end, payloads))
        return hits


class Spans:
    """Allowed spans; answers "does a span contain [start, end)?" in O(log n)."""

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        ordered = sorted(spans)
        self._starts = [start for start, _ in ordered]
        self._reach = list(itertools.accumulate((end for _, end in ordered), max))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def covers(self, start: int, end: int) -> bool:
        index = bisect.bisect_right(self._starts, start) - 1
        return index >= 0 and self._reach[index] >= end


class TermCache:
    """Compiled automata for per-key lists, keyed by the list itself: keys are few and their lists
    rarely change, so each distinct list is compiled once, not once per request."""

    def __init__(self, maxsize: int = 512) -> None:
        self.get = functools.lru_cache(maxsize=maxsize)(self._compile)

    @staticmethod
    def _compile(terms: tuple[str, ...]) -> PhraseMatcher[str]:
        # Not strict: a bad per-key entry must not fail every request of that key; the admin API
        # rejects such entries up front with ``validate_terms``.
        return PhraseMatcher(((term, term) for term in terms), strict=False)


class BlocklistChecker:
    """The operator's blocklists: global (settings) and per key. Category ``blocklist``."""

    name: CheckerName = "blocklist"
    category = "blocklist"

    def __init__(self, terms: Sequence[str], *, cache: TermCache | None = None) -> None:
        self._global = PhraseMatcher((term, term) for term in terms)
        self._cache = cache or TermCache()

    async def check_text(self, request: TextInput) -> Verdict:
        return self.check(request)

    def check(self, request: TextInput) -> Verdict:
        hits = self._global.find(request.text)
        if request.key_block:
            hits += self._cache.get(request.key_block).find(request.text)
        if not hits:
            return Verdict.allow(request.level, checker=self.name)
        terms = sorted({term for hit in hits for term in hit.payloads})
        return Verdict(
            blocked=True,
            level=request.level,
            categories=(self.category,),
            checker=self.name,
            rules=tuple(f"blocklist:{term}" for term in terms),
        )
