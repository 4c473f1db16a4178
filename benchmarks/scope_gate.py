"""The question scope's gate alone, on MzsRE dev: which rephrasings and Locality-Hard questions it admits, per margin.

No dV is optimised: each item's group gets its question scope exactly as ``edit()`` stores it (the same spans,
prompts and scope space), and each question is judged by the inference rule (its subject found, its sentence
pooled at the first edited layer, nearest own vector or own relation minus nearest other relation). A question
passes at margin ``m`` when that difference is >= m; a question whose subject is not found fails. It takes a
minute for 150 items on 2 CPU cores (one forward to layer 3 per question), against hours for the end-to-end
sweep (``scope_sweep.py``), and predicted it within a few points (en+zh, 50 items, margin -0.1: gate en 80 /
zh 92 of rephrasings, sweep Gen 76 / 90).

    python benchmarks/scope_gate.py --data ../shared/data/mzsre-dev/mzsre_dev_enzh.json --limit 150
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch

from lafn_hf import EditableCausalLM, LafnConfig
from lafn_hf.bench.runner import LocalityHard, applies, load_locality_hard
from lafn_hf.cli.common import load_model
from lafn_hf.editing.self_paraphrase import write_paraphrases
from lafn_hf.routing import RoutingConfig
from lafn_hf.routing.keys import layer_inputs
from lafn_hf.routing.scope import ScopeIndex, calibrate_scope_space, entry_scope, occurrence_states
from lafn_hf.zsre import Item, edit_group, load_files, resolve_item, subject_forms

MARGINS = (-0.3, -0.2, -0.15, -0.1, -0.05, 0.0)


def gate_margins(model: EditableCausalLM, items: list[Item], hard: LocalityHard,
                 written: int = 0, layer: int | None = None, discriminant: bool = True
                 ) -> dict[tuple[str, str], list[float]]:
    """(kind, language) -> each question's scope difference (NaN: subject not found); ``written``: the
    paraphrases the model writes per language (``LafnConfig.write_paraphrases``) join the scope's own side;
    ``layer``: read the scope there instead of at the first edited layer; ``discriminant``: the scope space's
    discriminant basis (off: the space of banks made before it)."""
    config, scoped = LafnConfig(write_paraphrases=written), RoutingConfig()
    first = min(model.edit_layers(config)) if layer is None else layer
    space = calibrate_scope_space(model.model, model.tokenizer, first, discriminant)
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for index, item in enumerate(items):
        group = edit_group(item)
        if group is None:
            continue
        if written:
            group = write_paraphrases(model.model, model.tokenizer, group, config)
        scope = entry_scope(model.model, model.tokenizer, group, space, scoped.scope_margin, config.num_paraphrases)
        if scope is None:
            continue
        spans = resolve_item(item)[1]
        forms = subject_forms(item, spans)
        questions = []
        for lang, record in item.items():
            questions.append(("rephrase", lang, record.rephrase))
            subject, hard_questions = hard.get(index, {}).get(lang, ("", []))
            if applies(subject, record.subject, spans.get(lang)):
                questions += [("loc-hard", lang, q) for q in hard_questions]
        judge = ScopeIndex(scope, scope.space, None)
        states = layer_inputs(model.model, model.tokenizer, [q[2] for q in questions], first)
        for (kind, lang, text), state in zip(questions, states):
            pooled = occurrence_states(model.tokenizer, [text], [forms], [state])
            out[kind, lang].append(float(judge.margins(torch.stack(pooled)).max()) if pooled else math.nan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", nargs="+", required=True, help="MzsRE dev pair files, merged by index")
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-paraphrases", type=int, default=0,
                        help="LafnConfig.write_paraphrases: the model's own paraphrases join the scope's side")
    parser.add_argument("--layer", type=int, default=None,
                        help="read the scope at this layer's input (default: the first edited layer)")
    parser.add_argument("--space", choices=("discriminant", "scaled"), default="discriminant",
                        help="the scope space: with its discriminant basis (today), or scaled only (before it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    items = load_files(args.data)[: args.limit]
    margins = gate_margins(model, items, load_locality_hard(), args.write_paraphrases, args.layer,
                          args.space == "discriminant")
    print("| kind | lang | n | subject not found | " + " | ".join(f"pass at {m:+.2f}" for m in MARGINS) + " |")
    print("| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in MARGINS) + " |")
    for (kind, lang), values in sorted(margins.items()):
        cells = " | ".join(f"{100 * sum(v >= m for v in values if not math.isnan(v)) / len(values):.1f}"
                           for m in MARGINS)
        print(f"| {kind} | {lang} | {len(values)} | {sum(math.isnan(v) for v in values)} | {cells} |")
    print("\n" + "; ".join(f"{lang} area {area:.3f}" for lang, area in areas(margins).items()))


def areas(margins: dict[tuple[str, str], list[float]]) -> dict[str, float]:
    """Per language, the area under the rephrase-against-Locality-Hard curve: how often a rephrasing's difference
    beats a Locality-Hard question's (ties count half; a subject not found scores lowest)."""
    out = {}
    for (kind, lang), values in sorted(margins.items()):
        hard = margins.get(("loc-hard", lang))
        if kind != "rephrase" or not hard:
            continue
        good = torch.tensor(values).nan_to_num(-math.inf)[:, None]
        bad = torch.tensor(hard).nan_to_num(-math.inf)[None]
        out[lang] = float((good > bad).double().mean() + 0.5 * (good == bad).double().mean())
    return out


if __name__ == "__main__":
    main()
