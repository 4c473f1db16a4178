"""An edit prepared once: what every step of ``edit()`` reads about a group, worked out before any of them.

``PreparedEdit.build(group, config)`` makes, per language of the group (after its subjects were resolved and
its paraphrases written):

- ``subject``: the matcher of the subject alone, the inference rule (``lafn_hf.routing.matcher``) for where
  dV is trained; ``subject_positions`` reads it on a training sequence's tokens;
- ``forms``: the matcher of the subject and its aliases, where the routing key is read (``routing.keys``);
- ``questions``: the questions dV is trained on besides the prompt: word-dropped variants of the prompt
  (``LafnConfig.question_variants``) and the first ``train_paraphrases`` paraphrases;
- ``kl_prompt``: the prompt whose next-token distribution the edit keeps (Eq. 8's q_l).

Preflight and locating read ``group``; optimising (``optimize.build_batch``) reads the questions, positions and
KL prompts; the routing key reads ``forms``; the stored entry reads the group's prompts and targets. Subject
token positions are computed by one function, ``routing.row_reader.subject_token_positions``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import LafnConfig
from ..request import EditGroup, LanguageEdit
from ..routing.matcher import SubjectMatcher
from ..routing.row_reader import subject_token_positions
from .paraphrase import word_dropped_variants


@dataclass(frozen=True)
class PreparedLanguage:
    """One language's side of a prepared edit (see the module docstring)."""

    edit: LanguageEdit
    subject: SubjectMatcher
    forms: SubjectMatcher
    questions: tuple[str, ...]
    kl_prompt: str

    def subject_positions(self, tokenizer: Any, ids: Sequence[int], context: str) -> list[int]:
        """Positions of the tokens completing the subject in ``ids`` (the tokens of ``context`` and more).

        ``ValueError`` when there is none (e.g. the subject only occurs inside a longer word), since dV would
        then be trained where inference never adds it.
        """
        positions = subject_token_positions(tokenizer, ids, self.subject)
        if not positions:
            raise ValueError(f"subject {self.edit.subject!r} does not occur in {context!r} as the matcher reads it (as "
                             "a whole word in scripts written with spaces): write the subject as it appears in the prompt")
        return positions


@dataclass(frozen=True)
class PreparedEdit:
    """A group and, per language, what the edit's steps read about it (``build`` makes it once per edit)."""

    group: EditGroup
    languages: Mapping[str, PreparedLanguage]

    @classmethod
    def build(cls, group: EditGroup, config: LafnConfig) -> PreparedEdit:
        return cls(group, {lang: _language(lang, edit, config) for lang, edit in group.edits.items()})

    @property
    def forms(self) -> dict[str, SubjectMatcher]:
        """Per language, the matcher of the subject and its aliases (where the routing key is read)."""
        return {lang: prepared.forms for lang, prepared in self.languages.items()}


def prepare(edit: EditGroup | PreparedEdit, config: LafnConfig) -> PreparedEdit:
    """``edit`` prepared (as it is when it already is)."""
    return edit if isinstance(edit, PreparedEdit) else PreparedEdit.build(edit, config)


def _language(lang: str, edit: LanguageEdit, config: LafnConfig) -> PreparedLanguage:
    subject = SubjectMatcher([edit.subject])
    variants = word_dropped_variants(edit.prompt, edit.subject, config.question_variants, config.seed, subject
                                     ) if config.question_variants else []
    questions = [*variants, *(p for p in edit.paraphrases[: config.train_paraphrases] if p not in variants)]
    forms = SubjectMatcher([edit.subject, *edit.aliases]) if edit.aliases else subject
    return PreparedLanguage(edit, subject, forms, tuple(questions), config.kl_prompt(lang, edit.subject))
