"""Run several editing methods on the same items with the same protocol, resumably.

Per item: the unedited model's answers to every question are computed once (the Locality reference);
then for each method: apply the item's edit group (``lafn_hf.zsre.resolve_item``: every language, each made at
the span its question writes the subject as; a language where none is found is skipped, with the reason, in
the record's ``skipped``) -> answer the item's questions in every language -> roll back.
Questions per language: ``src`` (Reliability), ``rephrase`` (Generality), ``loc`` (Locality), the
Locality-Hard questions about the same subject (``locality_hard.json``) and the portability question.

Results are appended to a JSONL file whose first line holds the settings every row depends on (model,
dtype, languages, mode, decoding budget, a hash of the items and of the Locality-Hard set; not ``limit``).
A rerun with other such settings raises ``ValueError`` naming the differing keys; ``fresh=True`` starts a
new file (the old one kept renamed). Each method's rows are keyed on that method's own settings as well
(a ``method_settings`` line names them, each row carries their hash): a rerun with one method's settings
changed recomputes only that method's rows, keeps the others, and logs which keys differ; rows made under
other settings stay in the file but are never reused. Adding a method to a run computes only its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..editing.subject_span import SubjectSpan, spans_metadata
from ..evaluate import answer_ids
from ..model import EditableCausalLM
from ..request import EditGroup
from ..routing.matcher import SubjectMatcher
from ..zsre import Item, resolve_item, subject_forms
from .methods import EditMethod, UneditedMethod
from .metrics import answer_hit, contains, same_answer, token_f1
from .report import SCORES, markdown_table, plot_summary, reach_table, summarize, write_summary
from .settings import BenchSettings, LocalityHard, Question

logger = logging.getLogger(__name__)
FORMAT = 4  # 3: teacher-forced golds through the KV cache, Locality-Hard "hijacked"; 4: subject spans
KINDS = ("reliability", "generality", "locality", "locality_hard", "portability")
LOCALITY_KINDS = ("locality", "locality_hard")
REFERENCE = "_unedited_reference"


def load_locality_hard(path: str | os.PathLike[str] | None = None) -> LocalityHard:
    """The Locality-Hard set (default: the one shipped for the MzsRE dev split)."""
    if path is None:
        text = (resources.files("lafn_hf.bench") / "data" / "locality_hard.json").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    data = json.loads(text)
    hard: LocalityHard = {}
    for entry in data["items"]:
        for lang, side in entry.items():
            if isinstance(side, dict):
                if not isinstance(side.get("subject"), str) or not isinstance(side.get("questions"), list):
                    raise ValueError(f"locality-hard item {entry.get('index')} {lang!r}: needs subject and questions")
                hard.setdefault(int(entry["index"]), {})[lang] = (side["subject"], [str(q) for q in side["questions"]])
    return hard


def applies(subject: str, given: str, span: SubjectSpan | None) -> bool:
    """Is a Locality-Hard question about ``subject`` asked of a language whose item gives ``given`` and whose edit is
    made at ``span`` (None: no edit there)? Where ``subject`` is the given subject or the span's text."""
    return bool(subject) and subject in (given, span.text if span is not None else None)


