"""Loaders for the Bi-ZsRE and MzsRE test files (users bring the files; nothing is downloaded).

Each file is a JSON list of items ``{"<lang>": {"subject", "src", "rephrase", "alt", "loc", "loc_ans",
"portability": {"New Question", "New Answer"}}, ...}``. MzsRE files pair English with one other
language; ``merge_items`` joins several pair files into multi-language items by index. Language codes
are normalised to ISO 639-1: MzsRE's "cz" is "cs" (Czech) and "du" is "nl" (Dutch). Texts are kept as
given (English ``loc`` questions start with "nq question: ").
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .editing.subject_span import DEFAULT_THRESHOLD, SubjectSpan, resolve_languages
from .request import EditGroup, LanguageEdit, subject_problem
from .routing.matcher import SubjectMatcher

LANGUAGE_ALIASES = {"cz": "cs", "du": "nl"}
#: MzsRE's languages: English and the eleven its pair files ``..._en{xx}.json`` join it with
MZSRE_LANGUAGES = ("en", "cs", "de", "es", "fr", "nl", "pt", "ru", "th", "tr", "vi", "zh")


def pair_file_code(language: str) -> str:
    """The code MzsRE's file names use for ``language`` ("cs" -> "cz", "nl" -> "du", others as they are)."""
    return {iso: code for code, iso in LANGUAGE_ALIASES.items()}.get(language, language)
_FIELDS = ("subject", "src", "rephrase", "alt", "loc", "loc_ans")


@dataclass(frozen=True)
class ZsreRecord:
    """One language's side of a benchmark item."""

    subject: str
    src: str
    rephrase: str
    alt: str
    loc: str
    loc_ans: str
    portability_question: str | None = None
    portability_answer: str | None = None

    @property
    def matchable(self) -> bool:
        """Whether the subject occurs in the question as the matcher reads it (``LanguageEdit``'s rule: folded,
        whole words): only then can LAFN edit it in this language."""
        return bool(self.subject.strip()) and bool(SubjectMatcher([self.subject]).find(self.src))


Item = dict[str, ZsreRecord]


def _record(raw: Any, where: str) -> ZsreRecord:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object with {list(_FIELDS)}, got {type(raw).__name__}")
    missing = [f for f in _FIELDS if not isinstance(raw.get(f), str)]
    if missing:
        raise ValueError(f"{where}: missing or non-string field(s) {missing}")
    portability = raw.get("portability") or {}
    return ZsreRecord(raw["subject"], raw["src"], raw["rephrase"], raw["alt"], raw["loc"], raw["loc_ans"],
                      portability.get("New Question"), portability.get("New Answer"))


def load_items(path: str | os.PathLike[str]) -> list[Item]:
    """Read one Bi-ZsRE or MzsRE file into items keyed by normalised language code."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path} as JSON: {error}") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    items = []
    for index, raw in enumerate(data):
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{path}[{index}]: expected an object keyed by language")
        items.append({LANGUAGE_ALIASES.get(str(lang), str(lang)): _record(rec, f"{path}[{index}][{lang!r}]")
                      for lang, rec in raw.items()})
    return items


def merge_items(files: Sequence[Sequence[Item]]) -> list[Item]:
    """Join pair files by item index; a language present in several files must hold the same record."""
    if not files:
        return []
    lengths = {len(items) for items in files}
    if len(lengths) != 1:
        raise ValueError(f"cannot merge files of different lengths {sorted(lengths)}")
    merged: list[Item] = []
    for index, parts in enumerate(zip(*files)):
        item: Item = {}
        for part in parts:
            for lang, record in part.items():
                if lang in item and item[lang] != record:
                    raise ValueError(f"item {index}: the {lang!r} side differs between files")
                item[lang] = record
        merged.append(item)
    return merged


def load_files(paths: Sequence[str | os.PathLike[str]], languages: Sequence[str] | None = None) -> list[Item]:
    """Load and merge files; keep only ``languages`` (all when None)."""
    items = merge_items([load_items(p) for p in paths])
    if languages is None:
        return items
    wanted = [LANGUAGE_ALIASES.get(lang, lang) for lang in languages]
    absent = [lang for lang in wanted if items and all(lang not in item for item in items)]
    if absent:
        raise ValueError(f"language(s) {absent} are in none of the files; found {sorted(set().union(*items))}")
    return [{lang: item[lang] for lang in wanted if lang in item} for item in items]


def matchability(items: Sequence[Item]) -> dict[str, tuple[int, int]]:
    """Per language: (items whose subject occurs in the question, items)."""
    counts: dict[str, list[int]] = {}
    for item in items:
        for lang, record in item.items():
            slot = counts.setdefault(lang, [0, 0])
            slot[0] += record.matchable
            slot[1] += 1
    return {lang: (hit, total) for lang, (hit, total) in counts.items()}


def resolve_item(item: Item, search: str = "aligned", threshold: float = DEFAULT_THRESHOLD
                 ) -> tuple[EditGroup | None, dict[str, SubjectSpan], dict[str, str]]:
    """(the item's edit group, the span each language's question writes its subject as, and why each other
    language is left out). Every language with a new answer takes part, made at the span its question writes
    (``lafn_hf.editing.subject_span``: the given subject, another language's, inflected, or aligned, up to ``search``);
    the given subject stays an alias. The dataset's ``rephrase`` is the Generality test, so it is not used."""
    edits: dict[str, LanguageEdit] = {}
    skipped: dict[str, str] = {}
    for lang, record in item.items():
        if not record.alt.strip():
            skipped[lang] = "no new answer (alt is empty)"
            continue
        try:
            edit = LanguageEdit(record.src, record.subject, record.alt)
        except (TypeError, ValueError) as error:
            skipped[lang] = str(error)
            continue
        problem = subject_problem(edit.subject, lang)
        if problem:
            skipped[lang] = f"subject {edit.subject!r} is refused: {problem}"
            continue
        edits[lang] = edit
    if not edits:
        return None, {}, skipped
    group, spans, missing = resolve_languages(EditGroup(edits), search, threshold)
    skipped.update({lang: str(error) for lang, error in missing.items()})
    return group, spans, skipped


def edit_group(item: Item, search: str = "aligned", threshold: float = DEFAULT_THRESHOLD) -> EditGroup | None:
    """``resolve_item``'s group: every language whose question writes its subject in a form found (None if none)."""
    return resolve_item(item, search, threshold)[0]


def subject_forms(item: Item, spans: dict[str, SubjectSpan]) -> tuple[str, ...]:
    """Every form of the item's subject an edit of it routes on: the spans found and every language's given subject."""
    found = [span.text for span in spans.values()] + [record.subject for record in item.values()]
    return tuple(dict.fromkeys(form for form in found if form.strip()))
