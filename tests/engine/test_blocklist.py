"""engine.blocklist: blocked words found however they are disguised, ordinary prompts left alone,
no pattern able to stall the matcher, and refused patterns told apart for the moderator."""

from __future__ import annotations

import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.blocklist import (
    MAX_PATTERN_LENGTH,
    Blocklist,
    InvalidPattern,
    Match,
    compile_pattern,
    match_forms,
    normalize_text,
)

NUDE = r"\bnude\b"

# ------------------------------------------------------------------------------ normalize_text


@pytest.mark.parametrize(
    "invisible",
    ["\u200b", "\u200c", "\u200d", "\u00ad", "\u2060", "\ufeff", "\u202e", "\u202a", "\u2066", "\u2069", "\x00"],
)
def test_normalize_removes_invisible_characters(invisible: str) -> None:
    assert normalize_text(f"nu{invisible}de") == "nude"


@pytest.mark.parametrize("brk", ["\n", "\t", "\r\n", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"])
def test_normalize_turns_breaks_into_spaces(brk: str) -> None:
    assert normalize_text(f"red{brk}fox") == f"red{' ' * len(brk)}fox"


def test_normalize_nfkc_strips_ends_and_keeps_case() -> None:
    assert normalize_text("  ＡＢＣ ﬁsh\u00a0 ") == "ABC fish"
    assert normalize_text("e\u200b\u0301") == "é"  # removal before NFKC: the accent composes
    assert normalize_text("a\ud800b") == "ab"  # a lone surrogate is dropped
    assert normalize_text("A  cat") == "A  cat"  # nothing else is collapsed


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=60))
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert once == once.strip()


# --------------------------------------------------------------------------------- match_forms


@pytest.mark.parametrize(
    ("prompt", "joined"),
    [
        ("nu(de)1.1", "nude"),
        ("(nu)de", "nude"),
        ("nu+de", "nude"),
        ("nude++", "nude"),
        ("[nude]", "nude"),
        ("(nude:1.2)", "nude"),
        ("((nude : 1.5))", "nude "),
        ("\\(nude\\)", "nude"),
        ('("a cat", "a dog").blend(0.5, 0.5)', "a cat, a dog"),
    ],
)
def test_weighting_syntax_is_removed_in_one_form(prompt: str, joined: str) -> None:
    assert joined in match_forms(prompt)


def test_forms_are_distinct_and_plain_text_has_one() -> None:
    assert match_forms("A red fox") == ("a red fox",)
    forms = match_forms("Nu(de) in Straße")
    assert len(forms) == len(set(forms))
    assert "strasse" in forms[0] and any("straße" in form for form in forms)


def test_skeleton_maps_look_alikes_but_keeps_ascii() -> None:
    assert "nude" in match_forms("nud\u0435")  # Cyrillic ie
    assert "nude" in match_forms("n\u057dde")  # Armenian seh
    assert "nude" in match_forms("n\u0336u\u0336d\u0336e\u0336")  # combining strike-through
    # ASCII is never rewritten (the standard skeleton would turn "l" into "I"): only one form
    assert match_forms("blood 0 l") == ("blood 0 l",)


def test_match_forms_is_fast() -> None:
    prompt = ("(masterpiece:1.2) a nu+de astronaut, [cinematic] ﬁne détail жест ｎ\u200b " * 30)[:1500]
    match_forms(prompt)  # loads the UTS #39 table once (~25 ms)
    start = time.perf_counter()
    for _ in range(20):
        match_forms(prompt)
    # Measured: ~0.2 ms for 1500 ASCII characters, ~1 ms for 1500 mixed-script characters.
    assert (time.perf_counter() - start) / 20 < 0.05


# ----------------------------------------------------------------------------- compile_pattern


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("\u200b", "empty"),
        ("x" * (MAX_PATTERN_LENGTH + 1), f"longer than {MAX_PATTERN_LENGTH}"),
        (r"(a)\1", "backreferences"),
        (r"(?P<w>a)(?P=w)", "backreferences"),
        (r"(?=nude)n", "lookahead and lookbehind"),
        (r"(?<!a)b", "lookahead and lookbehind"),
        ("a*", "matches empty text"),
        (r"\b", "matches empty text"),
        ("nude|", "matches empty text"),
        ("[abc", "not a valid pattern"),
        (r"end\Z", r"\z"),
        (r"(?:\p{L}{100}){3}", "too large"),
        (r".{1000}", "too complex"),
    ],
)
def test_refused_patterns_say_why(pattern: str, reason: str) -> None:
    with pytest.raises(InvalidPattern) as refused:
        compile_pattern(pattern)
    assert reason in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_pattern_is_case_insensitive_and_nfkc_normalised() -> None:
    assert compile_pattern("NUDE").search("a nude") is not None
    assert compile_pattern("ｎｕｄｅ").search("a nude") is not None  # fullwidth typed by a moderator
    assert compile_pattern("x" * MAX_PATTERN_LENGTH).search("x" * MAX_PATTERN_LENGTH) is not None


