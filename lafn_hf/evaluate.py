"""The paper's metrics (Reliability, Generality, Locality, Portability) on Bi-ZsRE / MzsRE items.

F1 is the Bi-ZsRE token-level F1 over token-id multisets: P = |pred & gold| / |pred|,
R = |pred & gold| / |gold|, F1 = 2PR / (P + R). ``remake_score`` is the ReMaKE variant P * R (labelled
as such wherever it is reported). Two answer modes: ``generate`` (greedy decoding through the real
``generate()`` path, up to len(gold) + margin tokens, cut at EOS or a newline) and ``teacher_forced``
(argmax at each gold position given the gold prefix, as the Bi-ZsRE code does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .bank.store import load_bank
from .config import LafnConfig, config_with_defaults
from .model import EditableCausalLM
from .routing.cache_rows import cache_keyword, returned_cache
from .tokens import pad_batch, pad_id, stop_ids, target_separator
from .zsre import Item, matchability, resolve_item

logger = logging.getLogger(__name__)
METRICS = ("reliability", "generality", "locality", "portability")
MODES = ("generate", "teacher_forced")
PROTOCOLS = ("single", "sequential")
F1_DEFINITION = "token-level F1 = 2PR/(P+R) over token-id multisets (Bi-ZsRE)"


def _overlap(prediction: Sequence[int], gold: Sequence[int]) -> tuple[float, float]:
    common = sum((Counter(prediction) & Counter(gold)).values())
    return (common / len(prediction) if prediction else 0.0), (common / len(gold) if gold else 0.0)


def token_f1(prediction: Sequence[int], gold: Sequence[int]) -> float:
    """Bi-ZsRE F1; two empty sequences score 1, one empty sequence scores 0."""
    if not prediction or not gold:
        return float(len(prediction) == len(gold))
    precision, recall = _overlap(prediction, gold)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def remake_score(prediction: Sequence[int], gold: Sequence[int]) -> float:
    """The ReMaKE variant P * R (not the harmonic F1)."""
    precision, recall = _overlap(prediction, gold)
    return precision * recall


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate: answer mode, editing protocol, decoding margin and an item limit."""

    mode: str = "generate"
    protocol: str = "single"
    margin: int = 2
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.margin < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"margin must be >= 0 and limit >= 1, got {self.margin!r}, {self.limit!r}")


def answer_ids(tokenizer: Any, prompt: str, answer: str) -> list[int]:
    """Gold tokens of ``answer`` as it follows ``prompt`` (same separator rule as editing)."""
    return list(tokenizer(target_separator(prompt, answer) + answer, add_special_tokens=False)["input_ids"])


class _AnswerScan:
    """Reads an answer token by token and says when it has ended (``answer_end``'s rule)."""

    def __init__(self, tokenizer: Any, stops: frozenset[int]) -> None:
        self.tokenizer, self.stops, self.started = tokenizer, stops, False

    def ends_at(self, token: int) -> bool:
        if token in self.stops:
            return True
        piece = self.tokenizer.decode([token])
        if self.started and "\n" in piece:
            return True
        self.started = self.started or bool(piece.strip())
        return False


def answer_end(tokenizer: Any, generated: Sequence[int], stops: frozenset[int] | None = None) -> int:
    """Where a generated answer ends: at an EOS (``stops``, default the tokenizer's), or at the first token
    holding a line break once some visible text was generated (a token like Gemma's "\n\n" counts; line
    breaks before the answer are kept)."""
    scan = _AnswerScan(tokenizer, stop_ids(tokenizer) if stops is None else stops)
    for position, token in enumerate(generated):
        if scan.ends_at(token):
            return position
    return len(generated)


def predict_ids(model: EditableCausalLM, text: str, mode: str = "generate", gold: Sequence[int] = (),
                max_new_tokens: int = 16) -> list[int]:
    """Answer tokens for ``text``: greedy ``generate()`` cut by ``answer_end`` (``mode="generate"``), or the
    argmax at each position of ``gold`` given the gold prefix (``mode="teacher_forced"``)."""
    return predict_batch(model, [text], mode, [gold], [max_new_tokens])[0]


