"""Routing reach and false fires on the MzsRE dev split, stage by stage (issue: routing beyond exact match).

For each pair file en-xx (../shared/data/mzsre-dev, 343 items, never copied into the repository) one bank
holds an entry per item, made from the item's en and xx sides: both subjects, the aliases stage's aliases
(the item's subject in the 10 other MzsRE languages: what a multilingual knowledge base gives), and a
routing key (``lafn_hf.routing.entry_key`` over the en and xx edit prompts that show their subject,
calibrated against the other entries' keys as ``edit()`` does: ``lafn_hf.routing.keys.separate``). The
entries' dV is a zero placeholder: only routing is measured, with ``lafn_hf.routing.routes``.

Per language and stage (exact, +normalised, +inflections, +spellings, +aliases, +representation):
- reach: share of the item's src / rephrase questions on which the item's own entry fires;
- wrong: share of those questions on which another item's entry fires;
- loc: share of loc questions (unrelated) on which any entry fires.
English is reported from the en-zh pair.

    python benchmarks/routing_reach.py                      # Gemma-3-270M, every language, 343 items
    python benchmarks/routing_reach.py --langs de,zh --limit 50
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lafn_hf import BankEntry, EditableCausalLM, EditBank, EditGroup, LanguageEdit, LayerUpdate
from lafn_hf.cli.common import load_model
from lafn_hf.routing import RoutingConfig, entry_key, routes
from lafn_hf.routing.keys import calibrate_key_space, separate
from lafn_hf.zsre import load_files

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre-dev"
LANGS = ("cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh")
FILES = {"cs": "cz", "nl": "du"}
STAGES = {
    "exact": RoutingConfig(normalize=False, aliases=False, inflections=False, spellings=False, representation=False),
    "+normalised": RoutingConfig(aliases=False, inflections=False, spellings=False, representation=False),
    "+inflections": RoutingConfig(aliases=False, spellings=False, representation=False),
    "+spellings": RoutingConfig(aliases=False, representation=False),
    "+aliases": RoutingConfig(representation=False),
    "+representation": RoutingConfig(),
}


def language_edit(record: Any) -> LanguageEdit | None:
    try:
        return LanguageEdit(record.src, record.subject, record.alt or "-", allow_common_subject=True)
    except (TypeError, ValueError):
        return None  # the subject does not occur in its question


def build_bank(editable: EditableCausalLM, items: list[Any], xx: str, layer: int, keys: bool = True) -> EditBank:
    space, negatives = calibrate_key_space(editable.model, editable.tokenizer, layer) if keys else (None, None)
    bank = EditBank()
    placeholder = {layer: LayerUpdate(torch.zeros(1, dtype=torch.int64), torch.zeros(1))}
    for index, item in enumerate(items):
        edits = {lang: e for lang in ("en", xx) if (e := language_edit(item[lang])) is not None}
        key = None
        if edits and space is not None and negatives is not None:
            key = entry_key(editable.model, editable.tokenizer, EditGroup(edits), space, negatives, editable.routing)
        aliases = tuple(r.subject for lang, r in item.items() if lang not in ("en", xx) and r.subject.strip())
        subjects = {lang: item[lang].subject for lang in ("en", xx) if item[lang].subject.strip()}
        entry, raised = separate(bank, BankEntry(subjects, placeholder, id=f"item-{index}", aliases=aliases, key=key),
                                 editable.routing.threshold_margin)  # as edit() calibrates against the bank
        for other in raised:
            bank.replace(other)
        bank.add(entry)
    return bank


def measure(editable: EditableCausalLM, items: list[Any], lang: str, stop_at: int) -> dict[str, float]:
    counts = {}
    for kind in ("src", "rephrase", "loc"):
        texts = [getattr(item[lang], kind) for item in items]
        found = routes(editable, texts, batch_size=32, stop_at=stop_at)
        own = [any(r.entry_id == f"item-{i}" for r in hits) for i, hits in enumerate(found)]
        other = [any(r.entry_id != f"item-{i}" for r in hits) for i, hits in enumerate(found)]
        if kind == "loc":
            counts["loc"] = 100 * sum(bool(hits) for hits in found) / len(items)
        else:
            counts[f"{kind}"] = 100 * sum(own) / len(items)
            counts[f"{kind} wrong"] = 100 * sum(other) / len(items)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--langs", default=",".join(LANGS), help="MzsRE languages besides en")
    parser.add_argument("--limit", type=int, default=343)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to measure")
    parser.add_argument("--lexical-only", action="store_true",
                        help="no routing keys (the lexical stages need no forward for them; much faster)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    unknown = sorted(set(args.stages.split(",")) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    editable: EditableCausalLM = load_model(args.model)
    layer = min(editable.edit_layers())
    paths = [args.data_dir / f"mzsre_dev_en{FILES.get(lang, lang)}.json" for lang in LANGS]
    items = load_files(paths)[: args.limit]
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for xx in args.langs.split(","):
        editable.set_bank(build_bank(editable, items, xx, layer, keys=not args.lexical_only))
        for stage in args.stages.split(","):
            routing = STAGES[stage]
            editable.routing = routing
            for lang in (["en"] if xx == "zh" else []) + [xx]:
                rows.setdefault(lang, {})[stage] = measure(editable, items, lang, layer + 1)
        print(f"{xx} done ({time.perf_counter() - started:.0f} s)", flush=True)
    columns = ("src", "rephrase", "src wrong", "rephrase wrong", "loc")
    print(f"\n{args.model}, {len(items)} MzsRE dev items per language; % of questions "
          "(reach: own entry fires; wrong: another item's entry fires; loc: any entry fires on a loc question)\n")
    print("| lang | stage | " + " | ".join(columns) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in columns) + " |")
    for lang, stages in rows.items():
        for stage, counts in stages.items():
            print(f"| {lang} | {stage} | " + " | ".join(f"{counts[c]:.1f}" for c in columns) + " |")
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
