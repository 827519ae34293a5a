"""Prompt normalisation: every obfuscation the classifier claims to fold, and what it must leave alone."""

from __future__ import annotations

import pytest

from app.moderation.lists import PhraseMatcher, expand_braces, validate_terms
from app.moderation.normalize import SENTENCE, fold, normalize, term_key


def canon(text: str) -> str:
    return normalize(text).canon.strip()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SEX", "sex"),  # case
        ("ｓｅｘ", "sex"),  # fullwidth (compatibility form)
        ("𝐬𝐞𝐱", "sex"),  # mathematical bold
        ("ⓢⓔⓧ", "sex"),  # circled letters
        ("s\u200be\u200bx", "sex"),  # zero-width space
        ("s\u200de\u00adx", "sex"),  # zero-width joiner, soft hyphen
        ("s\u0301e\u0301x\u0301", "sex"),  # combining marks (zalgo)
        ("sèx", "sex"),  # precomposed accent
        ("\u0455\u0435\u0445", "sex"),  # Cyrillic look-alikes
        ("\u03ba\u03b9ll", "kiii"),  # Greek kappa, iota; l merged into i
        ("ᴋɪʟʟ", "kiii"),  # small capitals
        ("s3x", "sex"),  # leetspeak digits
        ("k1ll", "kiii"),
        ("p0rn", "porn"),
        ("kIll", "kiii"),  # capital I for l
        ("$ex", "sex"),  # symbols used as letters
        ("k!ll", "kiii"),
        ("k!||", "kiii"),
        ("@ss", "ass"),
        ("s e x", "sex"),  # spacing tricks
        ("k.i.l.l", "kiii"),
        ("k.i.l.l.", "kiii"),
        ("s-e-x", "sex"),
        ("s_e_x", "sex"),
        ("s*e*x", "sex"),
    ],
)
def test_obfuscations_fold_to_the_plain_word(text: str, expected: str) -> None:
    assert canon(text) == expected


def test_plain_and_canon_are_aligned_index_for_index() -> None:
    text = normalize("A k1ll3r wh4le, 1024x1024, in Ｐａｒｉｓ. Next: s e x")
    assert len(text.plain) == len(text.canon)
    assert text.plain.startswith(" ") and text.plain.endswith(" ")


def test_punctuation_becomes_single_spaces_and_sentence_ends_a_marker() -> None:
    assert fold("self-harm,  (now)") == "self harm now"
    assert fold("Kill! Now. Then") == f"kill {SENTENCE} now {SENTENCE} then"
    assert fold("kill!!") == "kill"  # an exclamation mark after a word stays punctuation
    assert fold("e.g. this") == f"e g {SENTENCE} this"
    assert fold(f"a{SENTENCE}b") == "a b"  # the marker cannot be smuggled in


def test_spaced_runs_split_words_on_double_spaces_and_changed_separators() -> None:
    assert fold("k i l l  y o u r s e l f") == "kill yourself"
    assert fold("k.i.l.l m.e") == "kill me"
    assert fold("a m.u.t.i.l.a.t.e.d corpse") == "a mutilated corpse"


def test_an_ambiguous_article_is_read_both_ways() -> None:
    # "a s e x y": is the "a" an article? Both readings, so each neighbour sees its phrase.
    assert fold("a s e x y girl") == "a sexy asexy a sexy girl"
    assert "killing a man" in fold("k i l l i n g a man")
    assert "building a pipe" in fold("building a p i p e bomb")
    # with dots as separators the article would have been written with a space: no ambiguity
    assert fold("p.r.o.p.a.g.a.n.d.a poster") == "propaganda poster"


def test_short_runs_and_ordinary_text_are_left_alone() -> None:
    assert fold("plan a b") == "plan a b"
    assert fold("Harry S Truman") == "harry s truman"
    assert canon("1024x1024 4 kids") == "io2axio2a a kids"  # digits fold only in canon


def test_term_keys_go_through_the_same_normalisation() -> None:
    assert term_key("Self-Harm") == (" seif harm ", " self harm ")
    assert term_key("1488") == (" iabb ", " 1488 ")
    assert term_key("!!!") == ("", "")


def test_brace_expansion() -> None:
    assert expand_braces("kill{,s,ing}") == ["kill", "kills", "killing"]
    assert expand_braces("{a,b} {c,d}") == ["a c", "a d", "b c", "b d"]
    assert expand_braces("plain") == ["plain"]
    with pytest.raises(ValueError, match="expands to"):
        expand_braces("{a,b,c,d,e,f,g,h}" * 4)


def test_validate_terms_rejects_entries_without_letters() -> None:
    assert validate_terms(["fine", "kill{,s}"]) == ["fine", "kill{,s}"]
    with pytest.raises(ValueError, match="no letters or digits"):
        validate_terms(["ok", "--"])


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Scunthorpe town centre", []),
        ("assassin's creed cosplay", []),
        ("a killer whale", []),
        ("a photoshoot", []),
        ("shoot", ["shoot"]),
        ("kill", ["kill"]),
        ("K.I.L.L!", ["kill"]),
        ("you ass", ["ass"]),
        ("a c*nt", []),  # a masked letter is not a spelling we fold
        ("the cunt", ["cunt"]),
        ("boob", ["boob"]),
        ("b00b", ["boob"]),
        ("a calculator showing 8008", []),  # only digits: a number, not a word
        ("a 1488 tattoo", ["1488"]),  # unless the entry itself is that number
    ],
)
def test_matches_respect_word_boundaries(text: str, found: list[str]) -> None:
    matcher = PhraseMatcher((term, term) for term in ["kill", "ass", "cunt", "shoot", "boob", "1488"])
    assert [payload for hit in matcher.find(normalize(text)) for payload in hit.payloads] == found


def test_overlapping_matches_are_all_reported() -> None:
    matcher = PhraseMatcher([("kill", "kill"), ("kill kill", "double")])
    hits = matcher.find(normalize("kill kill kill"))
    assert [h.payloads for h in hits].count(("kill",)) == 3
    assert [h.payloads for h in hits].count(("double",)) == 2


def test_cost_does_not_depend_on_list_size_but_on_matches() -> None:
    # A 20,000-entry list still answers with exactly the phrases present.
    words = [f"word{i}x" for i in range(20_000)]
    matcher = PhraseMatcher((w, w) for w in words)
    assert matcher.size == 20_000
    hits = matcher.find(normalize("nothing here but word17x and word19999x"))
    assert [h.payloads for h in hits] == [("word17x",), ("word19999x",)]
