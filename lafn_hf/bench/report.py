"""Summaries of ``lafn bench`` results: markdown tables (methods as rows), a JSON summary, grouped bars.

Scores are means x100 over questions, per method, language and metric, in three kinds: ``hit`` (the
normalised new answer starts the answer), ``contains`` (it occurs in the answer) and ``f1`` (Bi-ZsRE token
F1). For Locality and Locality-Hard, ``hit`` and ``contains`` are "the answer equals the unedited model's"
and ``f1`` is the token F1 against the unedited answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..evaluate import F1_DEFINITION
from .settings import BenchSettings, Question

KINDS = ("reliability", "generality", "locality", "locality_hard", "portability")
LABELS = {"reliability": "Rel", "generality": "Gen", "locality": "Loc", "locality_hard": "Loc-Hard",
          "portability": "Port"}
SCORES = {"hit": "answer hit: the normalised new answer starts the generated answer",
          "contains": "contains: the normalised new answer occurs in the generated answer",
          "f1": F1_DEFINITION}


def _mean(values: Sequence[float]) -> float:
    return 100 * sum(values) / len(values)


def summarize(records: Sequence[dict[str, Any]], questions_of: Sequence[Sequence[Question]], methods: Sequence[str],
              settings: BenchSettings) -> dict[str, Any]:
    """Means x100 per score kind, method, language and metric, with counts of what could not be edited."""
    languages = sorted({q.lang for questions in questions_of for q in questions})
    scores: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for kind in SCORES:
        scores[kind] = {}
        for method in methods:
            rows = [s for r in records if r["method"] == method for s in r["scores"]]
            table: dict[str, dict[str, float]] = {}
            for lang in languages:
                cells = {metric: _mean([float(s[kind]) for s in rows if s["lang"] == lang and s["kind"] == metric])
                         for metric in KINDS if any(s["lang"] == lang and s["kind"] == metric for s in rows)}
                if cells:
                    table[lang] = cells
            scores[kind][method] = table
    counts: dict[str, dict[str, int]] = {lang: {} for lang in languages}
    not_found: dict[str, dict[str, int]] = {lang: {} for lang in languages}
    for questions in questions_of:
        for q in questions:
            counts[q.lang][q.kind] = counts[q.lang].get(q.kind, 0) + 1
            if q.kind != "locality":  # an unrelated question: its subject is not the edited one
                not_found[q.lang][q.kind] = not_found[q.lang].get(q.kind, 0) + (not q.subject_found)
    hijacked: dict[str, dict[str, float]] = {}  # method -> language -> % of Locality-Hard answers hijacked
    for method in methods:
        rows = [s for r in records if r["method"] == method for s in r["scores"] if "hijacked" in s]
        hijacked[method] = {lang: _mean([float(s["hijacked"]) for s in rows if s["lang"] == lang])
                            for lang in languages if any(s["lang"] == lang for s in rows)}
    edits: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        info: dict[str, Any] = {"errors": sum(r["error"] is not None for r in mine),
                                "edited": {lang: sum(lang in r["edited"] for r in mine) for lang in languages},
                                "skipped": {lang: sum(lang in r.get("skipped", {}) for r in mine) for lang in languages},
                                "found_by": _found_by(mine, languages)}
        steps = [r["info"]["steps"] for r in mine if "steps" in r["info"]]
        if steps:
            info["mean_steps"] = sum(steps) / len(steps)
        shared = [r["info"]["shared_neurons"] for r in mine if "shared_neurons" in r["info"]]
        if shared:  # layer -> mean number of located (shared) neurons per edit
            info["mean_shared_neurons"] = {layer: sum(s[layer] for s in shared) / len(shared) for layer in shared[0]}
        reached = [bool(r["info"]["reached"]) for r in mine if "reached" in r["info"]]
        if reached:
            info["reached_target"] = sum(reached)
        edits[method] = info
    return {"settings": asdict(settings), "items": len(questions_of), "languages": languages,
            "methods": list(methods), "score_definitions": SCORES, "scores": scores, "questions": counts,
            "subject_not_found": not_found, "hit_by_reach": hit_by_reach(records, questions_of, methods),
            "edits": edits, "hijacked": hijacked}


def _found_by(records: Sequence[dict[str, Any]], languages: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per language, how many items' subjects were found other than as given, by stage ("other", "aligned"...)."""
    found: dict[str, dict[str, int]] = {lang: {} for lang in languages}
    for record in records:
        for lang, span in record.get("spans", {}).items():
            found[lang][span["how"]] = found[lang].get(span["how"], 0) + 1
    return found


