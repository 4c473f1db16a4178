"""Checks that keep a bank from anyone from breaking a model: the subjects and aliases of a loaded bank pass the
rule that ``edit()`` and ``add_aliases`` apply (``lafn_hf.config.surface_form_problem``; at most
``lafn_hf.text.MAX_FORM_LENGTH`` characters)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import surface_form_problem
from .text import MAX_FORM_LENGTH, check_form_length


def check_surface_forms(entries: Sequence[dict[str, Any]], allow_common: bool) -> None:
    """``ValueError`` naming the first config entry field (``entries[i].subjects.<lang>``, ``entries[i].aliases[k]``)
    that is too long, or, unless ``allow_common``, too short or a frequent function word (the values are not
    repeated: they come from a file). About a second for a million entries."""
    for index, entry in enumerate(entries):
        for lang, subject in entry["subjects"].items():
            if len(subject) > MAX_FORM_LENGTH or not allow_common and surface_form_problem(subject, lang):
                _refuse(f"entries[{index}].subjects.{lang}", subject, lang, allow_common)
        for k, alias in enumerate(entry.get("aliases", ())):
            if len(alias) > MAX_FORM_LENGTH or not allow_common and surface_form_problem(alias, None):
                _refuse(f"entries[{index}].aliases[{k}]", alias, None, allow_common)


def _refuse(where: str, form: str, language: str | None, allow_common: bool) -> None:
    check_form_length(form, where)
    problem = None if allow_common else surface_form_problem(form, language)
    if problem:
        raise ValueError(f"{where} is refused: {problem}; a bank subject or alias edits every prompt it occurs in, "
                         "load with allow_common=True to accept it")