def item_questions(index: int, item: Item, hard: LocalityHard, search: str = "aligned") -> list[Question]:
    """The item's questions, language by language; Locality-Hard ones only where the set's subject is the item's
    in that language: its given subject, or the span its question writes the subject as (``lafn_hf.editing.subject_span``,
    found up to ``search``), where that language's edit is made."""
    spans = resolve_item(item, search)[1]
    matcher = SubjectMatcher(subject_forms(item, spans))
    questions = []
    for lang, record in item.items():
        asked: list[tuple[str, str, str | None]] = [
            ("reliability", record.src, record.alt), ("generality", record.rephrase, record.alt),
            ("locality", record.loc, record.loc_ans)]
        subject, hard_questions = hard.get(index, {}).get(lang, ("", []))
        if applies(subject, record.subject, spans.get(lang)):
            asked += [("locality_hard", q, None) for q in hard_questions]
        if record.portability_question and record.portability_answer:
            asked.append(("portability", record.portability_question, record.portability_answer))
        questions += [Question(kind, lang, text, record.subject, gold, bool(matcher.find(text)),
                               record.alt if kind == "locality_hard" else None)
                      for kind, text, gold in asked]
    return questions


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def run_settings(model: EditableCausalLM, items: Sequence[Item], settings: BenchSettings,
                 hard: LocalityHard) -> dict[str, Any]:
    """What every row depends on (``limit`` aside); the results file is keyed on it."""
    return {"format": FORMAT, "model": model.base_ref.name_or_path, "revision": model.base_ref.revision,
            "dtype": str(next(model.parameters()).dtype),
            "languages": sorted({lang for item in items for lang in item}),
            "mode": settings.mode, "margin": settings.margin, "free_tokens": settings.free_tokens,
            "batch_size": settings.batch_size, "subject_search": settings.subject_search,
            "items_sha256": _sha256([{lang: asdict(r) for lang, r in item.items()} for item in items]),
            "locality_hard_sha256": _sha256({str(k): v for k, v in sorted(hard.items())})}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per differing (dotted) key: ``"mode: 'generate' there, 'teacher_forced' now"``; compared as
    stored in JSON (a tuple now equals the list it was saved as)."""
    old, new = _flatten(_as_json(stored)), _flatten(_as_json(current))

    def show(value: Any) -> str:
        text = "absent" if value is _ABSENT else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{key}: {show(old.get(key, _ABSENT))} there, {show(new.get(key, _ABSENT))} now"
            for key in sorted(set(old) | set(new)) if old.get(key, _ABSENT) != new.get(key, _ABSENT)]


_ABSENT = object()


def _as_json(data: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(data, sort_keys=True, ensure_ascii=False, default=str))


def open_results(path: str | os.PathLike[str], settings: dict[str, Any], fresh: bool = False) -> list[dict[str, Any]]:
    """Records already in ``path`` under ``settings``; starts the file (header line) when there are none.

    Other settings raise ``ValueError`` naming the differing keys. With ``fresh`` a new file is started and
    an old one is kept renamed to ``<stem>.<its settings hash>.jsonl``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"lafn_bench": FORMAT, "settings": settings, "settings_sha256": _sha256(settings)}
    text = path.read_text("utf-8") if path.is_file() else ""
    if text and not text.endswith("\n"):  # an interrupted write: drop its partial line before appending
        logger.warning("dropping a truncated last line of %s", path)
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    lines = text.splitlines()
    if lines:
        try:
            stored = json.loads(lines[0])
            stored_settings = stored["settings"]
        except (ValueError, KeyError, TypeError):
            stored, stored_settings = {}, None
        if fresh or stored_settings != settings:
            if fresh:
                old = path.with_name(f"{path.stem}.{str(stored.get('settings_sha256', 'unknown'))[:12]}{path.suffix}")
                counter = 1
                while old.exists():
                    old, counter = old.with_name(f"{old.stem}-{counter}{old.suffix}"), counter + 1
                path.rename(old)
                logger.warning("--fresh: kept the old results as %s", old)
                lines = []
            else:
                why = ("it has no lafn bench settings line" if stored_settings is None
                       else "; ".join(settings_difference(stored_settings, settings)))
                raise ValueError(f"{path} holds results of other settings ({why}). Rerun with those settings to "
                                 "resume, pass --fresh (fresh=True) to start a new file (the old one is kept "
                                 "renamed), or choose another --out")
    if not lines:
        path.write_text(json.dumps(header, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return []
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except ValueError:
            logger.warning("ignoring a truncated line in %s", path)
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _reference(index: int, questions: Sequence[Question], unedited: UneditedMethod,
               settings: BenchSettings) -> dict[str, Any]:
    """The unedited answers (Locality's reference) and each question's gold tokens."""
    tokenizer = unedited.model.tokenizer
    texts, langs = [q.text for q in questions], [q.lang for q in questions]
    golds = [answer_ids(tokenizer, q.text, q.gold) if q.gold is not None else [] for q in questions]
    if settings.mode == "teacher_forced":  # Locality-Hard: the unedited greedy answer is the gold
        free = [i for i, q in enumerate(questions) if q.gold is None]
        answers = unedited.predict_many([texts[i] for i in free], [langs[i] for i in free], "generate", None,
                                        [settings.free_tokens] * len(free), settings.batch_size)
        for i, answer in zip(free, answers):
            golds[i] = answer
    ids = unedited.predict_many(texts, langs, settings.mode, golds,
                                [_budget(g, q, settings) for g, q in zip(golds, questions)], settings.batch_size)
    return {"index": index, "method": REFERENCE, "gold": golds, "ids": ids,
            "answers": [unedited.decode(i) for i in ids]}


def _budget(gold: Sequence[int], question: Question, settings: BenchSettings) -> int:
    return settings.free_tokens if question.gold is None else len(gold) + settings.margin


def score(question: Question, ids: Sequence[int], answer: str, reference: dict[str, Any], position: int,
          mode: str) -> dict[str, Any]:
    """hit / contains / F1 of one answer; for Locality(-Hard) hit = contains = "same as unedited", and for
    Locality-Hard also ``hijacked``: the edit's target occurs in the answer but not in the unedited one."""
    gold, ref_ids = reference["gold"][position], reference["ids"][position]
    if question.kind in LOCALITY_KINDS:
        if mode == "teacher_forced":
            local = list(ids) == list(ref_ids)
        else:
            local = same_answer(answer, reference["answers"][position])
        scored = {"kind": question.kind, "lang": question.lang, "answer": answer, "hit": local, "contains": local,
                  "f1": token_f1(list(ids), list(ref_ids))}
        if question.target:
            scored["hijacked"] = contains(answer, question.target) and not contains(reference["answers"][position],
                                                                                    question.target)
        return scored
    target = question.gold or ""
    return {"kind": question.kind, "lang": question.lang, "answer": answer, "hit": answer_hit(answer, target),
            "contains": contains(answer, target), "f1": token_f1(list(ids), list(gold))}


def run_method(method: EditMethod, index: int, prepared: PreparedItem, questions: Sequence[Question],
               reference: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    """Apply the item's group with ``method``, answer ``questions``, roll back; one result record (``spans``:
    how each language's subject was found where its question does not write it as given; ``skipped``: the
    languages left out of the group, with the reason)."""
    group = prepared.group
    record: dict[str, Any] = {"index": index, "method": method.name, "edited": [], "error": prepared.error,
                              "info": {}, "spans": spans_metadata(prepared.spans), "skipped": prepared.skipped}
    handle = None
    if group is not None:
        try:
            handle = method.apply(group)
            record["edited"], record["info"] = sorted(group.edits), handle.info
        except (ValueError, RuntimeError) as error:  # e.g. EditFailedError: answered unedited, counted
            record["error"] = f"{type(error).__name__}: {error}"
    try:
        if type(method) is UneditedMethod:  # the reference is exactly its answers (same model, same batches)
            answers = [list(ids) for ids in reference["ids"]]
        else:
            golds = reference["gold"]
            answers = method.predict_many([q.text for q in questions], [q.lang for q in questions], settings.mode,
                                          golds, [_budget(g, q, settings) for g, q in zip(golds, questions)],
                                          settings.batch_size)
        scores = [score(q, ids, method.decode(ids), reference, position, settings.mode)
                  for position, (q, ids) in enumerate(zip(questions, answers))]
    finally:
        if handle is not None:
            method.rollback(handle)
    record["scores"] = scores
    return record


@dataclass(frozen=True)
class PreparedItem:
    """An item's edit group (None when no language could be edited, ``error`` says why), the spans its
    languages' subjects were found at, and the languages left out with the reason."""

    group: EditGroup | None
    spans: dict[str, SubjectSpan]
    skipped: dict[str, str]
    error: str | None


def prepare_item(item: Item, search: str) -> PreparedItem:
    group, spans, skipped = resolve_item(item, search)
    error = None if group is not None else "no language's subject was found in its question"
    return PreparedItem(group, spans, skipped, error)


def _reusable(records: Sequence[dict[str, Any]], methods: Sequence[EditMethod], keys: Mapping[str, str],
              path: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """The stored rows the current methods may reuse; names the current methods' settings in ``path`` first.

    A method's row is reused only when it was made under that method's current settings; the others stay in
    the file and a warning says how many were passed over and which settings keys differ.
    """
    known: dict[str, dict[str, Any]] = {}  # settings hash -> a method's settings
    latest: dict[str, str] = {}  # method name -> the hash of its last named settings
    done: dict[tuple[int, str], dict[str, Any]] = {}
    stale: dict[str, int] = {}
    for record in records:
        if "method_settings" in record:
            known[record["sha256"]] = record["settings"]
            latest[record["method_settings"]] = record["sha256"]
        elif record["method"] == REFERENCE or keys.get(record["method"]) == record.get("method_sha256"):
            done[(int(record["index"]), record["method"])] = record
        elif record["method"] in keys:
            stale[record["method"]] = stale.get(record["method"], 0) + 1
    for method in methods:
        if stale.get(method.name):
            why = "; ".join(settings_difference(known.get(latest.get(method.name, ""), {}), method.settings()))
            logger.warning("%s: %d rows made under other settings are not reused (%s)", method.name,
                           stale[method.name], why or "settings not named")
        if keys[method.name] not in known or latest.get(method.name) != keys[method.name]:
            _append(path, {"method_settings": method.name, "sha256": keys[method.name], "settings": method.settings()})
    return done


def run_bench(model: EditableCausalLM, items: Sequence[Item], methods: Sequence[EditMethod],
              results_path: str | os.PathLike[str], settings: BenchSettings | None = None, *,
              locality_hard: LocalityHard | None = None, fresh: bool = False, progress: bool = True,
              on_record: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns ``report.summarize``'s summary of the first ``limit`` items."""

    settings = settings or BenchSettings()
    if len(model.bank):
        raise ValueError(f"lafn bench needs a model with an empty bank, this one holds {len(model.bank)} entries")
    names = [m.name for m in methods]
    if not names or len(set(names)) != len(names) or REFERENCE in names:
        raise ValueError(f"methods must be a non-empty list of distinct methods, got {names}")
    strangers = [m.name for m in methods if m.model is not model]
    if strangers:
        raise ValueError(f"every method must wrap the benchmarked model; {strangers} wrap another one")
    hard = load_locality_hard() if locality_hard is None else locality_hard
    path = Path(results_path)
    keys = {m.name: _sha256(m.settings()) for m in methods}
    done = _reusable(open_results(path, run_settings(model, items, settings, hard), fresh), methods, keys, path)
    items = list(items)[: settings.limit] if settings.limit else list(items)
    unedited = UneditedMethod(model)
    for index in tqdm(range(len(items)), desc="lafn bench", disable=not progress):
        pending = [m for m in methods if (index, m.name) not in done]
        if not pending:
            continue
        questions = item_questions(index, items[index], hard, settings.subject_search)
        if (index, REFERENCE) not in done:
            done[(index, REFERENCE)] = _reference(index, questions, unedited, settings)
            _append(path, done[(index, REFERENCE)])
        prepared = prepare_item(items[index], settings.subject_search)
        for method in pending:
            record = run_method(method, index, prepared, questions, done[(index, REFERENCE)], settings)
            record["method_sha256"] = keys[method.name]
            done[(index, method.name)] = record
            _append(path, record)
            if on_record is not None:
                on_record(record)
    records = [done[(i, name)] for i in range(len(items)) for name in names]
    questions_of = [item_questions(i, item, hard, settings.subject_search) for i, item in enumerate(items)]
    return summarize(records, questions_of, names, settings)


def run_benchmark(model: EditableCausalLM, items: Sequence[Item], methods: Sequence[EditMethod],
                  out_dir: str | os.PathLike[str], settings: BenchSettings | None = None, *,
                  locality_hard: LocalityHard | None = None, fresh: bool = False, progress: bool = True,
                  plot: bool = True) -> dict[str, Any]:
    """``run_bench`` into ``out_dir``: ``results.jsonl`` (resumable), ``summary.json``, ``tables.md`` (hit,
    contains and F1 tables) and ``plot.png`` (answer hit; skipped with a warning without matplotlib)."""

    out = Path(out_dir)
    summary = run_bench(model, items, methods, out / "results.jsonl", settings, locality_hard=locality_hard,
                        fresh=fresh, progress=progress)
    write_summary(summary, out / "summary.json")
    tables = [markdown_table(summary, s) for s in SCORES] + [reach_table(summary)]
    (out / "tables.md").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    if plot:
        try:
            plot_summary(summary, out / "plot.png")
        except ImportError as error:
            logger.warning("no plot: %s", error)
    return summary
