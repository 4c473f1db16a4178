"""Find bank subjects in what the model reads, token by token, with a causal rule.

The rule (the same for a prompt, a later chat turn and the model's own generated tokens, with or without
a KV cache): a subject occurrence fires at the token that completes it, judged from the text read up to
and including that token, and, for whether its word goes on, in a text read from its start in one forward
(a prompt), from the rest of that forward.

- Text: each row's tokens are detokenised incrementally (the window-diff method of text streamers), so the
  text known after token t never changes when later tokens arrive; special tokens read as a line break
  and padding reads as nothing. Matching runs on that text with invisible characters (zero-width spaces
  and joiners, soft hyphens) removed and NFC applied, and by default folded (case, accents, punctuation and
  whitespace variants; ``lafn_hf.text.normalize_for_matching``), the subjects likewise.
- Every occurrence of every subject counts (overlapping matches: "Paris" fires at "Paris" even when
  "Paris Hilton" follows, because at that token "Hilton" has not been read yet).
- Word boundaries: a subject whose first (last) character belongs to a script written with spaces does
  not match when the character before (after) it is a letter or digit of such a script: "Rome" does not
  fire inside "Romeo". The character after the subject is looked at in the completing token (" Romeo"
  as one token) and, in a text read from its start in one forward (a prompt), in the later tokens of
  that forward ("Rome|o" does not fire either; ``lafn_hf.routing.row_reader``). Elsewhere a subject that ends
  where a token ends fires, since the next character is not known: a generated "Rome" that continues as
  "o" at the next decoding step keeps its edit. This is the one place where a text read in one forward
  and the same text read in pieces (a KV cache, decoding) can differ. Scripts written without spaces
  (CJK, Thai, ...) match as plain substrings.
- Inflected subjects (``lafn_hf.routing.inflection``; those the caller names, folded matching only) also fire
  with their word endings changed, once per mention, at the first token whose text shows the mention is
  not the subject as written ("Антона Минарика" at "ка" of "Мин|ари|ка"); as written, the rules above apply.
  Like "Rome" before "o", a word whose ending later runs past the limit ("Моск|вич|ами") has fired by
  then; ``find``, which sees whole words, does not count it. Their multi-word subjects also fire with
  the words reordered or derived (``lafn_hf.routing.reorder``: "собор Инсбрука" for "Инсбрукский собор"), once
  per mention, at the first token whose text makes the mention one.
- Spelled subjects (``lafn_hf.routing.spelling``; with ``spellings``, folded matching only): subjects written in Thai,
  Lao, Khmer or Myanmar script also fire spelled another way (a transliteration variant), at the token that
  reads the mention's last letter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ahocorasick_rs import AhoCorasick, Implementation, MatchKind

from ..text import clean_subject, needs_word_boundary, normalize_for_matching, skip_ignorable
from .inflection import InflectedForms, InflectedMatch
from .reorder import ReorderedForms, ReorderedMatch
from .spelling import SpelledForms, SpelledMatch

SPECIAL_TOKEN_TEXT = "\n"  # what a special token (BOS, chat-turn markers, ...) reads as


@dataclass(frozen=True)
class SubjectMatch:
    """A subject found in text: characters [start, end) of the text given to ``SubjectMatcher.find``."""

    subject: str
    start: int
    end: int


@dataclass(frozen=True)
class SubjectHit:
    """A subject found in a token row: ``position`` is the index of the token that completes it;
    ``inflected``: found with its word endings changed (``lafn_hf.routing.inflection``), not as written;
    ``spelled``: found spelled another way (``lafn_hf.routing.spelling``)."""

    subject: str
    position: int
    inflected: bool = False
    spelled: bool = False


class SubjectMatcher:
    """Aho-Corasick over cleaned subjects (invisible characters removed, NFC), all overlapping occurrences.

    ``fold`` (default) compares folded text and subjects (``lafn_hf.text.fold_cluster``: case, accents in
    Latin/Greek/Cyrillic, compatibility forms, apostrophe variants; quotes, dashes and runs of whitespace as
    one space; a subject's final full stop optional), so "the eiffel tower", "EIFFEL TOWER" and "«Eiffel
    Tower»" find "Eiffel Tower"; ``fold=False`` is exact after NFC.

    ``inflected``: subjects (of ``subjects``) also found with their word endings changed, by the rule of
    ``lafn_hf.routing.inflection`` ("Антона Минарика" for "Антон Минарик"); folded matching only.

    ``spellings``: subjects written in scripts whose transliterations vary letter by letter (Thai, ...) are
    also found spelled another way (``lafn_hf.routing.spelling``: "โจเซฟ แพปป์" for "โจเซฟ แปป"); folded matching only.

    ``with_subjects`` grows a matcher without rebuilding it: the existing automata are shared and the new
    subjects get a small automaton of their own (a tier); tiers are merged into one when they pile up.
    Pattern ``i`` is ``patterns[i]``; ``subjects_of[i]`` are the subject names it stands for.
    """

    max_tiers = 4

    def __init__(self, subjects: Iterable[str] = (), fold: bool = True, inflected: Iterable[str] = (),
                 spellings: bool = False) -> None:
        self.fold = fold
        self.spellings = spellings and fold
        self._spelled = SpelledForms()  # grown by ``_add_tier`` when ``spellings``
        self.patterns: tuple[str, ...] = ()
        self.subjects_of: tuple[tuple[str, ...], ...] = ()
        self.max_length = 0
        self._tiers: list[tuple[AhoCorasick, int, frozenset[str]]] = []  # (automaton, first pattern, names)
        cleaned = self._add_tier(subjects)
        self.inflected: frozenset[str] = frozenset()
        self._inflected = InflectedForms()
        self._reordered = ReorderedForms()
        self._set_inflected(inflected, cleaned)

    def _set_inflected(self, subjects: Iterable[str], cleaned: Mapping[str, str] | None = None) -> None:
        """Let ``subjects`` (those already in the matcher) inflect too; grows the inflection index.
        ``cleaned``: their patterns where known (else folded here)."""
        new = sorted({s for s in subjects if s not in self.inflected and s in self}) if self.fold else []
        if new:
            self.inflected = self.inflected | frozenset(new)
            patterns = {s: cleaned[s] if cleaned and s in cleaned else clean_subject(s, True) for s in new}
            named = self._named(patterns)
            self._inflected = self._inflected.extended(named)
            self._reordered = self._reordered.extended(named)

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(s for names in self.subjects_of for s in names)

    def __contains__(self, subject: object) -> bool:
        return any(subject in names for _, _, names in self._tiers)

    def __len__(self) -> int:
        return len(self.patterns)

    def with_subjects(self, subjects: Iterable[str], inflected: Iterable[str] = ()) -> SubjectMatcher:
        """A matcher that also finds ``subjects`` (and inflects ``inflected``); this one is unchanged."""
        new = [s for s in dict.fromkeys(subjects) if s and s not in self]
        inflect = [s for s in inflected if s not in self.inflected]
        if not new:
            if not inflect:
                return self
            grown = object.__new__(SubjectMatcher)
            grown.__dict__.update(self.__dict__)
            grown._set_inflected(inflect)
            return grown
        base = self._tiers[1][1] if len(self._tiers) > 1 else len(self.patterns)
        tail = len(self.patterns) - base
        if tail + len(new) > max(1024, base // 4):  # the small automata hold too much: one new automaton
            return SubjectMatcher([*self.subjects, *new], fold=self.fold, inflected=[*self.inflected, *inflect],
                                  spellings=self.spellings)
        grown = object.__new__(SubjectMatcher)
        grown.__dict__.update(self.__dict__)
        grown._tiers = list(self._tiers)
        if len(self._tiers) >= self.max_tiers:  # keep the big automaton, merge the small ones with the new
            new = [s for names in self.subjects_of[base:] for s in names] + new
            grown.patterns, grown.subjects_of = self.patterns[:base], self.subjects_of[:base]
            grown._tiers = grown._tiers[:1]
        cleaned = grown._add_tier(new)
        grown._set_inflected(inflect, cleaned)
        return grown

    @staticmethod
    def _named(cleaned: Mapping[str, str]) -> list[tuple[str, tuple[str, ...]]]:
        """(pattern, subject names) pairs of a subject -> pattern mapping."""
        named: dict[str, list[str]] = {}
        for subject, pattern in cleaned.items():
            named.setdefault(pattern, []).append(subject)
        return [(pattern, tuple(names)) for pattern, names in named.items()]

    def _add_tier(self, subjects: Iterable[str]) -> dict[str, str]:
        """Add a tier for ``subjects``; returns subject -> pattern for the subjects added."""
        by_pattern: dict[str, list[str]] = {}
        added: dict[str, str] = {}
        for subject in subjects:
            cleaned = clean_subject(subject, self.fold) if subject else ""
            if cleaned and subject not in self:
                names = by_pattern.setdefault(cleaned, [])
                if subject not in names:
                    names.append(subject)
                    added[subject] = cleaned
        if not by_pattern:
            return added
        patterns = tuple(by_pattern)
        tier_names = frozenset(s for subjects_of in by_pattern.values() for s in subjects_of)
        # A contiguous NFA builds in time linear in the patterns' length; the DFA the library picks for a few
        # patterns took 3 s for one 27,000-character subject (searching short texts is as fast either way).
        automaton = AhoCorasick(list(patterns), matchkind=MatchKind.Standard, implementation=Implementation.ContiguousNFA)
        self._tiers.append((automaton, len(self.patterns), tier_names))
        self.patterns += patterns
        self.subjects_of += tuple(tuple(by_pattern[p]) for p in patterns)
        self.max_length = max(self.max_length, *(len(p) for p in patterns))
        if self.spellings:
            self._spelled = self._spelled.extended(self._named(added))
        return added

    def raw_matches(self, normalized: str) -> list[tuple[int, int, int]]:
        """(pattern index, start, end) of every occurrence in already-normalised text, boundaries unchecked."""
        found: list[tuple[int, int, int]] = []
        for automaton, first, _ in self._tiers:
            found += [(first + index, start, end)
                      for index, start, end in automaton.find_matches_as_indexes(normalized, overlapping=True)]
        return found

    def inflected_matches(self, normalized: str) -> list[tuple[InflectedMatch, tuple[str, ...]]]:
        """Mentions of inflected subjects in already-normalised text with their subject names, endings unchecked."""
        return self._inflected.matches(normalized)

    def reordered_matches(self, normalized: str) -> list[tuple[ReorderedMatch, tuple[str, ...]]]:
        """Mentions of inflected subjects reordered or derived in already-normalised text, with their names."""
        return self._reordered.matches(normalized) if self._reordered else []

    def reorder_candidates(self, normalized: str) -> list[tuple[str, tuple[str, ...], int]]:
        """(pattern, names, anchor start) of the reorder stage's anchors in already-normalised text."""
        return self._reordered.candidates(normalized) if self._reordered else []

    @property
    def spells(self) -> bool:
        """Does any subject take part in the spelling stage (else it costs nothing per token)?"""
        return self.spellings and bool(self._spelled)

    def spelled_matches(self, normalized: str, after: int = 0) -> list[tuple[SpelledMatch, tuple[str, ...]]]:
        """Mentions spelled another way in already-normalised text ending past index ``after``, with their names."""
        return self._spelled.matches(normalized, after) if self.spells else []

    def find(self, text: str) -> list[SubjectMatch]:
        """Whole-text matches (both neighbours known) with offsets into ``text``; one per subject name."""
        normalized, ends = normalize_for_matching(text, self.fold)
        found = []
        for index, start, end in self.raw_matches(normalized):
            pattern = self.patterns[index]
            if joins_word(normalized, start - 1, pattern[0]) or joins_word(normalized, end, pattern[-1]):
                continue
            raw_start = skip_ignorable(text, ends[start - 1] if start else 0)
            found += [SubjectMatch(subject, raw_start, ends[end - 1]) for subject in self.subjects_of[index]]
        for match, names in self.inflected_matches(normalized):
            if not whole_mention(match, normalized):
                continue
            raw_start = skip_ignorable(text, ends[match.start - 1] if match.start else 0)
            found += [SubjectMatch(subject, raw_start, ends[match.run_end - 1]) for subject in names]
        mentions: list[tuple[SpelledMatch | ReorderedMatch, tuple[str, ...]]] = [
            *self.spelled_matches(normalized), *self.reordered_matches(normalized)]
        for span, names in mentions:
            raw_start = skip_ignorable(text, ends[span.start - 1] if span.start else 0)
            found += [SubjectMatch(subject, raw_start, ends[span.end - 1]) for subject in names]
        return sorted(set(found), key=lambda m: (m.end, m.start, m.subject))


def whole_mention(match: InflectedMatch, normalized: str) -> bool:
    """Is an inflected match, its word read to the end, a mention? Not with too long an ending, a cut-short
    word, the word going on ("2"), or the exact form (the exact stage's)."""
    word, ending = match.last_word_ending(normalized, match.run_end)
    return match.reads_whole(word, ending, complete=True) and not joins_word(normalized, match.run_end, "a") \
        and normalized[match.start : match.run_end] != match.pattern


def joins_word(text: str, index: int, edge: str) -> bool:
    """Would ``text[index]`` run into a subject edge character as one word (both of spaced scripts)?"""
    return 0 <= index < len(text) and needs_word_boundary(edge) and needs_word_boundary(text[index])
