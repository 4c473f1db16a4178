"""Multi-word subjects of inflecting languages found with their words reordered or derived.

Questions name a subject in a construction of their own: "собор Инсбрука" for "Инсбрукский собор",
"туманность Калифорния" for "Калифорнийская туманность", "мост Декстера-Гроба" for "Мост гроба
Декстера". One rule, no per-language grammar, in folded text: a run of text words
is a mention when its words match the subject's words one for one in any order, each as written, inflected
(``lafn_hf.routing.inflection.word_matches``) or *derived*: it keeps the subject word's first max(``DERIVED_KEEP``,
length - ``DERIVED_DROP``) letters and adds at most ``DERIVED_ADD`` letters ("инсбрукский" -> "инсбрука",
"карлик" -> "карликовая"). The words stand next to each other: a word between them is not allowed, since
no rule without word lists tells "собор в Инсбруке" (in) from "собор и Инсбрук" (and). A run in
the subject's order belongs to the exact and inflection stages unless a word of it is derived ("принца
Карла Иоганна Лихтенштейнского" for "Принц Карл Иоганн Лихтенштейна"); then it counts once its last word
has ended (a word still being read may yet become the form as written) and where the inflection stage,
read token by token, has not fired on it ("Лихтенштейнс|кого" reads as an ending at "с").
Subjects take part when the inflection stage takes them (``lafn_hf.routing.inflection.inflectable``), have two to
``MAX_WORDS`` words and one word that may derive (``DERIVED_KEEP`` letters or more, ending in a letter).

Causal (the matcher's rule): a mention fires at the first token at which the text read so far makes it one,
once per mention (its first word's start); a last word still being read counts as far as it is read, so a
word that later runs past ``DERIVED_ADD`` letters has fired by then. Candidates come from an Aho-Corasick
automaton over each subject's anchor: the first letters every matching form of its longest derivable word
keeps.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import regex

from .anchors import AnchoredForms, Named
from .inflection import _WORD, as_written, inflectable, is_ending_letter, split_words, stem_of, word_matches

DERIVED_KEEP = 5  # letters of the subject word a derived word keeps at least
DERIVED_DROP = 5  # final letters of the subject word a derivation may replace ("калифорн|ийская" -> "калифорни|я")
DERIVED_ADD = 6  # letters a derivation may add after what it keeps ("лихтенштейн|ского")
MAX_WORDS = 6
_TEXT_WORD = regex.compile(_WORD)
_SPACES = regex.compile(r",? {1,2}")  # what may separate two words of a mention (folded text: one space mostly)


def common_prefix(one: str, other: str) -> int:
    length = 0
    while length < min(len(one), len(other)) and one[length] == other[length]:
        length += 1
    return length


def derived(word: str, written: str) -> bool:
    """Does ``written`` read as a derivation of the subject word ``word`` (module docstring)?"""
    if len(word) < DERIVED_KEEP or as_written(word):
        return False
    kept = common_prefix(word, written)
    added = written[kept:]
    return kept >= max(DERIVED_KEEP, len(word) - DERIVED_DROP) and len(added) <= DERIVED_ADD and \
        all(map(is_ending_letter, added))


def reorderable(pattern: str) -> bool:
    """Can a (folded) subject be found reordered or derived?"""
    if not inflectable(pattern):
        return False
    words = split_words(pattern)[0]
    return 2 <= len(words) <= MAX_WORDS and any(len(w) >= DERIVED_KEEP and not as_written(w) for w in words)


def anchor_of(pattern: str) -> str:
    """The first letters that every form of the subject's longest derivable word keeps."""
    word = max((w for w in split_words(pattern)[0] if len(w) >= DERIVED_KEEP and not as_written(w)), key=len)
    return word[: min(DERIVED_KEEP, len(stem_of(word)))]


@dataclass(frozen=True)
class ReorderedMatch:
    """A mention of ``pattern`` over characters [start, end) of normalised text; ``in_order``: its words
    stand in the subject's order (one of them derived)."""

    pattern: str
    start: int
    end: int
    in_order: bool = False


def _reads_as(word: str, written: str) -> bool:
    return word_matches(word, written) or derived(word, written)


