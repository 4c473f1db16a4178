"""Unicode text rules shared by editing and matching: scripts, word characters, matching normalisation.

Character classes come from the ``regex`` package (Unicode scripts and properties, kept current with the
Unicode standard; already a dependency of transformers), not from hand-written code-point ranges.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import regex

# Scripts written without spaces between words (or with particles attached to words, as Hangul): a subject
# written in them is matched as a plain substring; other scripts need word boundaries around the subject.
_SPACELESS = regex.compile(
    r"[\p{Script=Han}\p{Script=Hiragana}\p{Script=Katakana}\p{Script=Hangul}\p{Script=Thai}\p{Script=Lao}"
    r"\p{Script=Khmer}\p{Script=Myanmar}\p{Script=Tibetan}\p{Script=Javanese}\p{Script=Balinese}"
    r"\p{Block=Halfwidth_and_Fullwidth_Forms}\p{Block=CJK_Symbols_and_Punctuation}]"
)
_WORD = regex.compile(r"[\p{L}\p{M}\p{N}\p{Pc}]")
# Invisible characters that may sit inside a word without changing it: zero-width space/joiners, word
# joiner, BOM, soft hyphen, Mongolian vowel separator. Removed before matching.
_IGNORABLE = frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e")
_HAS_IGNORABLE = regex.compile("[" + "".join(sorted(_IGNORABLE)) + "]")


def nfc(text: str) -> str:
    """NFC-normalise ``text`` (prompts, subjects and matched inputs are compared in NFC)."""
    return unicodedata.normalize("NFC", text)


def is_spaceless_char(char: str) -> bool:
    """True for characters of scripts written without spaces between words (CJK, Thai, ...)."""
    return bool(_SPACELESS.match(char))


def is_word_char(char: str) -> bool:
    """Letters, marks, digits and connector punctuation of any script."""
    return bool(_WORD.match(char))


def needs_word_boundary(char: str) -> bool:
    """A subject that starts/ends with ``char`` needs a word boundary on that side (spaced scripts only)."""
    return is_word_char(char) and not is_spaceless_char(char)


def normalize_for_matching(text: str) -> tuple[str, Sequence[int]]:
    """(normalised text, raw end index of each normalised character).

    Drops invisible characters (zero-width space/joiners, soft hyphen, ...) and NFC-composes each run that
    starts at a character of canonical combining class 0. ``ends[i]`` is the index just past the raw
    characters that produced normalised character ``i``, so a match ending at normalised index ``j``
    ends at raw index ``ends[j - 1]``.
    """
    if unicodedata.is_normalized("NFC", text) and not _HAS_IGNORABLE.search(text):
        return text, range(1, len(text) + 1)  # the common case: nothing to change
    out: list[str] = []
    ends: list[int] = []
    run: list[str] = []
    run_end = 0

    def flush() -> None:
        if run:
            composed = nfc("".join(run))
            out.append(composed)
            ends.extend([run_end] * len(composed))
            run.clear()

    for index, char in enumerate(text):
        if char in _IGNORABLE:
            continue
        if unicodedata.combining(char) == 0:
            flush()
        run.append(char)
        run_end = index + 1
    flush()
    return "".join(out), ends


def skip_ignorable(text: str, index: int) -> int:
    """The first index >= ``index`` of ``text`` that is not an invisible character."""
    while index < len(text) and text[index] in _IGNORABLE:
        index += 1
    return index


def clean_subject(subject: str) -> str:
    """A subject as the matcher compares it: invisible characters removed, NFC."""
    return normalize_for_matching(subject)[0]
