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
  that forward ("Rome|o" does not fire either; ``RowReader._visible_end``). Elsewhere a subject that ends
  where a token ends fires, since the next character is not known: a generated "Rome" that continues as
  "o" at the next decoding step keeps its edit. This is the one place where a text read in one forward
  and the same text read in pieces (a KV cache, decoding) can differ. Scripts written without spaces
  (CJK, Thai, ...) match as plain substrings.
- Inflected subjects (``lafn_hf.inflection``; those the caller names, folded matching only) also fire
  with their word endings changed, once per mention, at the first token whose text shows the mention is
  not the subject as written ("Антона Минарика" at "ка" of "Мин|ари|ка"); as written, the rules above apply.
  Like "Rome" before "o", a word whose ending later runs past the limit ("Моск|вич|ами") has fired by
  then; ``find``, which sees whole words, does not count it. Their multi-word subjects also fire with
  the words reordered or derived (``lafn_hf.reorder``: "собор Инсбрука" for "Инсбрукский собор"), once
  per mention, at the first token whose text makes the mention one.
- Spelled subjects (``lafn_hf.spelling``; with ``spellings``, folded matching only): subjects written in Thai,
  Lao, Khmer or Myanmar script also fire spelled another way (a transliteration variant), at the token that
  reads the mention's last letter.
"""

from __future__ import annotations

import bisect
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from ahocorasick_rs import AhoCorasick, MatchKind

from .inflection import InflectedForms, InflectedMatch
from .reorder import ReorderedForms, ReorderedMatch, mention, reach
from .spelling import SpelledForms, SpelledMatch
from .text import clean_subject, is_ignorable, needs_word_boundary, normalize_for_matching, skip_ignorable

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
    ``inflected``: found with its word endings changed (``lafn_hf.inflection``), not as written;
    ``spelled``: found spelled another way (``lafn_hf.spelling``)."""

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
    ``lafn_hf.inflection`` ("Антона Минарика" for "Антон Минарик"); folded matching only.

    ``spellings``: subjects written in scripts whose transliterations vary letter by letter (Thai, ...) are
    also found spelled another way (``lafn_hf.spelling``: "โจเซฟ แพปป์" for "โจเซฟ แปป"); folded matching only.

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
        automaton = AhoCorasick(list(patterns), matchkind=MatchKind.Standard)
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
            if _joins(normalized, start - 1, pattern[0]) or _joins(normalized, end, pattern[-1]):
                continue
            raw_start = skip_ignorable(text, ends[start - 1] if start else 0)
            found += [SubjectMatch(subject, raw_start, ends[end - 1]) for subject in self.subjects_of[index]]
        for match, names in self.inflected_matches(normalized):
            if not _whole_mention(match, normalized):
                continue
            raw_start = skip_ignorable(text, ends[match.start - 1] if match.start else 0)
            found += [SubjectMatch(subject, raw_start, ends[match.run_end - 1]) for subject in names]
        mentions: list[tuple[SpelledMatch | ReorderedMatch, tuple[str, ...]]] = [
            *self.spelled_matches(normalized), *self.reordered_matches(normalized)]
        for span, names in mentions:
            raw_start = skip_ignorable(text, ends[span.start - 1] if span.start else 0)
            found += [SubjectMatch(subject, raw_start, ends[span.end - 1]) for subject in names]
        return sorted(set(found), key=lambda m: (m.end, m.start, m.subject))


def _whole_mention(match: InflectedMatch, normalized: str) -> bool:
    """Is an inflected match, its word read to the end, a mention? Not with too long an ending, a cut-short
    word, the word going on ("2"), or the exact form (the exact stage's)."""
    word, ending = match.last_word_ending(normalized, match.run_end)
    return match.reads_whole(word, ending, complete=True) and not _joins(normalized, match.run_end, "a") \
        and normalized[match.start : match.run_end] != match.pattern


def _joins(text: str, index: int, edge: str) -> bool:
    """Would ``text[index]`` run into a subject edge character as one word (both of spaced scripts)?"""
    return 0 <= index < len(text) and needs_word_boundary(edge) and needs_word_boundary(text[index])


