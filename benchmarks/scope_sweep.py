"""Question scopes on MzsRE dev: Generality against Locality-Hard, swept over the scope margin, in one run.

Each item of the shipped dev Locality-Hard set is edited once (LAFN, today's defaults, scopes stored), then its
Reliability (src), Generality (rephrase) and Locality-Hard questions are answered greedily with the scope off
(the paper's subject-only rule) and at each margin of ``--margins`` (``RoutingConfig.scope_margin_override``),
and unedited. Per language and margin it prints:

- Rel, Gen: answer hit (the target starts the answer), over questions whose subject the matcher finds;
- Loc-Hard kept: the answer equals the unedited one (normalised);
- hijacked: the edit's target occurs in the answer and not in the unedited one;
- F1: token F1 of the answer against the unedited answer (the paper's Locality-Hard metric);
- degenerate, over every question of the language: answers holding a special token (Gemma's
  ``<start_of_image>``) or naming the target twice or more, where the unedited answer does neither;
- repeats, over the Rel and Gen answers that hit: the target named twice or more where the unedited model,
  reading the question already answered with the target, does not name it again within as many tokens (the
  repetition the edit adds, not the base model's own habit of repeating a list: ", The Simpsons, The Simpsons").

Resumable: answers are appended to ``--out`` (JSON lines, one per item) and reused for the same settings.

    python benchmarks/scope_sweep.py --data ../shared/data/mzsre-dev/mzsre_dev_enzh.json --limit 50 \\
        --out scope-sweep-enzh.jsonl [--neighbour-kl 4] [--compare-scaled]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from lafn_hf import EditableCausalLM, LafnConfig
from lafn_hf.bank.entries import ScopeSpace
from lafn_hf.bench.metrics import answer_hit, contains, normalize_answer, same_answer, token_f1
from lafn_hf.bench.runner import applies, load_locality_hard
from lafn_hf.cli.common import load_model
from lafn_hf.evaluate import predict_batch
from lafn_hf.routing import RoutingConfig
from lafn_hf.routing.scope import calibrate_scope_space, entry_scope
from lafn_hf.tokens import target_separator
from lafn_hf.zsre import load_files, resolve_item

OFF = "off"
SCALED = "scaled "


def answers(model: EditableCausalLM, questions: list[str], tokens: int) -> list[list[int]]:
    return predict_batch(model, questions, "generate", None, [tokens] * len(questions))


def run_item(model: EditableCausalLM, item: Any, hard: dict[str, tuple[str, list[str]]], margins: list[float],
             tokens: int, config: LafnConfig, scaled: ScopeSpace | None = None) -> dict[str, Any]:
    """One item: its questions, the unedited answers, and the answers per setting (``OFF`` and each margin; with
    ``scaled``, also each margin with the entry's scope read in that space, as ``SCALED`` + margin)."""
    group, spans, _ = resolve_item(item)
    questions = []
    for lang, record in item.items():
        questions += [(lang, "rel", record.src, record.alt), (lang, "gen", record.rephrase, record.alt)]
        if lang in hard and applies(hard[lang][0], record.subject, spans.get(lang)):
            questions += [(lang, "loc_hard", question, record.alt) for question in hard[lang][1]]
    texts = [q[2] for q in questions]
    with model.edits_disabled():
        unedited = answers(model, texts, tokens)
        answered = answers(model, [q[2] + target_separator(q[2], q[3]) + q[3] for q in questions], tokens)
    record: dict[str, Any] = {"questions": questions, "unedited": unedited, "answered": answered, "answers": {},
                              "error": None}
    if group is None:
        record["error"] = "no subject found"
        return record
    base = model.routing
    started = time.perf_counter()
    try:
        result = model.edit(group, config)
    except ValueError as error:
        record["error"] = f"{type(error).__name__}: {error}"
        return record
    record["edit_s"] = time.perf_counter() - started
    record["steps"] = result.steps
    try:
        for setting in [OFF, *margins]:
            model.routing = (RoutingConfig(scope=False) if setting == OFF
                             else RoutingConfig(scope_margin_override=float(setting)))
            record["answers"][str(setting)] = answers(model, texts, tokens)
        if scaled is not None:
            answer_scaled(model, group, result.entry_id, scaled, margins, texts, tokens, config, record)
    finally:
        model.routing = base
        model.remove_edit(result.entry_id)
    return record


def answer_scaled(model: EditableCausalLM, group: Any, entry_id: str, space: ScopeSpace, margins: list[float],
                  texts: list[str], tokens: int, config: LafnConfig, record: dict[str, Any]) -> None:
    """The same dV with its scope read in ``space`` (the scope space without its discriminant basis), per margin."""
    entry = model.bank.get(entry_id)
    with model.edits_disabled():
        scope = entry_scope(model.model, model.tokenizer, group, space, RoutingConfig().scope_margin,
                            config.num_paraphrases)
    if scope is None:  # no sentence beside the subject: nothing to compare
        return
    model.remove_edit(entry_id)
    model.add_entry(dataclasses.replace(entry, scope=scope))
    for margin in margins:
        model.routing = RoutingConfig(scope_margin_override=margin)
        record["answers"][f"{SCALED}{margin}"] = answers(model, texts, tokens)


def degenerate(ids: list[int], answer: str, target: str, special: set[int]) -> bool:
    """A special token in the answer, or the target named twice or more."""
    return any(i in special for i in ids) or bool(target) and repeats(answer, target)


def repeats(answer: str, target: str) -> bool:
    return normalize_answer(answer).count(normalize_answer(target)) >= 2


def summarize(model: EditableCausalLM, records: list[dict[str, Any]], settings: list[str]) -> None:
    decode = model.tokenizer.decode
    tokenizer = model.tokenizer
    special = {int(i) for i in tokenizer.all_special_ids} | {
        int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    for lang in sorted({q[0] for r in records for q in r["questions"]}):
        print(f"\n{lang}: setting | Rel | Gen | Loc-Hard kept | hijacked | Loc-Hard F1 | degenerate | repeats | n(LH)")
        for setting in settings:
            counts: dict[str, list[float]] = {"rel": [], "gen": [], "kept": [], "hijacked": [], "f1": [],
                                              "degenerate": [], "repeats": []}
            for record in records:
                if setting not in record["answers"]:
                    continue
                read = record.get("answered") or [None] * len(record["questions"])
                for (q_lang, kind, _, target), ids, base_ids, after in zip(
                        record["questions"], record["answers"][setting], record["unedited"], read):
                    if q_lang != lang:
                        continue
                    answer, base = decode(ids, skip_special_tokens=True), decode(base_ids, skip_special_tokens=True)
                    counts["degenerate"].append(degenerate(ids, answer, target, special)
                                                and not degenerate(base_ids, base, target, special))
                    if kind in ("rel", "gen"):
                        counts[kind].append(answer_hit(answer, target))
                        if after is not None and answer_hit(answer, target):
                            # the unedited model reading the question answered with the target, same length
                            left = max(len(ids) - len(tokenizer(target, add_special_tokens=False)["input_ids"]), 0)
                            given = target + decode(after[:left], skip_special_tokens=True)
                            counts["repeats"].append(repeats(answer, target) and not repeats(given, target))
                    else:
                        counts["kept"].append(same_answer(answer, base))
                        counts["hijacked"].append(contains(answer, target) and not contains(base, target))
                        counts["f1"].append(token_f1(list(ids), list(base_ids)))
            row = " | ".join(f"{100 * sum(v) / len(v):5.1f}" if v else "  -  " for v in counts.values())
            print(f"{setting:>12} | {row} | {len(counts['kept'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--margins", default="-0.2,-0.15,-0.1,-0.05,0.0")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--neighbour-kl", type=int, default=0, help="LafnConfig.neighbour_kl for the edits")
    parser.add_argument("--continuation-kl", type=int, default=None,
                        help="LafnConfig.continuation_kl (default: its default)")
    parser.add_argument("--lambda-continuation", type=float, default=None, help="LafnConfig.lambda_continuation")
    parser.add_argument("--compare-scaled", action="store_true",
                        help="also answer each margin with the scope read in the space without its discriminant basis")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    margins = [float(m) for m in args.margins.split(",")]
    model = load_model(args.model)
    items = load_files([args.data])
    hard = load_locality_hard()
    config = LafnConfig(neighbour_kl=args.neighbour_kl)
    if args.continuation_kl is not None:
        config = dataclasses.replace(config, continuation_kl=args.continuation_kl)
    if args.lambda_continuation is not None:
        config = dataclasses.replace(config, lambda_continuation=args.lambda_continuation)
    settings = {"model": args.model, "data": Path(args.data).name, "margins": margins, "tokens": args.tokens,
                "config": config.to_dict(), "compare_scaled": args.compare_scaled}
    done: dict[int, dict[str, Any]] = {}
    if args.out.exists():
        lines = args.out.read_text("utf-8").splitlines()
        if lines and json.loads(lines[0]) == settings:
            done = {json.loads(line)["index"]: json.loads(line) for line in lines[1:]}
        else:
            raise SystemExit(f"{args.out} holds other settings; choose another --out")
    else:
        args.out.write_text(json.dumps(settings) + "\n", encoding="utf-8")
    indices = sorted(hard)[: args.limit]
    scaled = None
    if args.compare_scaled:
        layer = min(model.edit_layers(config))
        scaled = calibrate_scope_space(model.model, model.tokenizer, layer, discriminant=False)
    for index in indices:
        if index in done:
            continue
        record = run_item(model, items[index], hard[index], margins, args.tokens, config, scaled)
        record["index"] = index
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        done[index] = record
        print(f"item {index}: edit {record.get('edit_s', 0):.1f} s {record['error'] or ''}", flush=True)
    compared = [f"{SCALED}{m}" for m in margins] if args.compare_scaled else []
    summarize(model, [done[i] for i in indices if i in done], [OFF, *[str(m) for m in margins], *compared])


if __name__ == "__main__":
    main()