class _AnswersEnded(StoppingCriteria):
    """Per row: done once its budget is spent or ``answer_end``'s rule has found the end, so that a batch stops
    when every answer has ended instead of decoding up to the largest budget. Reads every new token."""

    def __init__(self, tokenizer: Any, stops: frozenset[int], prompt_width: int, budgets: Sequence[int]) -> None:
        self.prompt_width, self.budgets, self.read = prompt_width, list(budgets), prompt_width
        self.scans = [_AnswerScan(tokenizer, stops) for _ in self.budgets]
        self.ended = [False] * len(self.budgets)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.read:].tolist()
        self.read = input_ids.shape[1]
        for row, tokens in enumerate(new):
            if not self.ended[row]:
                self.ended[row] = any(self.scans[row].ends_at(t) for t in tokens)
            self.ended[row] = self.ended[row] or self.read - self.prompt_width >= self.budgets[row]
        return torch.tensor(self.ended, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


@torch.no_grad()
def predict_batch(model: EditableCausalLM, texts: Sequence[str], mode: str = "generate",
                  golds: Sequence[Sequence[int]] | None = None,
                  budgets: Sequence[int] | None = None) -> list[list[int]]:
    """``predict_ids`` for several texts in one left-padded forward / ``generate()`` call.

    Row ``i`` gets up to ``budgets[i]`` new tokens (default 16; the batch decodes up to the largest and each
    row is cut at its own budget, then by ``answer_end``), or in teacher-forced mode the argmax at each
    position of ``golds[i]``. Greedy answers equal one-by-one ``predict_ids`` up to float rounding.
    """
    if mode not in ("generate", "teacher_forced"):
        raise ValueError(f"mode must be 'generate' or 'teacher_forced', got {mode!r}")
    gold_rows: list[list[int]] = [list(g) for g in golds] if golds is not None else [[] for _ in texts]
    budgets = list(budgets) if budgets is not None else [16] * len(texts)
    if not (len(gold_rows) == len(budgets) == len(texts)):
        raise ValueError(f"got {len(texts)} texts, {len(gold_rows)} golds and {len(budgets)} budgets")
    if not texts:
        return []
    tokenizer = model.tokenizer
    prompts = [list(tokenizer(text)["input_ids"]) for text in texts]
    if mode == "teacher_forced":
        answers: list[list[int]] = [[] for _ in texts]
        rows = [i for i, gold in enumerate(gold_rows) if gold]
        if rows:
            for i, predicted in zip(rows, _forced_argmax(model, [prompts[i] for i in rows], [gold_rows[i] for i in rows])):
                answers[i] = predicted
        return answers
    ids, mask = pad_batch(prompts, pad_id(tokenizer), model.device, left=True)
    stops = stop_ids(tokenizer, getattr(model.model, "generation_config", None))
    stop = StoppingCriteriaList([_AnswersEnded(tokenizer, stops, ids.shape[1], budgets)])
    output = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(1, *budgets),
                            pad_token_id=tokenizer.pad_token_id, stopping_criteria=stop)
    answers = []
    for row, budget in enumerate(budgets):
        generated = output[row, ids.shape[1]: ids.shape[1] + budget].tolist()
        answers.append(generated[: answer_end(tokenizer, generated, stops)])
    return answers


