"""Fold a prompt into the canonical form that the moderation lists are matched against.

Every step is a C-level pass (``unicodedata``, ``str.translate``, ``re``), so the cost is linear in
the prompt's length; the common all-ASCII prompt skips the Unicode steps entirely. Python code runs
only per match of a rare pattern (a symbol run, a spaced-out word), never per character.

1. Compatibility folding (Unicode NFKD: fullwidth, math-bold, circled, ligatures → plain letters),
   then combining marks and invisible format characters are removed: ``s\u200bex``, ``sèx`` and
   zalgo text lose what was inserted. (NFKC is NFKD plus recomposition; the marks are dropped here,
   so recomposing them would be wasted work.)
2. Look-alike letters from Cyrillic, Greek and small-capital blocks become the Latin letter they
   imitate, then case folding.
3. Symbols used as letters inside a word (``$ex``, ``k!ll``, ``@ss``, ``k!||``) become letters; a
   trailing ``!`` alone stays punctuation, so ``kill!`` keeps its exclamation mark.
4. Runs of three or more single characters separated by spaces or punctuation (``s e x``,
   ``k.i.l.l``, ``s-e-x``) are joined. Two spaces, or a separator other than the run's usual one,
   separate words (``k i l l  m e``, ``a m.u.t.e``). Where the run's own separator leaves it
   ambiguous whether a leading or trailing "a"/"i" is an article (``draw a s e x y girl``,
   ``k i l l i n g a man``), both readings are emitted.
5. Sentence ends (``.``, ``!``, ``?``, ``;`` before a space, a line break) become a marker token
   (``SENTENCE``, which no list term contains), every other run of punctuation and whitespace
   becomes one space, and the text is padded with a space on both sides, so a list term
   ``" kill "`` can only match a whole word: word boundaries come from the text itself and cost
   nothing at match time.
6. ``canon`` additionally folds leetspeak digits (``s3x``, ``k1ll``, ``p0rn``) and merges ``l`` into
   ``i`` (``1``, ``l``, ``I`` and ``|`` are one glyph in many fonts). Each of these is one character
   for one character, so ``canon`` and ``plain`` are aligned index for index, and a match found in
   ``canon`` can be checked against ``plain`` (a run of digits such as ``8008`` is not a word).

Not handled, by design: repeated letters (``kiiill``), multi-character spellings (``ph`` for ``f``,
``|<`` for ``k``) and words split in two (``ki ll``). Each would fold innocent words together; the
upstream moderation model, when configured, is the backstop for those.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

# Invisible and formatting characters (zero-width, bidi controls, soft hyphen, variation
# selectors, tag characters) and combining marks (accents, zalgo stacks).
_STRIP = re.compile(
    "["
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U0001d173-\U0001d17a\U000e0000-\U000e007f"
    "\u0300-\u036f\u0483-\u0489\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
    "]+"
)

# Hand-written rather than a confusables package: Unicode's confusables.txt maps thousands of code
# points, many to digits or symbols that would fold benign text together, and the installed
# transliterators (unidecode and the like) map Cyrillic by *sound* (р → r), not by *shape* (р → p).
# This is the short list of letters that are actually used to dodge filters. Upper case is listed
# separately because the capitals imitate different Latin letters than the small ones (Η, η).
_HOMOGLYPH_PAIRS = (
    # Cyrillic
    "аa вb еe ёe кk мm нh оo рp сc тt уy хx ѕs іi їi јj ԁd һh ӏl ԛq ԝw үy ɡg"
    " Аa Вb Еe Кk Мm Нh Оo Рp Сc Тt Уy Хx Ѕs Іi Јj Һh Ӏl Ԛq Ԝw Үy"
    # Greek
    " αa βb γy εe ηn ιi κk νv οo ρp τt υu χx ωw ϲc ϳj"
    " Αa Βb Εe Ζz Ηh Ιi Κk Μm Νn Οo Ρp Τt Υy Χx Ϲc"
    # Latin small capitals and other look-alikes that NFKD leaves alone
    " ᴀa ʙb ᴄc ᴅd ᴇe ꜰf ɢg ʜh ɪi ᴊj ᴋk ʟl ᴍm ɴn ᴏo ᴘp ʀr ꜱs ᴛt ᴜu ᴠv ᴡw ʏy ᴢz ıi ȷj ℓl"
)
_HOMOGLYPHS = {ord(pair[0]): pair[1] for pair in _HOMOGLYPH_PAIRS.split()}

_SYMBOL_LETTERS = {"@": "a", "$": "s", "!": "i", "|": "l", "¡": "i", "€": "e"}
_SYMBOL_RUN = re.compile(r"[@$!|¡€]+")

# A single letter or digit, then two or more "separator, single letter or digit" steps.
# A trailing separator ("k.i.l.l.") belongs to the run, so it does not read as a sentence end.
_SPACED = re.compile(r"(?<![^\W_])[^\W_](?:[\W_]{1,3}[^\W_](?![^\W_])){2,}(?:[^\w\s]+(?=\s|$))?")
_SPACED_ASCII = re.compile(
    r"(?<![a-z0-9])[a-z0-9](?:[^a-z0-9]{1,3}[a-z0-9](?![a-z0-9])){2,}(?:[^a-z0-9\s]+(?=\s|$))?"
)
_NON_WORD = re.compile(r"[\W_]+")
# Sentence ends are kept as a marker token (never part of a list term), so that rules can tell
# "in the same sentence" from "in the next one". The marker is removed from the input first.
SENTENCE = "\x00"  # not whitespace to str.split, unlike the ASCII separators \x1c-\x1f
_SENTENCE_END = re.compile(r"[.!?;]+(?=\s|$)|\n")
_SQUASH = re.compile(r"(?:[^\w\x00]|_)+")
_ASCII_SQUASH = bytes(c if c < 128 and (chr(c).isalnum() or c == 0) else 0x20 for c in range(256))
_WORD_GAP = re.compile(r"\s{2,}")
_SEPARATOR = re.compile(r"([\W_]+)")
_TRAILING = re.compile(r"[\W_]+$")

_LEET_PAIRS = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "l": "i"}
_LEET = str.maketrans(_LEET_PAIRS)
_LEET_BYTES = bytes.maketrans(
    "".join(_LEET_PAIRS).encode("ascii"), "".join(_LEET_PAIRS.values()).encode("ascii")
)


@dataclass(frozen=True, slots=True)
class NormalizedText:
    """``plain``: folded, punctuation-squashed, space-padded; ``canon``: the same with leetspeak
    digits folded and ``l`` merged into ``i``. Both have the same length."""

    plain: str
    canon: str


def _fold_symbols(match: re.Match[str]) -> str:
    """A symbol run is a spelling when a letter or digit follows (``$ex``, ``k!ll``), or when it
    ends a word and holds a symbol other than "!" (``k!||``, ``chem!c@|``); ``kill!!`` keeps its
    exclamation marks. Decided here rather than in the pattern: a lookbehind alternative makes
    ``re`` test every position of the prompt."""
    run, text, end = match.group(), match.string, match.end()
    if end < len(text) and text[end].isalnum():
        return "".join(_SYMBOL_LETTERS[c] for c in run)
    start = match.start()
    if start and text[start - 1].isalnum() and run.strip("!¡"):
        return "".join(_SYMBOL_LETTERS[c] for c in run)
    return run


def _spaced_words(run: str) -> tuple[list[str], bool]:
    """The words of a spaced-out run, and whether its usual separator is a space. A separator
    breaks words when it is two or more spaces, or when it differs from the run's usual separator
    ("a m.u.t.e", "k.i.l.l m.e")."""
    parts = _SEPARATOR.split(_TRAILING.sub("", run))
    letters, separators = parts[0::2], parts[1::2]
    usual, count = Counter(separators).most_common(1)[0]
    words, current = [], [letters[0]]
    for separator, letter in zip(separators, letters[1:], strict=True):
        if _WORD_GAP.search(separator) or (count >= 2 and separator != usual):
            words.append("".join(current))
            current = []
        current.append(letter)
    words.append("".join(current))
    return words, usual.isspace()


def _join_spaced(match: re.Match[str]) -> str:
    words, spaces = _spaced_words(match.group())
    joined = " ".join(words)
    # When letters are spaced with plain spaces, the articles "a" and "i" are indistinguishable
    # from spelled letters ("a s e x y", "k i l l i n g a man"). Then the reading with the article
    # split off goes on both sides of the joined one, so each neighbouring word sees its phrase.
    head, tail = words[0], words[-1]
    split_head = spaces and len(head) >= 4 and head[0] in "ai"
    split_tail = spaces and len(tail) >= 4 and tail[-1] in "ai"
    if not (split_head or split_tail):
        return joined
    if split_head:
        words[0] = f"{head[0]} {words[0][1:]}"
    if split_tail:
        words[-1] = f"{words[-1][:-1]} {tail[-1]}"
    alternative = " ".join(words)
    return f"{alternative} {joined} {alternative}"


def fold(text: str) -> str:
    """Steps 1–5: the ``plain`` form without padding."""
    text = text.replace(SENTENCE, " ")
    ascii_only = text.isascii()
    if ascii_only:
        text = text.lower()
    else:
        text = _STRIP.sub("", unicodedata.normalize("NFKD", text))
        text = text.translate(_HOMOGLYPHS).casefold()
        # Look-alikes and accents fold to ASCII, so most "Unicode" prompts take the fast path now.
        ascii_only = text.isascii()
    if any(symbol in text for symbol in _SYMBOL_LETTERS):
        text = _SYMBOL_RUN.sub(_fold_symbols, text)
    text = (_SPACED_ASCII if ascii_only else _SPACED).sub(_join_spaced, text)
    text = _SENTENCE_END.sub(f" {SENTENCE} ", text)
    if ascii_only:
        # bytes.translate + split is several times faster than a regex substitution per gap.
        text = " ".join(text.encode("ascii").translate(_ASCII_SQUASH).decode("ascii").split())
    else:
        text = _SQUASH.sub(" ", text)
    return text.strip(f" {SENTENCE}")


def leet(plain: str) -> str:
    """Step 6, one character for one character."""
    if plain.isascii():
        return plain.encode("ascii").translate(_LEET_BYTES).decode("ascii")
    return plain.translate(_LEET)


def normalize(text: str) -> NormalizedText:
    plain = f" {fold(text)} "
    return NormalizedText(plain=plain, canon=leet(plain))


def term_key(term: str) -> tuple[str, str]:
    """A list entry as ``(canon, plain)``, both padded, ready for the automaton; ("", "") when the
    entry has no letters or digits at all."""
    plain = fold(term)
    if not plain:
        return "", ""
    padded = f" {plain} "
    return leet(padded), padded