def hit_by_reach(records: Sequence[dict[str, Any]], questions_of: Sequence[Sequence[Question]],
                 methods: Sequence[str]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Answer hit x100 on Rel/Gen/Port questions split by whether they write a form of the subject the item's edit
    routes on (``zsre.subject_forms``, exact matcher):
    ``{"found" | "not_found": {method: {lang: {metric: mean}}}}`` (cells without questions are left out)."""
    split: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {"found": {}, "not_found": {}}
    for record in records:
        if record["method"] not in methods:
            continue
        for question, scored in zip(questions_of[int(record["index"])], record["scores"]):
            if question.kind in ("reliability", "generality", "portability"):
                side = "found" if question.subject_found else "not_found"
                cell = split[side].setdefault(record["method"], {}).setdefault(question.lang, {})
                cell.setdefault(question.kind, []).append(float(scored["hit"]))
    return {side: {method: {lang: {kind: _mean(v) for kind, v in cells.items()} for lang, cells in langs.items()}
                   for method, langs in by_method.items()} for side, by_method in split.items()}


def reach_table(summary: dict[str, Any]) -> str:
    """Answer hit on Rel/Gen where a form of the subject is found / not found (exact matcher), methods as rows."""
    languages, split = summary["languages"], summary["hit_by_reach"]
    columns = [(lang, kind) for lang in languages for kind in ("reliability", "generality")]
    lines = [f"{'+'.join(languages)}: answer hit x100 on questions that write a form of the subject (exact matcher) / do "
             f"not (- where there are none), {summary['items']} items", "",
             "| method | " + " | ".join(f"{lang} {LABELS[kind]}" for lang, kind in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]

    def cell(method: str, lang: str, kind: str) -> str:
        values = (split[side].get(method, {}).get(lang, {}).get(kind) for side in ("found", "not_found"))
        return " / ".join("-" if v is None else f"{v:.1f}" for v in values)

    for method in summary["methods"]:
        lines.append(f"| {method} | " + " | ".join(cell(method, lang, kind) for lang, kind in columns) + " |")
    return "\n".join(lines)


def markdown_table(summary: dict[str, Any], score: str = "hit") -> str:
    """One table for the run's language set: methods as rows, Rel/Gen/Loc/Loc-Hard/Port per language."""
    languages = summary["languages"]
    columns = [(lang, kind) for lang in languages for kind in KINDS if summary["questions"][lang].get(kind)]
    settings = summary["settings"]
    lines = [f"{'+'.join(languages)}: {SCORES[score]} (x100; Loc/Loc-Hard: answer equals the unedited one), "
             f"mode={settings['mode']}, {summary['items']} items", "",
             "| method | " + " | ".join(f"{lang} {LABELS[kind]}" for lang, kind in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for method in summary["methods"]:
        table = summary["scores"][score][method]
        cells = [f"{table[lang][kind]:.1f}" if kind in table.get(lang, {}) else "-" for lang, kind in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    for lang in languages:
        missing = summary["subject_not_found"][lang]
        shown = ", ".join(f"{LABELS[k]} {missing[k]}/{summary['questions'][lang][k]}" for k in KINDS if k in missing)
        lines.append(f"- {lang}: no form of the subject in the question (the edit cannot reach it): {shown}")
    for method, by_lang in summary.get("hijacked", {}).items():
        if by_lang and method != "unedited":
            shown = ", ".join(f"{lang} {value:.1f}" for lang, value in by_lang.items())
            lines.append(f"- {method}: Loc-Hard answers hijacked (the edit's target in the answer, not in the "
                         f"unedited one) x100: {shown}")
    for method, info in summary["edits"].items():
        if method == "unedited":
            continue
        edited = ", ".join(f"{lang} {n}/{summary['items']}" for lang, n in info["edited"].items())
        extra = f", mean steps {info['mean_steps']:.1f}" if "mean_steps" in info else ""
        extra += f", reached its target NLL {info['reached_target']}" if "reached_target" in info else ""
        lines.append(f"- {method}: edits made {edited}; failed or not made {info['errors']}{extra}")
        skipped = ", ".join(f"{lang} {n}" for lang, n in info.get("skipped", {}).items() if n)
        found = "; ".join(f"{lang} " + ", ".join(f"{how} {n}" for how, n in sorted(by.items()))
                          for lang, by in info.get("found_by", {}).items() if by)
        if skipped or found:
            lines.append(f"  - {method}: languages skipped (subject not found in the question) {skipped or 'none'}; "
                         f"subjects found other than as given: {found or 'none'}")
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(summary, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def plot_summary(summary: dict[str, Any], path: str | os.PathLike[str], score: str = "hit") -> None:
    """Grouped bars, one panel per language: metrics on the x axis, one bar per method.

    Needs matplotlib: ``pip install 'lafn-hf[plot]'``.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'lafn-hf[plot]'") from error
    languages, methods = summary["languages"], summary["methods"]
    figure = Figure(figsize=(4.5 * len(languages), 3.6), layout="constrained")
    axes = figure.subplots(1, len(languages), squeeze=False)[0]
    width = 0.8 / max(len(methods), 1)
    for ax, lang in zip(axes, languages):
        kinds = [k for k in KINDS if summary["questions"][lang].get(k)]
        for m, method in enumerate(methods):
            row = summary["scores"][score][method].get(lang, {})
            ax.bar([i + (m - (len(methods) - 1) / 2) * width for i in range(len(kinds))],
                   [row.get(k, 0.0) for k in kinds], width, label=method)
        ax.set_xticks(range(len(kinds)), [LABELS[k] for k in kinds])
        ax.set_ylim(0, 105)
        ax.set_title(lang)
    axes[0].set_ylabel(f"{score} x100")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize="small")
    figure.suptitle(f"lafn bench, {summary['items']} items, mode={summary['settings']['mode']}")
    figure.savefig(path, dpi=120)
