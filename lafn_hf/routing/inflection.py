"""Subjects of inflecting languages found with their word endings changed ("Антона Минарика" for "Антон Минарик").

Russian, Czech, Turkish, German... decline names: a question asks about "Лукреции Борджиа" or "Deny
Feingoldové" while the edit names "Лукреция Борджиа" and "Dena Feingoldová". No per-language grammar is
written here; one rule covers the suffixing languages, in folded text (``lafn_hf.text``): a text word
reads as a subject word when it keeps the word's stem (the word less its last 2 letters from 6 letters
on, its last letter from 4, all of a 3-letter word) and then differs from the word in at most
``MAX_ENDING`` letters (1 at least, or none when it is the word as written). Words stay in order, apart
as in the subject. A one-word subject inflects only from ``SINGLE_WORD`` letters ("Лето" never fires at "лет")
and replaces at most its last letter.
A word of 6 letters or more in a subject of several words may also lose its last letter (a zero ending:
"яблоки" -> "Горьких яблок", "Брынкушь" -> "Брынкуш"); other cut-short words ("Минари" for "Минарик",
or any word of a one-word subject) do not count.
Only subjects of words in spaced scripts (letters, digits, inner apostrophes) take part, one space, ", "
or ". " apart, each kept as written ("Джон Боуз, 10-й граф" -> "Джона Боуза, 10-го графа"); a subject
with other punctuation ("Halle Berry (She's Fine)") is found only as written.

Which subjects: those of the languages in ``RoutingConfig.inflecting_languages`` (the matcher does not
know languages; the compiled bank passes them). The stem of the subject's last word is the Aho-Corasick
anchor; the words before it are checked backwards from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

from ..text import SPACELESS_CLASS, is_spaceless_char, needs_word_boundary
from .anchors import AnchoredForms, Named

MAX_ENDING = 3  # letters a case ending may add where the text word leaves the subject word ("Borgi|ové")
SINGLE_WORD = 6  # a one-word subject inflects only from this length ("Лето" is not "лет"; "Носорог" -> "Носорога")
ZERO_ENDING = 6  # a word of a multi-word subject may drop its last letter from this length ("яблоки" -> "яблок")
_INNER = frozenset("'")  # inside a word ("O'Brien"; folded text reads hyphens as spaces, so "-" never occurs)
# words of spaced-script word characters (with inner '), each starting with a word character,
# one space, ", " or ". " apart
_WORD_CHAR = r"(?:(?!" + SPACELESS_CLASS + r")[\p{L}\p{M}\p{N}\p{Pc}])"
_WORD = rf"{_WORD_CHAR}(?:{_WORD_CHAR}|')*"
_WORDS = regex.compile(rf"{_WORD}(?:[,.]? {_WORD})*")
_SEPARATOR = regex.compile(r"([,.]? )")  # between two subject words, kept as written


def split_words(pattern: str) -> tuple[list[str], list[str]]:
    """(words, the separator after each word but the last) of a pattern ``inflectable`` accepts."""
    parts = _SEPARATOR.split(pattern)
    return parts[::2], parts[1::2]


def _word_char(char: str) -> bool:
    return needs_word_boundary(char) or char in _INNER


def is_ending_letter(char: str) -> bool:
    """A letter a case ending may consist of (spaced scripts; digits are not endings)."""
    return char.isalpha() and not is_spaceless_char(char)


_ROMAN = regex.compile(r"[ivxlcdm]+")


def as_written(word: str) -> bool:
    """Words that never inflect: under 3 characters ("Ли" is not "Линч"), Roman numerals ("VII" is not
    "VIII"), words not ending in a letter ("19")."""
    return len(word) < 3 or not word[-1].isalpha() or bool(_ROMAN.fullmatch(word))


def droppable(word: str, alone: bool = False) -> int:
    """How many final letters of a subject word an ending may replace: 2 from 6 letters ("персидская" ->
    "персидской"), 1 from 4 ("Dena" -> "Deny"), none below (3-letter words may only grow: "Дик" -> "Дика").
    A word ``alone`` (a one-word subject) replaces at most 1 ("Francium" is not "Francii")."""
    letters = 0  # (subject words hold no spaceless-script letters: ``inflectable``)
    while letters < min(len(word), 2) and word[-1 - letters].isalpha():
        letters += 1
    return min(letters, 1 if alone and len(word) >= 4 else 2 if len(word) >= 6 else 1 if len(word) >= 4 else 0)


def stem_of(word: str, alone: bool = False) -> str:
    """The part of a subject word every inflected form keeps (its anchor in the text)."""
    return word if as_written(word) else word[: len(word) - droppable(word, alone)]


def ending_length(word: str, written: str, alone: bool = False) -> int | None:
    """Letters ``written`` has where it leaves ``word`` (0: ``word`` or a beginning of it); ``None`` when
    ``written`` does not keep ``word``'s stem or its ending is not 1-``MAX_ENDING`` letters."""
    if as_written(word):
        return 0 if written == word else None
    common = 0
    while common < min(len(word), len(written)) and word[common] == written[common]:
        common += 1
    ending = written[common:]
    if common < len(stem_of(word, alone)) or len(ending) > MAX_ENDING or not all(map(is_ending_letter, ending)):
        return None
    return len(ending)


