"""Each batch row's reading: its tokens detokenised incrementally and the subjects they complete.

``RowReader`` applies ``lafn_hf.routing.matcher``'s causal rule to a row of token ids, a forward at a time: the
text known after a token never changes when later tokens arrive, so a prompt read in one forward and the
same tokens read through a KV cache fire the same subjects at the same positions (the one exception, a
word that goes on in a later forward, is described there). The readers are stored per row on the
transformers ``Cache`` (``lafn_hf.routing.cache_rows``) and consulted by the edit hooks (``lafn_hf.runtime.inject``).
"""

from __future__ import annotations

import bisect
import unicodedata
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from ..text import is_ignorable, normalize_for_matching, skip_ignorable
from .inflection import InflectedMatch
from .matcher import SPECIAL_TOKEN_TEXT, SubjectHit, SubjectMatcher, joins_word, whole_mention
from .reorder import ReorderedMatch, mention, reach


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
            if joins_word(normalized, start - 1, pattern[0]):
                continue
            next_known = end < len(normalized) and window_start + norm_ends[end] <= self._visible_end(position)
            if next_known and joins_word(normalized, end, pattern[-1]):
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
                    and not whole_mention(match, normalized))):
                return None  # the forward read the word: too long an ending, or no mention (or the exact stage's)
            known = 0
            while known < run and raw_ends[match.stem_end + known] <= self.ends[position]:
                known += 1
            after = match.stem_end + known
            complete = known == run and after < len(normalized) and raw_ends[after] <= self.ends[position]
            if complete and joins_word(normalized, after, "a"):
                return None  # the word goes on with a digit
            if match.text(normalized, known) == match.pattern and not (
                    after < len(normalized) and raw_ends[after] <= seen
                    and joins_word(normalized, after, match.pattern[-1])):
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


def subject_token_positions(tokenizer: Any, token_ids: Sequence[int], matcher: SubjectMatcher) -> list[int]:
    """Positions of the tokens completing a subject of ``matcher`` in ``token_ids``: where dV is trained and where
    a routing key is read, by the rule inference applies."""
    return [hit.position for hit in find_subject_tokens(tokenizer, token_ids, matcher)]
