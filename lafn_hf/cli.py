"""``lafn`` command line: demo, edit, eval, neurons, info, push, models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from .config import EditGroup, LafnConfig
from .models import TINY_MODEL, tiny_fact_group, tiny_facts, tiny_model_path

logger = logging.getLogger(__name__)


def _load_model(name: str, dtype: str = "float32") -> Any:
    """``name``: a shipped asset (tiny-bilingual), an offline model (gemma-3-270m, ...), a path or a Hub id."""
    import torch

    from .model import EditableCausalLM
    from .models import OFFLINE_MODELS, materialize

    if name == TINY_MODEL:
        path: str = str(tiny_model_path())
    elif name in OFFLINE_MODELS:
        path = str(materialize(name))
    else:
        path = name
    return EditableCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))


def _generate(model: Any, prompt: str, new_tokens: int = 8) -> str:
    encoded = model.tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False)
    text = model.tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return " ".join(text.replace("<start_of_image>", "").split())


def _tiny_demo_edit() -> tuple[EditGroup, dict[str, list[str]], list[str]]:
    """Fact 0 gets fact 1's capital in en and zh; templates 1-2 locate, template 3 is held out."""
    data = tiny_facts()
    group = tiny_fact_group(0, 1, facts=data)
    held_out = {lang: [data["templates"][lang][3].format(s=e.subject)] for lang, e in group.edits.items()}
    unrelated = [data["templates"][lang][0].format(s=data["facts"][5][lang]["subject"]) for lang in group.edits]
    return group, held_out, unrelated


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model == TINY_MODEL:
        group, held_out, unrelated = _tiny_demo_edit()
        config = LafnConfig(steps=60)  # layers: the toy's config pins 0, 1
    else:
        data = json.loads((resources.files("lafn_hf") / "assets" / "demo_eiffel.json").read_text("utf-8"))
        group, held_out, unrelated = EditGroup.from_dict(data["group"]), data["held_out"], data["unrelated"]
        config = LafnConfig()
    model = _load_model(args.model)
    prompts = [(lang, e.prompt) for lang, e in group.edits.items()]
    prompts += [(lang, p) for lang, ps in held_out.items() for p in ps] + [("unrelated", p) for p in unrelated]
    before = [_generate(model, p) for _, p in prompts]
    print(f"Editing {args.model}: " + ", ".join(f"{lang}: {e.subject} -> {e.target}" for lang, e in group.edits.items()))
    result = model.edit(group, config, progress=True)
    print(f"  layers {list(result.layers)}, shared neurons {result.shared_counts}, {result.steps} steps, "
          f"p(target) {({k: round(v, 3) for k, v in result.target_probabilities.items()})}, "
          f"{result.wall_time_s:.1f}s")
    after = [_generate(model, p) for _, p in prompts]
    print("\n| lang | prompt | before | after |\n| --- | --- | --- | --- |")
    for (lang, prompt), old, new in zip(prompts, before, after):
        print(f"| {lang} | {prompt} | {old} | {new} |")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lafn-demo-")) / "bank"
    model.save_pretrained(out)
    reloaded = type(model)(model.unwrap(), model.tokenizer)
    reloaded.load_bank(out)
    same = [_generate(reloaded, p) for _, p in prompts] == after
    print(f"\nsaved the bank to {out}; reloaded it: generations identical = {same}")
    return 0 if same else 1


def cmd_edit(args: argparse.Namespace) -> int:
    model = _load_model(args.model)
    config = _config(args)
    raw = json.loads(Path(args.group).read_text("utf-8"))
    groups = [EditGroup.from_dict(g) for g in (raw if isinstance(raw, list) else [raw])]
    outcome = model.edit_many(groups, config)
    for result in outcome.results:
        print(f"{result.entry_id}: p(target) {result.target_probabilities} in {result.wall_time_s:.1f}s")
    for index, error in outcome.failures:
        print(f"group {index} failed: {error}", file=sys.stderr)
    model.save_pretrained(args.out)
    print(f"saved {len(model.bank)} edit(s) to {args.out}")
    return 1 if outcome.failures else 0


