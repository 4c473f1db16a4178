"""Find bank subjects in model inputs and map them to token positions.

Subjects are searched with an Aho-Corasick automaton (``ahocorasick-rs``, leftmost-longest)
over the NFC-normalised decoded text of each row. Character spans become token positions
through the fast tokenizer's offset mapping of that text; when re-encoding the decoded
text does not give back the row's ids (rare: lossy decoding, non-NFC input), the last
subject token is found by decoding growing prefixes of the row (binary search).
"""

from __future__ import annotations

import bisect
import logging
import unicodedata
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from typing import Any

from ahocorasick_rs import AhoCorasick, MatchKind

from .config import nfc
from .tokens import char_ends

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubjectMatch:
    """A subject found in text: characters [start, end) of the NFC text."""

    subject: str
    start: int
    end: int


@dataclass(frozen=True)
class SubjectHit:
    """A subject found in a token row: ``position`` is the index of its last token."""

    subject: str
    position: int


class SubjectMatcher:
    """Aho-Corasick over a fixed set of subjects (NFC), leftmost-longest, non-overlapping."""

    def __init__(self, subjects: Iterable[str]) -> None:
        self.subjects: tuple[str, ...] = tuple(dict.fromkeys(nfc(s) for s in subjects if s))
        self._automaton = AhoCorasick(list(self.subjects), matchkind=MatchKind.LeftmostLongest) if self.subjects else None

    def find(self, text: str) -> list[SubjectMatch]:
        """Matches in ``text`` (normalised to NFC first; offsets refer to the NFC text)."""
        if self._automaton is None:
            return []
        text = nfc(text)
        return [
            SubjectMatch(self.subjects[index], start, end)
            for index, start, end in self._automaton.find_matches_as_indexes(text)
        ]


def last_token_index(token_ends: Sequence[int], char_end: int) -> int | None:
    """Index of the first token whose character end reaches ``char_end`` (the subject's last token)."""
    index = bisect.bisect_left(token_ends, char_end)
    return index if index < len(token_ends) else None


def find_subject_tokens(tokenizer: Any, token_ids: Sequence[int], matcher: SubjectMatcher,
                        special_ids: Set[int] | None = None) -> list[SubjectHit]:
    """Last-token positions (indices into ``token_ids``) of every subject found in the row.

    Special tokens (BOS, padding, ...) are skipped when decoding and never part of a match;
    ``special_ids`` lets a caller that matches many rows compute them once.
    """
    special = special_ids if special_ids is not None else set(tokenizer.all_special_ids)
    positions = [i for i, token in enumerate(token_ids) if int(token) not in special]
    content = [int(token_ids[i]) for i in positions]
    if not content:
        return []
    text = nfc(tokenizer.decode(content, clean_up_tokenization_spaces=False))
    matches = matcher.find(text)
    if not matches:
        return []
    token_ends = _token_ends_from_offsets(tokenizer, text, content)
    hits = []
    for match in matches:
        if token_ends is not None:
            index = last_token_index(token_ends, match.end)
        else:
            index = _last_token_by_prefix_decoding(tokenizer, content, match)
        if index is None:
            logger.debug("could not map subject %r to a token; skipped", match.subject)
            continue
        hits.append(SubjectHit(match.subject, positions[index]))
    return hits


def _token_ends_from_offsets(tokenizer: Any, text: str, content: list[int]) -> list[int] | None:
    """Character end of each token of ``text``, if re-encoding ``text`` reproduces ``content``."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != content:
        return None
    return char_ends(encoded["offset_mapping"])


def _last_token_by_prefix_decoding(tokenizer: Any, content: list[int], match: SubjectMatch) -> int | None:
    """Smallest k such that the decoded prefix ``content[:k+1]`` already holds the whole subject."""

    def holds_subject(k: int) -> bool:
        prefix = unicodedata.normalize("NFC", tokenizer.decode(content[: k + 1], clean_up_tokenization_spaces=False))
        return prefix[match.start : match.end] == match.subject

    low, high = 0, len(content) - 1
    if not holds_subject(high):
        return None
    while low < high:
        middle = (low + high) // 2
        if holds_subject(middle):
            high = middle
        else:
            low = middle + 1
    return low
