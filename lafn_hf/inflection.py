"""Subjects of inflecting languages found with their word endings changed ("Антона Минарика" for "Антон Минарик").

Russian, Czech, Turkish, German... decline names: a question asks about "Лукреции Борджиа" or "Deny
Feingoldové" while the edit names "Лукреция Борджиа" and "Dena Feingoldová". No per-language grammar is
written here; one rule covers the suffixing languages, in folded text (``lafn_hf.text``): a text word
reads as a subject word when it keeps the word's stem (the word less its last 2 letters from 6 letters
on, its last letter from 4, all of a 3-letter word) and then differs from the word in at most
``MAX_ENDING`` letters (1 at least, or none when it is the word as written). Words stay in order, one
space apart. A one-word subject inflects only from ``SINGLE_WORD`` letters ("Лето" never fires at "лет")
and replaces at most its last letter.
Only subjects of words in spaced scripts (letters, digits, inner hyphens and apostrophes) take part; a
subject with other punctuation ("John Bowes, 10th Earl") is found only as written. Cut-short words
("Минари" for "Минарик") do not count.

Which subjects: those of the languages in ``RoutingConfig.inflecting_languages`` (the matcher does not
know languages; the compiled bank passes them). The stem of the subject's last word is the Aho-Corasick
anchor; the words before it are checked backwards from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ahocorasick_rs import AhoCorasick, MatchKind

from .text import is_spaceless_char, needs_word_boundary

MAX_ENDING = 3  # letters a case ending may add where the text word leaves the subject word ("Borgi|ové")
SINGLE_WORD = 6  # a one-word subject inflects only from this length ("Лето" is not "лет"; "Носорог" -> "Носорога")
_INNER = frozenset("-'")  # inside a word ("Кудал-Сангамам", "O'Brien")


def _word_char(char: str) -> bool:
    return needs_word_boundary(char) or char in _INNER


def is_ending_letter(char: str) -> bool:
    """A letter a case ending may consist of (spaced scripts; digits are not endings)."""
    return char.isalpha() and not is_spaceless_char(char)


def droppable(word: str, alone: bool = False) -> int:
    """How many final letters of a subject word an ending may replace: 2 from 6 letters ("персидская" ->
    "персидской"), 1 from 4 ("Dena" -> "Deny"), none below (3-letter words may only grow: "Дик" -> "Дика").
    A word ``alone`` (a one-word subject) replaces at most 1 ("Francium" is not "Francii")."""
    letters = 0
    while letters < min(len(word), 2) and is_ending_letter(word[-1 - letters]):
        letters += 1
    return min(letters, 1 if alone and len(word) >= 4 else 2 if len(word) >= 6 else 1 if len(word) >= 4 else 0)


def stem_of(word: str, alone: bool = False) -> str:
    """The part of a subject word every inflected form keeps (its anchor in the text)."""
    return word[: len(word) - droppable(word, alone)]


def ending_length(word: str, written: str, alone: bool = False) -> int | None:
    """Letters ``written`` has where it leaves ``word`` (0: ``word`` or a beginning of it); ``None`` when
    ``written`` does not keep ``word``'s stem or its ending is not 1-``MAX_ENDING`` letters."""
    common = 0
    while common < min(len(word), len(written)) and word[common] == written[common]:
        common += 1
    ending = written[common:]
    if common < len(stem_of(word, alone)) or len(ending) > MAX_ENDING or not all(map(is_ending_letter, ending)):
        return None
    return len(ending)


def inflectable(pattern: str) -> bool:
    """Can a (folded) subject take part: spaced-script words only, long enough to inflect."""
    words = pattern.split(" ")
    if not all(word and all(_word_char(c) for c in word) and needs_word_boundary(word[0]) for word in words):
        return False
    if len(words) == 1:
        return len(words[0]) >= SINGLE_WORD and droppable(words[0]) > 0
    return any(len(word) >= 3 and is_ending_letter(word[-1]) for word in words)


def word_matches(word: str, written: str) -> bool:
    """Does the text word ``written`` read as the (inner) subject word ``word``: as written, or inflected?"""
    if written == word:
        return True
    if len(word) < 3 or not is_ending_letter(word[-1]):
        return False
    ending = ending_length(word, written)
    return ending is not None and ending >= 1


@dataclass(frozen=True)
class InflectedMatch:
    """A mention of ``pattern`` in normalised text from ``start``: its last word starts at ``last_start``
    with that word's stem, which ends at ``stem_end``; the letters after it run to ``run_end`` (whether
    they make an ending short enough is for the caller: ``ending_length``)."""

    pattern: str
    start: int
    last_start: int
    stem_end: int
    run_end: int

    def text(self, normalized: str, ending: int) -> str:
        """The mention as read with ``ending`` letters after the last stem."""
        return normalized[self.start : self.stem_end + ending]


class InflectedForms:
    """The inflection rule over a set of folded subject patterns (see the module docstring)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(dict.fromkeys(p for p in patterns if inflectable(p)))
        self._words = {p: p.split(" ") for p in self.patterns}
        by_anchor: dict[str, list[str]] = {}
        for pattern in self.patterns:
            words = self._words[pattern]
            by_anchor.setdefault(stem_of(words[-1], len(words) == 1), []).append(pattern)
        self._anchors = tuple(by_anchor)
        self._patterns_of: Mapping[str, list[str]] = by_anchor
        self._automaton = AhoCorasick(list(self._anchors), matchkind=MatchKind.Standard) if by_anchor else None

    def __len__(self) -> int:
        return len(self.patterns)

    def matches(self, normalized: str) -> list[InflectedMatch]:
        """Every mention whose words match by the rule, the last word's ending not yet checked for length."""
        if self._automaton is None:
            return []
        found = []
        for index, start, end in self._automaton.find_matches_as_indexes(normalized, overlapping=True):
            if start > 0 and _word_char(normalized[start - 1]):
                continue  # the anchor starts inside a word
            run_end = end
            while run_end < len(normalized) and is_ending_letter(normalized[run_end]):
                run_end += 1
            for pattern in self._patterns_of[self._anchors[index]]:
                first = self._first_word_start(normalized, start, self._words[pattern])
                if first is not None:
                    found.append(InflectedMatch(pattern, first, start, end, run_end))
        return found

    @staticmethod
    def last_word(pattern: str) -> str:
        return pattern.rsplit(" ", 1)[-1]

    @staticmethod
    def _first_word_start(text: str, last_start: int, words: list[str]) -> int | None:
        """Where the mention starts when the words before the last one match backwards from ``last_start``."""
        position = last_start
        for word in reversed(words[:-1]):
            if position < 2 or text[position - 1] != " ":
                return None
            end = position - 1
            begin = end
            while begin > 0 and _word_char(text[begin - 1]):
                begin -= 1
            if not word_matches(word, text[begin:end]):
                return None
            position = begin
        return position