@dataclass
class RowReader:
    """The text one row has read so far, position by position, decoded incrementally.

    ``pieces[p]`` is the text position ``p`` added ('' for padding, a special token reads as a line
    break) and ``ends[p]`` the length of the text once ``p`` is read. ``tokens[p]`` is the token id read at
    ``p`` (``None`` for padding or a position read elsewhere, e.g. a KV cache this reader did not see).
    ``whole_until``: how many positions the first ``read`` call (one forward) read when it read the text
    from its start (a prompt, padding included; 0 otherwise): those are judged knowing all of them
    (``_visible_end``).
    """

    decode: Callable[[list[int]], str]
    special_ids: Set[int]
    tokens: list[int | None] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    fired: set[str] = field(default_factory=set)  # entries fired so far in this row (``lafn_hf.routing``)
    whole_until: int = 0
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
                         set(self.fired), self.whole_until, list(self._content), self._prefix_offset,
                         self._read_offset)

    def prefix(self, length: int) -> RowReader:
        """A reader that has read only the first ``length`` positions (re-read, so the text is that prefix)."""
        unknown = 0
        while unknown < min(length, len(self.tokens)) and self.tokens[unknown] is None:
            unknown += 1
        reader = RowReader.unread(self.decode, self.special_ids, unknown)
        reader.read(self.tokens[unknown:length])
        reader.whole_until = min(self.whole_until, length)  # as it was read, not as re-read here
        reader.fired = set(self.fired)  # kept: an entry fired in the cut part does not fire again by key
        return reader

    def read(self, tokens: Sequence[int | None]) -> None:
        """Read ``tokens`` (``None`` = padding)."""
        total = self.ends[-1] if self.ends else 0
        if not self.tokens:
            self.whole_until = len(tokens)
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

    def _visible_end(self, position: int) -> int:
        """The text length known when ``position`` was judged: the whole first forward (``read`` call) for
        a position it read, when it read the text from its start (a prompt); else the text up to
        ``position``. Later forwards may carry draft tokens that are rolled back (assisted decoding reads
        the last token with its drafts, then crops the cache), so they judge token by token."""
        return self.ends[self.whole_until - 1] if position < self.whole_until else self.ends[position]

    def hits(self, matcher: SubjectMatcher, first: int) -> list[SubjectHit]:
        """Subjects completed at positions >= ``first`` (see the module docstring for the rule)."""
        if not len(matcher) or first >= len(self.ends):
            return []
        read_before = self.ends[first - 1] if first > 0 else 0
        start_position, window_start, window, normalized, norm_ends = self._window(matcher, read_before)
        found = []
        for index, start, end in matcher.raw_matches(normalized):
            pattern = matcher.patterns[index]
            raw_end = window_start + _raw_end(window, norm_ends, end)
            if raw_end <= read_before:
                continue
            if start == 0 and window_start > 0:
                continue  # its left neighbour lies before the window (a subject longer than the window)
            position = _first_reaching(self.ends, raw_end, first)
            if _joins(normalized, start - 1, pattern[0]):
                continue
            next_known = end < len(normalized) and window_start + norm_ends[end] <= self._visible_end(position)
            if next_known and _joins(normalized, end, pattern[-1]):
                continue
            found += [SubjectHit(subject, position) for subject in matcher.subjects_of[index]]
        raw_ends: list[int] | None = None
        for match, names in matcher.inflected_matches(normalized):
            if match.start == 0 and window_start > 0:
                continue
            if raw_ends is None:
                raw_ends = [window_start + e for e in norm_ends]
            fires = self._inflected_position(match, normalized, raw_ends)
            if fires is not None and fires >= first:
                found += [SubjectHit(subject, fires, inflected=True) for subject in names]
        found += self._reordered_hits(matcher, normalized, norm_ends, window, window_start, read_before, first)
        if matcher.spells:
            spelled_start = self._letters_back(start_position, first, 3 * matcher.max_length + 2)
            if spelled_start < start_position:  # spaces or marks stretch the window: read further back
                window_start = self.ends[spelled_start - 1] if spelled_start else 0
                window = "".join(self.pieces[spelled_start:])
                normalized, norm_ends = normalize_for_matching(window, matcher.fold)
            found += self._spelled_hits(matcher, normalized, norm_ends, window, window_start, read_before, first)
        return sorted(set(found), key=lambda h: (h.position, h.subject))  # independent of the matcher's layout

    def _window(self, matcher: SubjectMatcher, read_before: int) -> tuple[int, int, str, str, Sequence[int]]:
        """(first position, its raw offset, raw text, normalised text, ends) of the text matched at a step.

        It starts at a position boundary >= 4x the longest subject (+16) raw characters before the new text,
        and further back while fewer than 2x that (+16) normalised characters lie before it (zero-width
        characters and runs of spaces read as little or nothing: a mention may stretch over many)."""
        reach, needed = 4 * matcher.max_length + 16, 2 * matcher.max_length + 16
        while True:
            start_position = bisect.bisect_right(self.ends, read_before - reach)
            window_start = self.ends[start_position - 1] if start_position else 0
            window = "".join(self.pieces[start_position:])
            normalized, norm_ends = normalize_for_matching(window, matcher.fold)
            if not start_position or bisect.bisect_right(norm_ends, read_before - window_start) >= needed:
                return start_position, window_start, window, normalized, norm_ends
            reach *= 4

    def _reordered_hits(self, matcher: SubjectMatcher, normalized: str, norm_ends: Sequence[int], window: str,
                        window_start: int, read_before: int, first: int) -> list[SubjectHit]:
        """Reordered mentions that fire at positions >= ``first``: each at the first position whose text
        makes it a mention (judged on the text up to that position only), once per mention; a run in the
        subject's order not where the inflection stage fires on it."""
        candidates = matcher.reorder_candidates(normalized)
        if not candidates:
            return []
        raw_ends = [window_start + e for e in norm_ends]
        read = bisect.bisect_right(norm_ends, read_before - window_start)  # normalised text read before

        def at(position: int, pattern: str, anchor: int) -> ReorderedMatch | None:
            """The mention the text up to ``position`` makes around ``anchor``."""
            return mention(pattern, normalized[: bisect.bisect_right(norm_ends, self.ends[position] - window_start)],
                           anchor)

        hits, seen = [], set()
        for pattern, names, anchor in candidates:
            furthest = anchor + reach(pattern)  # a mention around the anchor ends before this
            if furthest < read:
                continue  # all of it was read before: decided at an earlier step
            earliest = _first_reaching(self.ends, raw_ends[anchor], 0)
            if earliest < first and at(first - 1, pattern, anchor) is not None:
                continue  # a mention by then: it fired at or before that position
            for position in range(max(first, earliest), len(self.ends)):
                match = at(position, pattern, anchor)
                if match is not None:
                    fresh = (pattern, match.start) not in seen and not (match.start == 0 and window_start > 0)
                    seen.add((pattern, match.start))
                    if fresh and not any(at(q, pattern, anchor) for q in range(earliest, first - 1)) and not (
                            match.in_order and self._inflection_fires(matcher, pattern, match.start, normalized, raw_ends)):
                        hits += [SubjectHit(subject, position, inflected=True) for subject in names]
                    break
                if self.ends[position] - window_start >= norm_ends[min(furthest, len(norm_ends) - 1)]:
                    break
        return hits

    def _inflection_fires(self, matcher: SubjectMatcher, pattern: str, start: int, normalized: str,
                          raw_ends: Sequence[int]) -> bool:
        return any(m.pattern == pattern and m.start == start and self._inflected_position(m, normalized, raw_ends)
                   is not None for m, _ in matcher.inflected_matches(normalized))

    def _letters_back(self, start_position: int, first: int, letters: int) -> int:
        """The latest position <= ``start_position`` from which at least ``letters`` letters (not spaces,
        invisible characters or combining marks) are read before ``first``: the spelling stage's look-back."""
        position, count = first, 0
        while position > 0 and (count < letters or position > start_position):
            position -= 1
            count += sum(1 for char in self.pieces[position]
                         if not (char.isspace() or unicodedata.combining(char) or is_ignorable(char)))
        return position

    def _spelled_hits(self, matcher: SubjectMatcher, normalized: str, norm_ends: Sequence[int], window: str,
                      window_start: int, read_before: int, first: int) -> list[SubjectHit]:
        """Spelled mentions whose last letter is read at positions >= ``first``: they fire at the token that
        reads that letter (its marks of combining class > 0, which may come with the next token, are not
        waited for; the comparison leaves them out)."""
        hits = []
        after = bisect.bisect_right(norm_ends, read_before - window_start)
        for match, names in matcher.spelled_matches(normalized, after):
            if match.start == 0 and window_start > 0:
                continue
            letter = match.end - 1
            while letter > 0 and norm_ends[letter - 1] == norm_ends[letter]:
                letter -= 1  # the first character a raw one folded into ("ำ" reads as "ํา")
            letter_end = window_start + skip_ignorable(window, norm_ends[letter - 1] if letter else 0) + 1
            if letter_end > read_before:
                position = _first_reaching(self.ends, letter_end, first)
                hits += [SubjectHit(subject, position, spelled=True) for subject in names]
        return hits

    def _inflected_position(self, match: InflectedMatch, normalized: str, raw_ends: Sequence[int]) -> int | None:
        """The position at which an inflected mention fires, judged token by token (the causal rule): not
        where the whole mention is the subject as written (the exact stage fires there); otherwise at the
        first position where the last word so far is that word as written ("Лукреции Борджиа" at "а") or
        has left it by 1-``MAX_ENDING`` letters ("Минарика" at "ка"). Where that position's forward read the
        word to its end, the word as a whole must be a mention (``find``'s rule: not "Минарикович").
        ``None`` when it never fires."""
        position = _first_reaching(self.ends, raw_ends[match.stem_end - 1], 0)
        run = match.run_end - match.stem_end
        while position < len(self.ends):
            seen = self._visible_end(position)
            if raw_ends[match.run_end - 1] <= seen and (match.last_word_ending(normalized, match.run_end)[1] is None or (
                    match.run_end < len(normalized) and raw_ends[match.run_end] <= seen
                    and not _whole_mention(match, normalized))):
                return None  # the forward read the word: too long an ending, or no mention (or the exact stage's)
            known = 0
            while known < run and raw_ends[match.stem_end + known] <= self.ends[position]:
                known += 1
            after = match.stem_end + known
            complete = known == run and after < len(normalized) and raw_ends[after] <= self.ends[position]
            if complete and _joins(normalized, after, "a"):
                return None  # the word goes on with a digit
            if match.text(normalized, known) == match.pattern and not (
                    after < len(normalized) and raw_ends[after] <= seen
                    and _joins(normalized, after, match.pattern[-1])):
                return None  # the subject as written: the exact stage fires there
            word, ending = match.last_word_ending(normalized, after)
            if ending is None:
                return None
            if match.reads_whole(word, ending, complete):
                return position  # a zero ending ("яблок") fires once the word is seen to end
            if complete or (known == run and after >= len(normalized)):
                return None  # a word cut short ("Минари"), or nothing more read yet
            position += 1
        return None


def _raw_end(raw: str, norm_ends: Sequence[int], end: int) -> int:
    """Where in ``raw`` the normalised text up to ``end`` ends. Inside a cluster (a letter whose marks go on
    after the match: "ฉ" of "ฉ่") it is the raw character's own end when the cluster kept its characters
    one for one, so that a mark read later does not move it (the match fired at the letter's token)."""
    cluster_end = norm_ends[end - 1]
    if end >= len(norm_ends) or norm_ends[end] != cluster_end:
        return cluster_end
    first = end - 1
    while first > 0 and norm_ends[first - 1] == cluster_end:
        first -= 1
    last = end
    while last < len(norm_ends) and norm_ends[last] == cluster_end:
        last += 1
    start = norm_ends[first - 1] if first else 0
    kept = [i for i in range(start, cluster_end) if not is_ignorable(raw[i])]
    return kept[end - 1 - first] + 1 if len(kept) == last - first else cluster_end


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