def _assign(words: Sequence[str], written: list[str]) -> bool:
    """Can every subject word be matched to its own text word (each as written, inflected or derived)?"""
    if not words:
        return True
    first, rest = words[0], words[1:]
    return any(_reads_as(first, w) and _assign(rest, written[:i] + written[i + 1:])
               for i, w in enumerate(written))


def _runs(spans: list[tuple[int, int]], text: str, around: int, size: int) -> Iterator[tuple[int, int]]:
    """(first, last) word indices of runs of ``size`` consecutive text words that contain word ``around``."""
    for first in range(max(0, around - size + 1), min(around, len(spans) - size) + 1):
        last = first + size - 1
        if all(_SPACES.fullmatch(text[spans[i][1] : spans[i + 1][0]]) for i in range(first, last)):
            yield first, last


class ReorderedForms(AnchoredForms[tuple[str, tuple[str, ...]]]):
    """The reorder rule over folded subject patterns, each with its subject names (module docstring);
    grows by ``extended`` like the other word-form stages (``lafn_hf.routing.anchors``)."""

    @staticmethod
    def _pairs(named: Named) -> list[tuple[str, tuple[str, tuple[str, ...]]]]:
        return [(anchor_of(pattern), (pattern, names)) for pattern, names in named if reorderable(pattern)]

    def __len__(self) -> int:
        return sum(1 for _ in self._anchors.values())

    def candidates(self, normalized: str) -> list[tuple[str, tuple[str, ...], int]]:
        """(pattern, subject names, anchor start) of every subject anchor at a word start of the text."""
        found = []
        for start, _, values in self._anchors.find(normalized):
            if start == 0 or not _TEXT_WORD.match(normalized, start - 1):
                found += [(pattern, names, start) for pattern, names in values]
        return found

    def matches(self, normalized: str) -> list[tuple[ReorderedMatch, tuple[str, ...]]]:
        """Every mention in already-normalised text (the earliest run around each anchor), with its names."""
        found: dict[tuple[str, int], tuple[ReorderedMatch, tuple[str, ...]]] = {}
        for pattern, names, anchor in self.candidates(normalized):
            match = mention(pattern, normalized, anchor)
            if match is not None:
                found.setdefault((pattern, match.start), (match, names))
        return list(found.values())


@functools.lru_cache(maxsize=65536)
def _shape(pattern: str) -> tuple[tuple[str, ...], list[str], int]:
    """(words, their sorted first 2 letters, ``reach``) of a pattern (the caller must not change them)."""
    words = tuple(split_words(pattern)[0])
    return words, sorted(word[:2] for word in words), len(pattern) + (DERIVED_ADD + 2) * len(words)


def reach(pattern: str) -> int:
    """How far past its anchor's start a mention of ``pattern`` can end at the most (each word derived to
    its longest, separators included)."""
    return _shape(pattern)[2]


def mention(pattern: str, text: str, anchor: int) -> ReorderedMatch | None:
    """The earliest mention of ``pattern`` whose words include the one starting at ``anchor``, if any."""
    words, heads, furthest = _shape(pattern)
    low = max(0, anchor - furthest)
    while low > 0 and _TEXT_WORD.match(text, low - 1):
        low -= 1  # from a word's start: no fragment of a word reads as one
    spans = [m.span() for m in _TEXT_WORD.finditer(text, low, min(len(text), anchor + furthest + 1))]
    around = next((i for i, (start, _) in enumerate(spans) if start == anchor), None)
    if around is None:
        return None
    for first, last in _runs(spans, text, around, len(words)):
        written = [text[s:e] for s, e in spans[first : last + 1]]
        if sorted(word[:2] for word in written) != heads:  # every way a word reads keeps its first 2 letters
            continue
        start, end = spans[first][0], spans[last][1]
        if all(map(_reads_as, words, written)):  # in the subject's order
            if not all(map(word_matches, words, written)) and end < len(text):
                return ReorderedMatch(pattern, start, end, in_order=True)
        elif _assign(words, written):
            return ReorderedMatch(pattern, start, end)
    return None
