"""What a benchmark run is asked and how: ``BenchSettings`` (answer mode, decoding budget, limits) and the
``Question``s of an item. Shared by ``runner`` (which runs them) and ``report`` (which tabulates them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SUBJECT_SEARCHES

#: index -> language -> (subject, questions)
LocalityHard = dict[int, dict[str, tuple[str, list[str]]]]


@dataclass(frozen=True)
class BenchSettings:
    """Answer mode, decoding budget and an item limit.

    ``mode``: ``generate`` (greedy ``generate()``, cut at EOS or a line break after the answer began) or
    ``teacher_forced`` (argmax at each gold position; the secondary mode). In generate mode a question with a
    gold answer gets len(gold tokens) + ``margin`` new tokens; a Locality-Hard question (no gold) gets
    ``free_tokens``. An item's questions are answered ``batch_size`` at a time (left-padded, in question
    order, so the unedited reference and every method see the same batches); 1 answers them one by one.
    ``subject_search``: how far each language's subject is looked for in its question
    (``LafnConfig.subject_search``; "written" edits only languages whose question writes the given subject).
    """

    mode: str = "generate"
    margin: int = 2
    free_tokens: int = 10
    limit: int | None = None
    batch_size: int = 16
    subject_search: str = "aligned"

    def __post_init__(self) -> None:
        if self.mode not in ("generate", "teacher_forced"):
            raise ValueError(f"mode must be 'generate' or 'teacher_forced', got {self.mode!r}")
        if self.margin < 0 or self.free_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"margin must be >= 0, free_tokens >= 1 and limit >= 1, got {self}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.subject_search not in SUBJECT_SEARCHES:
            raise ValueError(f"subject_search must be one of {SUBJECT_SEARCHES}, got {self.subject_search!r}")


@dataclass(frozen=True)
class Question:
    """One question of an item: ``gold`` is the expected answer (None for Locality-Hard); ``target``, of a
    Locality-Hard question, the edit's new answer in its language (an answer naming it was hijacked)."""

    kind: str
    lang: str
    text: str
    subject: str
    gold: str | None
    subject_found: bool  # the question writes one of the forms the item's edit routes on (``zsre.subject_forms``)
    target: str | None = None