def cmd_info(args: argparse.Namespace) -> int:
    from .hub import load_bank

    bank, base = load_bank(args.bank)
    print(f"base model: {base.name_or_path} (revision {base.revision}, {base.model_type}, "
          f"{base.num_hidden_layers} layers, intermediate {base.intermediate_size})")
    for entry in bank:
        neurons = {layer: int(u.neurons.numel()) for layer, u in entry.updates.items()}
        print(f"- {entry.id}: {entry.subjects} -> {entry.metadata.get('targets', {})}; neurons per layer {neurons}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import load_bank, push_bank

    bank, base = load_bank(args.bank)
    if args.dry_run:
        print(f"dry run: would push {len(bank)} edit(s) for {base.name_or_path} to {args.repo_id}")
        return 0
    print(push_bank(args.repo_id, bank, base, private=args.private, token=args.token, revision=args.revision))
    return 0


def _config(args: argparse.Namespace) -> LafnConfig:
    config = LafnConfig.from_json(Path(args.config).read_text("utf-8")) if args.config else LafnConfig()
    if args.layers:
        config = LafnConfig.from_dict({**config.to_dict(), "layers": [int(x) for x in args.layers.split(",")]})
    return config


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalSettings, evaluate, markdown_table
    from .zsre import load_files

    settings = EvalSettings(mode=args.mode, protocol=args.protocol, margin=args.margin, limit=args.limit)
    items = load_files(args.data, args.langs.split(",") if args.langs else None)
    config = _config(args)
    model = _load_model(args.model)
    out = Path(args.out)
    jsonl = Path(args.results) if args.results else out.with_suffix(".jsonl")
    result = evaluate(model, items, settings, jsonl, config)
    result["model"] = args.model
    result["data"] = [str(p) for p in args.data]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    matchable = ", ".join(f"{lang} {hit}/{total}" for lang, (hit, total) in result["matchable_subjects"].items())
    print(f"subjects found in the question (editable): {matchable}\n")
    print(markdown_table(result, "f1"))
    print(f"\nper-item results: {jsonl}; summary: {out}")
    return 0


def cmd_neurons(args: argparse.Namespace) -> int:
    from .analysis import count_factual_neurons, plot_neuron_counts

    corpora: dict[str, list[str]] = {}
    for spec in args.corpus:
        lang, sep, file = spec.partition("=")
        if not sep or not lang or not file:
            raise ValueError(f"--corpus must look like LANG=FILE, got {spec!r}")
        corpora[lang] = [line.strip() for line in Path(file).read_text("utf-8").splitlines() if line.strip()]
    model = _load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    counts = count_factual_neurons(model.model, model.tokenizer, corpora, args.beta, layers)
    names = list(counts)
    layer_ids = sorted(counts[names[0]])
    print("| layer | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names))
    for layer in layer_ids:
        print(f"| {layer} | " + " | ".join(str(counts[name][layer]) for name in names) + " |")
    if args.plot:
        plot_neuron_counts(counts, args.plot, title=f"Factual neurons (beta={args.beta}) of {args.model}")
        print(f"plot: {args.plot}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import materialize

    print(materialize(args.name))
    return 0


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="LafnConfig JSON")
    parser.add_argument("--layers", help="comma-separated layer indices (default: the modeling/ table's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lafn", description="Multilingual knowledge editing (LAFN) for HF LMs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="edit one fact in several languages and show generations before/after")
    demo.add_argument("--model", default="gemma-3-270m", help=f"gemma-3-270m (default) or {TINY_MODEL}")
    demo.add_argument("--out", help="where to save the bank (default: a temporary directory)")
    demo.set_defaults(run=cmd_demo)
    edit = sub.add_parser("edit", help="apply edit group(s) from a JSON file and save the bank")
    edit.add_argument("--model", required=True)
    edit.add_argument("--group", required=True, help="JSON: one group {lang: {prompt, subject, target, paraphrases}}"
                      " or a list of groups")
    edit.add_argument("--out", required=True)
    _add_config_options(edit)
    edit.set_defaults(run=cmd_edit)
    info = sub.add_parser("info", help="describe a saved bank")
    info.add_argument("bank")
    info.set_defaults(run=cmd_info)
    push = sub.add_parser("push", help="push a saved bank to the Hugging Face Hub")
    push.add_argument("bank")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true", default=None)
    push.add_argument("--token")
    push.add_argument("--revision")
    push.add_argument("--dry-run", action="store_true")
    push.set_defaults(run=cmd_push)
    evaluate = sub.add_parser("eval", help="the paper's metrics on Bi-ZsRE / MzsRE files (resumable)")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True, nargs="+", help="bizsre_test.json or MzsRE pair files (merged)")
    evaluate.add_argument("--langs", help="comma-separated languages to keep (default: all in the files)")
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--protocol", choices=["single", "sequential"], default="single")
    evaluate.add_argument("--mode", choices=["generate", "teacher_forced"], default="generate")
    evaluate.add_argument("--margin", type=int, default=2, help="extra tokens decoded beyond the gold length")
    evaluate.add_argument("--out", required=True, help="summary JSON")
    evaluate.add_argument("--results", help="per-item JSONL (default: --out with .jsonl); reruns resume from it")
    _add_config_options(evaluate)
    evaluate.set_defaults(run=cmd_eval)
    neurons = sub.add_parser("neurons", help="count factual neurons per layer and language (paper Fig. 2)")
    neurons.add_argument("--model", required=True)
    neurons.add_argument("--corpus", required=True, action="append", help="LANG=FILE, one sentence per line")
    neurons.add_argument("--beta", type=float, default=0.8)
    neurons.add_argument("--layers", help="comma-separated layer indices (default: all)")
    neurons.add_argument("--plot", help="PNG path")
    neurons.set_defaults(run=cmd_neurons)
    models = sub.add_parser("models", help="materialize an offline real model (gemma-3-270m, smollm2-135m)")
    models.add_argument("name")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.run(args))
    except (ValueError, TypeError, ImportError, OSError) as error:
        print(f"lafn {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
