"""Subjects in scripts whose transliterations vary letter by letter, found spelled another way.

Thai (and Lao, Khmer, Myanmar) spell foreign names as they sound, and two writers rarely agree: an MzsRE
question asks about "เบนี เฟเรนซ์ซี" where the edit names "เบนี่ เฟเรนซี". A subject written only in these
scripts (``SCRIPTS``), at least ``MIN_LENGTH`` characters long, also fires where the text differs from it
by at most one edit (a character inserted, deleted or replaced) per ``PER_EDIT`` characters. Both are
compared in their *comparison form* (folded text without spaces and without the marks of combining class
above 0: tone marks and the vowels written below the line), and the mention must end on the subject's last
character. No per-language lists: one rule for the scripts that write sounds letter by letter; CJK, whose
characters are syllables or words, and spaced scripts take no part.

Causal (the matcher's rule): whether a mention ends at character ``e`` of the comparison form depends on
the text up to ``e`` only. It fires there unless another mention of the same subject ended less than the
subject's length before ``e`` (a mention fires once), the text there is the subject as written (the exact
stage fires) or the subject as written less its last letters (it may yet be completed as written: "แป" of
"แปป"). The first letter that completes a mention within budget fires: "แพป" of "แพปป์" for "แปป".
Known gaps: a subject whose last letter carries a tone mark is not found where only that mark differs
(the letters match the subject as written, so the exact stage is left to decide, and it does not match),
nor is the subject less its last letter.
Candidates come from an Aho-Corasick automaton over each subject's k+1 pieces (k its edit budget: one
piece occurs unchanged in any mention within k edits); a small edit-distance table confirms them.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import regex

from ..text import is_word_char
from .anchors import AnchoredForms, Named

SCRIPTS = regex.compile(r"[\p{Script=Thai}\p{Script=Lao}\p{Script=Khmer}\p{Script=Myanmar}]")
MIN_LENGTH = 6  # comparison-form characters a subject needs to be found spelled another way
PER_EDIT = 6  # one edit allowed per this many characters


def comparison_form(text: str) -> tuple[str, list[int]]:
    """``text`` without spaces and marks of combining class > 0, and the index in ``text`` of each kept char."""
    kept = [i for i, char in enumerate(text) if char != " " and not unicodedata.combining(char)]
    return "".join(text[i] for i in kept), kept


def core(pattern: str) -> str:
    """``pattern`` without its trailing marks of combining class > 0 (what the text shows at its last letter)."""
    end = len(pattern)
    while end and unicodedata.combining(pattern[end - 1]):
        end -= 1
    return pattern[:end]


def spellable(pattern: str) -> bool:
    """Can a (folded) subject be found spelled another way: all its letters in ``SCRIPTS``, long enough."""
    letters = [char for char in pattern if is_word_char(char)]
    return bool(letters) and all(SCRIPTS.match(char) for char in letters) and \
        len(comparison_form(pattern)[0]) >= MIN_LENGTH


def pieces(form: str) -> list[tuple[str, int]]:
    """The k+1 pieces of a comparison form (k = its edit budget) with their offsets."""
    count = len(form) // PER_EDIT + 1
    bounds = [round(i * len(form) / count) for i in range(count + 1)]
    return [(form[bounds[i] : bounds[i + 1]], bounds[i]) for i in range(count)]


def mention_ends(pattern: str, text: str, low: int, high: int) -> dict[int, int]:
    """End index (in ``text``) -> start of every mention of ``pattern`` within its budget that ends on its
    last character, for ends in ``text[low:high]`` (spans starting before ``low`` are not seen; among spans
    with the fewest edits the latest start)."""
    budget = len(pattern) // PER_EDIT
    previous = [(i, -low) for i in range(len(pattern) + 1)]  # (edits, -start) aligning pattern[:i], before low
    found = {}
    for j in range(low, high):
        char = text[j]
        current = [(0, -(j + 1))]  # a mention may start anywhere: the empty pattern costs nothing
        for i in range(1, len(pattern) + 1):
            skip_text, skip_pattern, diagonal = previous[i], current[i - 1], previous[i - 1]
            current.append(min((skip_text[0] + 1, skip_text[1]), (skip_pattern[0] + 1, skip_pattern[1]),
                               (diagonal[0] + (pattern[i - 1] != char), diagonal[1])))
        if current[-1][0] <= budget and char == pattern[-1]:
            found[j + 1] = -current[-1][1]
        previous = current
    return found


@dataclass(frozen=True)
class SpelledMatch:
    """A mention of ``pattern`` in normalised text: characters [start, end) (``end`` just past the mention's
    last letter, before any mark of combining class > 0 on it)."""

    pattern: str
    start: int
    end: int


class SpelledForms(AnchoredForms[tuple[str, str, int, tuple[str, ...]]]):
    """The spelling rule over folded subject patterns, each with its subject names (module docstring).

    Grows like the other word-form stages (``lafn_hf.routing.anchors``): a subject's k+1 pieces are its anchors.
    """

    @staticmethod
    def _pairs(named: Named) -> list[tuple[str, tuple[str, str, int, tuple[str, ...]]]]:
        """(piece, (pattern, comparison form, the piece's offset, names)) of the spellable patterns."""
        found = []
        for pattern, names in named:
            if spellable(pattern):
                form = comparison_form(pattern)[0]
                found += [(piece, (pattern, form, offset, names)) for piece, offset in pieces(form)]
        return found

    def __len__(self) -> int:
        return len(dict.fromkeys((pattern, names) for pattern, _, _, names in self._anchors.values()))

    def matches(self, normalized: str, after: int = 0) -> list[tuple[SpelledMatch, tuple[str, ...]]]:
        """Mentions that fire by the rule, ending past normalised index ``after``, with their subject names."""
        if not self._anchors:
            return []
        form, kept = comparison_form(normalized)
        # comparison-form ends past ``after``: a candidate is worth checking only if it can end there
        first_end = next((i + 1 for i, index in enumerate(kept) if index >= after), len(form) + 1)
        regions: dict[tuple[str, str, tuple[str, ...]], set[int]] = {}
        for start, _, values in self._anchors.find(form):
            for pattern, target, offset, names in values:
                origin = start - offset  # where the mention would start with no edit before the piece
                if origin + len(target) + len(target) // PER_EDIT >= first_end:
                    regions.setdefault((pattern, target, names), set()).add(origin)
        found = []
        for (pattern, target, names), origins in regions.items():
            length, budget = len(target), len(target) // PER_EDIT
            ends: dict[int, int] = {}
            for origin in sorted(origins):
                low = max(0, origin - length - 2 * budget)
                ends.update(mention_ends(target, form, low, min(len(form), origin + length + budget)))
            tail = core(pattern)
            counted = {end for end in ends if not _cut_short(form, end, target, budget)}
            for end in sorted(counted):
                last = kept[end - 1] + 1
                if end < first_end or any(end - length < other < end for other in counted):
                    continue  # another mention ended less than the subject's length before
                if normalized[max(0, last - len(tail)) : last] == tail:
                    continue  # the subject as written (up to its last letter): the exact stage's
                found.append((SpelledMatch(pattern, kept[ends[end]], last), names))
        return found


def _cut_short(form: str, end: int, target: str, budget: int) -> bool:
    """Does ``form`` end at ``end`` with the subject as written less its last 1..budget letters? (It may
    still be completed as written, "แป" of "แปป": such an end neither fires nor stops a later one.)"""
    return any(form[end - cut : end] == target[:cut] for cut in range(max(1, len(target) - budget), len(target)))