def inflectable(pattern: str) -> bool:
    """Can a (folded) subject take part: spaced-script words only, long enough to inflect."""
    if not _WORDS.fullmatch(pattern):
        return False
    words = split_words(pattern)[0]
    if len(words) == 1:
        return len(words[0]) >= SINGLE_WORD and not as_written(words[0])
    return not all(map(as_written, words))


def zero_ending(word: str, written: str) -> bool:
    """Is ``written`` the word of a multi-word subject less its last letter, a zero ending ("яблок")?"""
    return len(word) >= ZERO_ENDING and not as_written(word) and written == word[:-1]


def word_matches(word: str, written: str, after_number: bool = False) -> bool:
    """Does the text word ``written`` read as the (inner) subject word ``word``: as written, or inflected?
    ``after_number``: ``word`` follows a number, so 1-2 letters are an ordinal's ending, which may change
    into 1-``MAX_ENDING`` others ("10-й граф" -> "10-го графа"; hyphens read as spaces)."""
    if written == word:
        return True
    if after_number and len(word) <= 2 and word.isalpha():
        return 0 < len(written) <= MAX_ENDING and all(map(is_ending_letter, written))
    if as_written(word):
        return False
    ending = ending_length(word, written)
    return ending is not None and (ending >= 1 or zero_ending(word, written))


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

    @property
    def last_word(self) -> str:
        """The subject's last word as written."""
        return self.pattern.rsplit(" ", 1)[-1]

    def reads_whole(self, word: str, ending: int | None, complete: bool) -> bool:
        """Does the last word, read as ``word`` with ``ending`` letters after the stem, complete a mention:
        an ending of 1+ letters, the word as written, or (once the word is ``complete``) a zero ending."""
        if ending is None:
            return False
        return bool(ending) or word == self.last_word or (
            complete and self.last_word != self.pattern and zero_ending(self.last_word, word))

    def last_word_ending(self, normalized: str, end: int) -> tuple[str, int | None]:
        """(the last word as read up to ``end``, its ``ending_length`` against the subject's last word)."""
        word, last = normalized[self.last_start : end], self.last_word
        return word, ending_length(last, word, alone=last == self.pattern)


class InflectedForms(AnchoredForms[tuple[str, tuple[str, ...]]]):
    """The inflection rule over folded subject patterns, each with its subject names (module docstring).

    ``extended`` grows it without copying what it holds (``lafn_hf.routing.anchors``: the stem of each subject's
    last word is its anchor; an anchor may sit in several tiers, each with its own patterns).
    """

    @staticmethod
    def _pairs(named: Named) -> list[tuple[str, tuple[str, tuple[str, ...]]]]:
        pairs = []
        for pattern, names in named:
            if inflectable(pattern):
                words = split_words(pattern)[0]
                pairs.append((stem_of(words[-1], len(words) == 1), (pattern, names)))
        return pairs

    def __len__(self) -> int:
        return sum(1 for _ in self._anchors.values())

    def matches(self, normalized: str) -> list[tuple[InflectedMatch, tuple[str, ...]]]:
        """Every mention whose words match by the rule, with its subject names; the last word's ending is
        not checked for length here."""
        found = []
        for start, end, values in self._anchors.find(normalized):
            if start > 0 and _word_char(normalized[start - 1]):
                continue  # the anchor starts inside a word
            run_end = end
            while run_end < len(normalized) and is_ending_letter(normalized[run_end]):
                run_end += 1
            for pattern, names in values:
                first = self._first_word_start(normalized, start, *split_words(pattern))
                if first is not None:
                    found.append((InflectedMatch(pattern, first, start, end, run_end), names))
        return found

    @staticmethod
    def _first_word_start(text: str, last_start: int, words: list[str], separators: list[str]) -> int | None:
        """Where the mention starts when the words before the last one, each followed by its separator,
        match backwards from ``last_start``."""
        position = last_start
        for index, separator in reversed(list(enumerate(separators))):
            word = words[index]
            end = position - len(separator)
            if end < 1 or text[end:position] != separator:
                return None
            begin = end
            while begin > 0 and _word_char(text[begin - 1]):
                begin -= 1
            if not word_matches(word, text[begin:end], index > 0 and words[index - 1].isdigit()):
                return None
            position = begin
        return position
