"""Find bank subjects in what the model reads, token by token, with a causal rule.

The rule (the same for a prompt, a later chat turn and the model's own generated tokens, with or without
a KV cache): a subject occurrence fires at the token that completes it, judged only from the text read up
to and including that token.

- Text: each row's tokens are detokenised incrementally (the window-diff method of text streamers), so the
  text known after token t never changes when later tokens arrive; special tokens read as a line break
  and padding reads as nothing. Matching runs on that text with invisible characters (zero-width spaces
  and joiners, soft hyphens) removed and NFC applied, and by default folded (case, accents, punctuation and
  whitespace variants; ``lafn_hf.text.normalize_for_matching``), the subjects likewise.
- Every occurrence of every subject counts (overlapping matches: "Paris" fires at "Paris" even when
  "Paris Hilton" follows, because at that token "Hilton" has not been read yet).
- Word boundaries: a subject whose first (last) character belongs to a script written with spaces does
  not match when the character before (after) it is a letter or digit of such a script: "Rome" does not
  fire inside "Romeo". The character after the subject is looked at only when it is already part of the
  completing token (" Romeo" as one token: no fire); when the subject ends exactly at a token boundary it
  fires, since the next character is not read yet (a generated "Rome" that later continues as "o" keeps
  its edit, in full forwards and cached decoding alike). Scripts written without spaces (CJK, Thai, ...)
  match as plain substrings.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from ahocorasick_rs import AhoCorasick, MatchKind

from .text import clean_subject, needs_word_boundary, normalize_for_matching, skip_ignorable

SPECIAL_TOKEN_TEXT = "\n"  # what a special token (BOS, chat-turn markers, ...) reads as


@dataclass(frozen=True)
class SubjectMatch:
    """A subject found in text: characters [start, end) of the text given to ``SubjectMatcher.find``."""

    subject: str
    start: int
    end: int


@dataclass(frozen=True)
class SubjectHit:
    """A subject found in a token row: ``position`` is the index of the token that completes it."""

    subject: str
    position: int


class SubjectMatcher:
    """Aho-Corasick over cleaned subjects (invisible characters removed, NFC), all overlapping occurrences.

    ``fold`` (default) compares folded text and subjects (``lafn_hf.text.fold_cluster``: case, accents in
    Latin/Greek/Cyrillic, compatibility forms, apostrophe/quote/dash variants, runs of whitespace), so "the
    eiffel tower", "EIFFEL TOWER" and "Eiffel  Tower" find "Eiffel Tower"; ``fold=False`` is exact after NFC.

    ``with_subjects`` grows a matcher without rebuilding it: the existing automata are shared and the new
    subjects get a small automaton of their own (a tier); tiers are merged into one when they pile up.
    Pattern ``i`` is ``patterns[i]``; ``subjects_of[i]`` are the subject names it stands for.
    """

    max_tiers = 4

    def __init__(self, subjects: Iterable[str] = (), fold: bool = True) -> None:
        self.fold = fold
        self.patterns: tuple[str, ...] = ()
        self.subjects_of: tuple[tuple[str, ...], ...] = ()
        self.max_length = 0
        self._tiers: list[tuple[AhoCorasick, int, frozenset[str]]] = []  # (automaton, first pattern, names)
        self._add_tier(subjects)

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(s for names in self.subjects_of for s in names)

    def __contains__(self, subject: object) -> bool:
        return any(subject in names for _, _, names in self._tiers)

    def __len__(self) -> int:
        return len(self.patterns)

    def with_subjects(self, subjects: Iterable[str]) -> SubjectMatcher:
        """A matcher that also finds ``subjects`` (this one is unchanged)."""
        new = [s for s in dict.fromkeys(subjects) if s and s not in self]
        if not new:
            return self
        base = self._tiers[1][1] if len(self._tiers) > 1 else len(self.patterns)
        tail = len(self.patterns) - base
        if tail + len(new) > max(1024, base // 4):  # the small automata hold too much: one new automaton
            return SubjectMatcher([*self.subjects, *new], fold=self.fold)
        grown = object.__new__(SubjectMatcher)
        grown.__dict__.update(self.__dict__)
        grown._tiers = list(self._tiers)
        if len(self._tiers) >= self.max_tiers:  # keep the big automaton, merge the small ones with the new
            new = [s for names in self.subjects_of[base:] for s in names] + new
            grown.patterns, grown.subjects_of = self.patterns[:base], self.subjects_of[:base]
            grown._tiers = grown._tiers[:1]
        grown._add_tier(new)
        return grown

    def _add_tier(self, subjects: Iterable[str]) -> None:
        by_pattern: dict[str, list[str]] = {}
        for subject in subjects:
            cleaned = clean_subject(subject, self.fold) if subject else ""
            if cleaned and subject not in self:
                names = by_pattern.setdefault(cleaned, [])
                if subject not in names:
                    names.append(subject)
        if not by_pattern:
            return
        patterns = tuple(by_pattern)
        tier_names = frozenset(s for subjects_of in by_pattern.values() for s in subjects_of)
        automaton = AhoCorasick(list(patterns), matchkind=MatchKind.Standard)
        self._tiers.append((automaton, len(self.patterns), tier_names))
        self.patterns += patterns
        self.subjects_of += tuple(tuple(by_pattern[p]) for p in patterns)
        self.max_length = max(self.max_length, *(len(p) for p in patterns))

    def raw_matches(self, normalized: str) -> list[tuple[int, int, int]]:
        """(pattern index, start, end) of every occurrence in already-normalised text, boundaries unchecked."""
        found: list[tuple[int, int, int]] = []
        for automaton, first, _ in self._tiers:
            found += [(first + index, start, end)
                      for index, start, end in automaton.find_matches_as_indexes(normalized, overlapping=True)]
        return found

    def find(self, text: str) -> list[SubjectMatch]:
        """Whole-text matches (both neighbours known) with offsets into ``text``; one per subject name."""
        normalized, ends = normalize_for_matching(text, self.fold)
        found = []
        for index, start, end in self.raw_matches(normalized):
            pattern = self.patterns[index]
            if _joins(normalized, start - 1, pattern[0]) or _joins(normalized, end, pattern[-1]):
                continue
            raw_start = skip_ignorable(text, ends[start - 1] if start else 0)
            found += [SubjectMatch(subject, raw_start, ends[end - 1]) for subject in self.subjects_of[index]]
        return sorted(found, key=lambda m: (m.end, m.start))


def _joins(text: str, index: int, edge: str) -> bool:
    """Would ``text[index]`` run into a subject edge character as one word (both of spaced scripts)?"""
    return 0 <= index < len(text) and needs_word_boundary(edge) and needs_word_boundary(text[index])


@dataclass
class RowReader:
    """The text one row has read so far, position by position, decoded incrementally.

    ``pieces[p]`` is the text position ``p`` added ('' for padding, a special token reads as a line
    break) and ``ends[p]`` the length of the text once ``p`` is read. ``tokens[p]`` is the token id read at
    ``p`` (``None`` for padding or a position read elsewhere, e.g. a KV cache this reader did not see).
    """

    decode: Callable[[list[int]], str]
    special_ids: Set[int]
    tokens: list[int | None] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    fired: set[str] = field(default_factory=set)  # entries fired so far in this row (``lafn_hf.routing``)
    _content: list[int] = field(default_factory=list)  # non-special ids fed to the detokeniser
    _prefix_offset: int = 0
    _read_offset: int = 0

    @classmethod
    def unread(cls, decode: Callable[[list[int]], str], special_ids: Set[int], positions: int = 0) -> RowReader:
        """A reader whose first ``positions`` positions were read elsewhere (they read as nothing)."""
        return cls(decode, special_ids, [None] * positions, [""] * positions, [0] * positions)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def clone(self) -> RowReader:
        return RowReader(self.decode, self.special_ids, list(self.tokens), list(self.pieces), list(self.ends),
                         set(self.fired), list(self._content), self._prefix_offset, self._read_offset)

    def prefix(self, length: int) -> RowReader:
        """A reader that has read only the first ``length`` positions (re-read, so the text is that prefix)."""
        unknown = 0
        while unknown < min(length, len(self.tokens)) and self.tokens[unknown] is None:
            unknown += 1
        reader = RowReader.unread(self.decode, self.special_ids, unknown)
        reader.read(self.tokens[unknown:length])
        reader.fired = set(self.fired)  # kept: an entry fired in the cut part does not fire again by key
        return reader

    def read(self, tokens: Sequence[int | None]) -> None:
        """Read ``tokens`` (``None`` = padding)."""
        total = self.ends[-1] if self.ends else 0
        for token in tokens:
            piece = ""
            if token is not None:
                if token in self.special_ids:
                    piece = SPECIAL_TOKEN_TEXT
                else:
                    self._content.append(token)
                    piece = self._next_piece()
            total += len(piece)
            self.tokens.append(token)
            self.pieces.append(piece)
            self.ends.append(total)

    def _next_piece(self) -> str:
        """Text added by the newest content token ('' while a multi-byte character is incomplete)."""
        prefix = self.decode(self._content[self._prefix_offset : self._read_offset])
        full = self.decode(self._content[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._content)
            return full[len(prefix) :]
        return ""

    def hits(self, matcher: SubjectMatcher, first: int) -> list[SubjectHit]:
        """Subjects completed at positions >= ``first`` (see the module docstring for the rule)."""
        if not len(matcher) or first >= len(self.ends):
            return []
        read_before = self.ends[first - 1] if first > 0 else 0
        # the window starts at a position boundary, >= 4x the longest subject (+16) before the new text
        start_position = bisect.bisect_right(self.ends, read_before - 4 * matcher.max_length - 16)
        window_start = self.ends[start_position - 1] if start_position else 0
        normalized, norm_ends = normalize_for_matching("".join(self.pieces[start_position:]), matcher.fold)
        found = []
        for index, start, end in matcher.raw_matches(normalized):
            pattern = matcher.patterns[index]
            raw_end = window_start + norm_ends[end - 1]
            if raw_end <= read_before:
                continue
            if start == 0 and window_start > 0:
                continue  # its left neighbour lies before the window (a subject longer than the window)
            position = _first_reaching(self.ends, raw_end, first)
            if _joins(normalized, start - 1, pattern[0]):
                continue
            next_known = end < len(normalized) and window_start + norm_ends[end] <= self.ends[position]
            if next_known and _joins(normalized, end, pattern[-1]):
                continue
            found += [SubjectHit(subject, position) for subject in matcher.subjects_of[index]]
        return sorted(found, key=lambda h: (h.position, h.subject))  # independent of the matcher's layout


def _first_reaching(ends: Sequence[int], char_end: int, first: int) -> int:
    """Smallest position >= ``first`` whose text end reaches ``char_end``."""
    low, high = first, len(ends) - 1
    while low < high:
        middle = (low + high) // 2
        if ends[middle] >= char_end:
            high = middle
        else:
            low = middle + 1
    return low


def decoder_for(tokenizer: Any) -> Callable[[list[int]], str]:
    """A fast ``ids -> text`` function (the Rust tokenizer's decode, special tokens skipped)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def find_subject_tokens(tokenizer: Any, token_ids: Sequence[int], matcher: SubjectMatcher,
                        special_ids: Set[int] | None = None) -> list[SubjectHit]:
    """Positions (indices into ``token_ids``) of the tokens completing a subject, by the causal rule."""
    special = special_ids if special_ids is not None else frozenset(int(i) for i in tokenizer.all_special_ids)
    reader = RowReader(decoder_for(tokenizer), special)
    reader.read([int(t) for t in token_ids])
    return reader.hits(matcher, 0)