def _forced_argmax(model: EditableCausalLM, prompts: Sequence[list[int]], golds: Sequence[list[int]]) -> list[list[int]]:
    """The argmax at each gold position given the gold prefix. The prompts are read first (left-padded, one
    forward), then the golds one token per forward through the KV cache, as ``generate()`` reads a prompt and its
    answer, so routing judges every token as it would when generating (``lafn_hf.routing.scope``)."""
    ids, mask = pad_batch(prompts, pad_id(model.tokenizer), model.device, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them under left padding
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    steps = [output.logits[:, -1]]
    keyword = cache_keyword(model.model)  # cache= where the model takes it (past_key_values= is deprecated there)
    gold_ids, gold_mask = pad_batch(golds, pad_id(model.tokenizer), model.device)  # right-padded: pads come last
    for j in range(max(len(gold) for gold in golds) - 1):  # the last gold token is predicted by the one before it
        mask = torch.cat([mask, gold_mask[:, j : j + 1]], dim=1)
        output = model(input_ids=gold_ids[:, j : j + 1], attention_mask=mask, position_ids=positions[:, -1:] + 1 + j,
                       use_cache=True, **{keyword: returned_cache(output)})
        steps.append(output.logits[:, -1])
    argmax = torch.stack(steps, dim=1).argmax(-1)
    return [argmax[row, : len(gold)].tolist() for row, gold in enumerate(golds)]


def predict(model: EditableCausalLM, prompt: str, gold: Sequence[int], settings: EvalSettings) -> list[int]:
    """The model's answer tokens for ``prompt`` in ``settings.mode`` (up to len(gold) + margin new tokens)."""
    return predict_ids(model, prompt, settings.mode, gold, len(gold) + settings.margin)


def _score(prediction: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    return {"f1": token_f1(prediction, gold), "em": float(list(prediction) == list(gold)),
            "remake_pr": remake_score(prediction, gold)}


def evaluate_item(model: EditableCausalLM, index: int, item: Item, settings: EvalSettings,
                  config: LafnConfig | None) -> dict[str, Any]:
    """Edit the item's group, score every language, roll back under the single-edit protocol."""
    tokenizer = model.tokenizer
    loc_gold = {lang: answer_ids(tokenizer, r.loc, r.loc_ans) for lang, r in item.items()}
    with model.edits_disabled():
        unedited_loc = {lang: predict(model, r.loc, loc_gold[lang], settings) for lang, r in item.items()}
    record: dict[str, Any] = {"index": index, "edited": [], "error": None, "entry_id": None, "scores": {}}
    try:  # a refused subject (too short or too common) or an edit that did not take is scored unedited
        chosen = config or model.lafn_config
        group, _, skipped = resolve_item(item, chosen.subject_search, chosen.alignment_threshold)
        record["skipped"] = skipped
        if group is None:
            record["error"] = "no language could be edited: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        else:
            record["edited"] = sorted(group.edits)
            record["entry_id"] = model.edit(group, config, progress=False, metadata={"item_index": index}).entry_id
    except (ValueError, RuntimeError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
    for lang, r in item.items():
        gold = answer_ids(tokenizer, r.src, r.alt)
        scores = {"reliability": _score(predict(model, r.src, gold, settings), gold)}
        gold = answer_ids(tokenizer, r.rephrase, r.alt)
        scores["generality"] = _score(predict(model, r.rephrase, gold, settings), gold)
        # same decoding budget as the unedited run, compared with its answer
        scores["locality"] = _score(predict(model, r.loc, loc_gold[lang], settings), unedited_loc[lang])
        if r.portability_question and r.portability_answer:
            gold = answer_ids(tokenizer, r.portability_question, r.portability_answer)
            scores["portability"] = _score(predict(model, r.portability_question, gold, settings), gold)
        record["scores"][lang] = scores
    if settings.protocol == "single" and record["entry_id"]:
        model.remove_edit(record["entry_id"])
    return record


def _read_done(path: Path) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    logger.warning("ignoring a truncated line in %s", path)
                    continue
                done[int(record["index"])] = record
    return done


def run_settings(model: EditableCausalLM, items: Sequence[Item], settings: EvalSettings,
                 config: LafnConfig | None) -> dict[str, Any]:
    """What per-item results depend on (``limit`` aside): a results file is only resumed under the same."""
    data = json.dumps([{lang: asdict(record) for lang, record in item.items()} for item in items], sort_keys=True)
    return {"mode": settings.mode, "protocol": settings.protocol, "margin": settings.margin,
            "languages": sorted({lang for item in items for lang in item}),
            "items_sha256": hashlib.sha256(data.encode("utf-8")).hexdigest(),
            "base_model": model.base_ref.name_or_path, "revision": model.base_ref.revision,
            "dtype": str(next(model.parameters()).dtype), "config": (config or model.lafn_config).to_dict()}


def _check_resume(path: Path, settings_path: Path, current: dict[str, Any], has_results: bool) -> None:
    """Refuse to resume ``path`` when it was written under other settings; record them on a fresh start."""
    if not has_results:
        settings_path.write_text(json.dumps(current, sort_keys=True, ensure_ascii=False, indent=1) + "\n", "utf-8")
        return
    if not settings_path.is_file():
        raise ValueError(f"{path} holds results without their settings (written by an older lafn-hf); "
                         "delete it or choose another --results file to start fresh")
    try:
        stored = json.loads(settings_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{settings_path} cannot be read ({error}); delete it and {path} to start fresh") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("config", {}), dict):
        raise ValueError(f"{settings_path} is not a settings object with a 'config' object; delete it and {path} "
                         "to start fresh")
    if isinstance(stored.get("config"), dict):
        stored["config"] = config_with_defaults(stored["config"])  # keys added since default to the old behaviour
    differences = []
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) == current.get(key):
            continue
        if key == "config" and key in stored and key in current:
            keys = sorted(k for k in set(stored[key]) | set(current[key]) if stored[key].get(k) != current[key].get(k))
            differences.append(f"config ({', '.join(keys)}) differs")
        elif key == "items_sha256":
            differences.append("the data files hold other items")
        else:
            differences.append(f"{key} {stored.get(key)!r} there, {current.get(key)!r} now")
    if differences:
        raise ValueError(f"{path} holds results of other settings: {'; '.join(differences)}. Rerun with those "
                         "settings to resume, or give another --results (or --out) file to start fresh")


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def evaluate(model: EditableCausalLM, items: Sequence[Item], settings: EvalSettings, results_path: str | os.PathLike[str],
             config: LafnConfig | None = None, progress: bool = True,
             on_item: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) an evaluation; per-item results are appended to ``results_path`` (JSONL).

    Items already in the JSONL are skipped. The settings the results depend on (``run_settings``) are
    saved beside it (``<results>.settings.json``); resuming under other settings raises ``ValueError``.
    Under the sequential protocol the accumulated bank is saved beside it (``<results>.bank``) after
    every item and restored on resume.
    """
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_done(path)
    _check_resume(path, path.with_name(path.name + ".settings.json"), run_settings(model, items, settings, config),
                  bool(done))
    items = list(items)[: settings.limit] if settings.limit else list(items)
    bank_dir = path.with_name(path.name + ".bank")
    if settings.protocol == "sequential" and done and bank_dir.is_dir():
        bank, _ = load_bank(bank_dir, allow_common=True)  # this run's own checkpoint
        for entry in bank:  # an edit whose line never got written is dropped
            if entry.metadata.get("item_index") not in done:
                bank.remove(entry.id)
        model.set_bank(bank)
    for index in tqdm(range(len(items)), desc="lafn eval", disable=not progress):
        if index in done:
            continue
        done[index] = evaluate_item(model, index, items[index], settings, config)
        if settings.protocol == "sequential":
            model.save_pretrained(bank_dir)
        _append(path, done[index])
        if on_item is not None:
            on_item(index)
    return summarize([done[i] for i in range(len(items))], items, settings)


def summarize(records: Sequence[dict[str, Any]], items: Sequence[Item], settings: EvalSettings) -> dict[str, Any]:
    """Mean scores x100 per metric and language, plus the average over languages."""
    languages = sorted({lang for item in items for lang in item})
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for kind in ("f1", "em", "remake_pr"):
        table: dict[str, dict[str, float]] = {}
        for metric in METRICS:
            row = {}
            for lang in languages:
                values = [r["scores"][lang][metric][kind] for r in records
                          if lang in r["scores"] and metric in r["scores"][lang]]
                if values:
                    row[lang] = 100 * sum(values) / len(values)
            if row:
                row["avg"] = sum(row.values()) / len(row)
                table[metric] = row
        summary[kind] = table
    return {"settings": asdict(settings), "f1_definition": F1_DEFINITION, "items": len(records),
            "edit_errors": sum(r["error"] is not None for r in records),
            "matchable_subjects": {lang: list(v) for lang, v in matchability(items).items()}, "summary": summary}


def markdown_table(result: dict[str, Any], kind: str = "f1") -> str:
    """Rows: metrics; columns: languages + avg (the shape of the paper's Table 1 / Table 6)."""
    table = result["summary"][kind]
    languages = sorted({lang for row in table.values() for lang in row if lang != "avg"})
    label = {"f1": "F1", "em": "exact match", "remake_pr": "ReMaKE P*R"}[kind]
    lines = [f"{label} x100, mode={result['settings']['mode']}, protocol={result['settings']['protocol']}, "
             f"{result['items']} items" + (f"; {result['f1_definition']}" if kind == "f1" else ""),
             "", "| metric | " + " | ".join(languages) + " | avg |", "| --- |" + " --- |" * (len(languages) + 1)]
    for metric, row in table.items():
        cells = [f"{row[lang]:.2f}" if lang in row else "-" for lang in languages]
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {row['avg']:.2f} |")
    return "\n".join(lines)