@pytest.mark.parametrize("pattern", [r"(a|a)+b", r"((a+))+b", r"(x+x+)+y"])
@pytest.mark.parametrize("length", [40, 1500])
def test_catastrophic_patterns_run_in_linear_time(pattern: str, length: int) -> None:
    blocklist = Blocklist([pattern])
    assert len(blocklist) == 1
    hostile = ("x" if "x" in pattern else "a") * length
    start = time.perf_counter()
    assert blocklist.first_match(hostile) is None
    assert blocklist.first_match(hostile + ("y" if "y" in pattern else "b")) is not None
    # Measured: ~0.1 ms. Python's re needs ~1 s for (a|a)+b on 22 characters, doubling per character.
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------- Blocklist


@pytest.mark.parametrize(
    "prompt",
    [
        "a nude figure",
        "A NUDE figure",
        "a NuDe figure",
        "a nu\u200bde figure",
        "a nu\u00adde figure",
        "a nu\u2060de figure",
        "a ｎｕｄｅ figure",
        "a nud\u0435 figure",  # Cyrillic е
        "a n\u057dde figure",  # Armenian ս
        "a nu(de)1.1 figure",
        "a (nude:1.2) figure",
        "a (nu)de figure",
        "a nu+de figure",
        "a [nude] figure",
        "a ((nu))de figure",
        "a n̶u̶d̶e̶ figure",
        "a nüde figure",
        "a\nnude\tfigure",
    ],
)
def test_disguised_blocked_word_is_found(prompt: str) -> None:
    found = Blocklist([NUDE]).first_match(prompt)
    assert found is not None
    assert found.pattern == NUDE
    assert found.shown.casefold() == "nude" or "nude" in found.shown


def test_ligature_is_found() -> None:
    assert Blocklist([r"\bfish\b"]).first_match("a ﬁsh") == Match(pattern=r"\bfish\b", shown="fish")


@pytest.mark.parametrize(
    "prompt",
    ["a nudibranch in the sea", "a red fox", "(masterpiece:1.2), a castle", "nu de", "a nude_shoes logo"],
)
def test_ordinary_prompts_pass(prompt: str) -> None:
    assert Blocklist([NUDE]).first_match(prompt) is None


def test_match_reports_pattern_and_words_found() -> None:
    blocklist = Blocklist([r"gore", r"bl[o0]od"])
    assert blocklist.first_match("a BLOOD moon") == Match(pattern=r"bl[o0]od", shown="blood")
    assert blocklist.first_match("a bl0od moon") == Match(pattern=r"bl[o0]od", shown="bl0od")
    assert blocklist.first_match("a silver moon") is None


def test_pattern_written_with_sharp_s_still_matches() -> None:
    assert Blocklist(["straße"]).first_match("Straße") is not None
    assert Blocklist(["strasse"]).first_match("STRAẞE") is not None


def test_stored_patterns_that_no_longer_compile_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.blocklist"):
        blocklist = Blocklist([r"(a)\1", "gore", "a*"])
    assert blocklist.patterns == ("gore",)
    assert "(a)\\\\1" in caplog.text and "backreferences" in caplog.text
    assert blocklist.first_match("gore") == Match(pattern="gore", shown="gore")
    assert Blocklist([]).first_match("anything") is None


def test_hundred_patterns_on_a_long_prompt_are_fast() -> None:
    words = [f"blocked{i}word" for i in range(96)]
    patterns = [rf"\b{word}s?\b" for word in words] + [r"(a|a)+b", r"(x+x+)+y", r".{0,20}nsfw", r"bl[o0]od"]
    blocklist = Blocklist(patterns)
    assert len(blocklist) == 100
    prompt = ("a (masterpiece:1.2) portrait of an astronaut riding a horse, [cinematic] lighting++ " * 20)[:1500]
    blocklist.first_match(prompt)
    start = time.perf_counter()
    for _ in range(10):
        assert blocklist.first_match(prompt) is None
    # Measured: ~1.3 ms for an ASCII prompt, ~3 ms for a mixed-script one (more forms).
    assert (time.perf_counter() - start) / 10 < 0.1
