"""``lafn eval``, ``lafn bench``, ``lafn neurons``: the paper's metrics, methods side by side, neuron counts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import LOCATE_STRATEGIES, SUBJECT_SEARCHES, LafnConfig
from ..routing.config import ROUTING_PRESETS
from .common import add_config_options, add_model_options, config_from_args, load_model


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluate import EvalSettings, evaluate, markdown_table
    from ..zsre import load_files

    settings = EvalSettings(mode=args.mode, protocol=args.protocol, margin=args.margin, limit=args.limit)
    items = load_files(args.data, args.langs.split(",") if args.langs else None)
    config = config_from_args(args)
    model = load_model(args.model, args.dtype, args.device)
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


def cmd_bench(args: argparse.Namespace) -> int:
    """``lafn bench``: several editing methods side by side on the same items (``lafn_hf.bench``)."""
    import importlib.util
    import time

    from ..bench import BenchSettings, build_methods, load_locality_hard, markdown_table, reach_table, run_benchmark
    from ..bench.methods import METHODS
    from ..zsre import load_files

    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "lora" in names and importlib.util.find_spec("peft") is None:
        raise ImportError("--methods lora needs peft: pip install peft")
    settings = BenchSettings(mode=args.mode, margin=args.margin, free_tokens=args.free_tokens, limit=args.limit,
                             batch_size=args.batch_size, subject_search=args.subject_search)
    items = load_files(args.data, args.langs.split(",") if args.langs else None)
    hard = load_locality_hard(args.locality_hard)
    config = config_from_args(args)
    if args.locate_strategy:
        config = LafnConfig.from_dict({**config.to_dict(), "locate_strategy": args.locate_strategy})
    model = load_model(args.model, args.dtype, args.device)
    model.routing = ROUTING_PRESETS[args.routing]
    started = time.perf_counter()
    summary = run_benchmark(model, items, build_methods(names, model, config), args.out, settings,
                            locality_hard=hard, fresh=args.fresh)
    print(markdown_table(summary, "hit"))
    print(f"\n{reach_table(summary)}")
    out = Path(args.out)
    print(f"\n{time.perf_counter() - started:.0f}s. Tables (hit, contains, F1): {out / 'tables.md'}; summary: "
          f"{out / 'summary.json'}; plot: {out / 'plot.png'}; per-item results (resumable): {out / 'results.jsonl'}")
    return 0


def cmd_neurons(args: argparse.Namespace) -> int:
    from ..editing.analysis import count_factual_neurons, plot_neuron_counts

    corpora: dict[str, list[str]] = {}
    for spec in args.corpus:
        lang, sep, file = spec.partition("=")
        if not sep or not lang or not file:
            raise ValueError(f"--corpus must look like LANG=FILE, got {spec!r}")
        corpora[lang] = [line.strip() for line in Path(file).read_text("utf-8").splitlines() if line.strip()]
    model = load_model(args.model, args.dtype, args.device)
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The subcommands of this module, on ``lafn``'s parser."""
    evaluate = sub.add_parser("eval", help="the paper's metrics on Bi-ZsRE / MzsRE files (resumable)")
    add_model_options(evaluate)
    evaluate.add_argument("--data", required=True, nargs="+", help="bizsre_test.json or MzsRE pair files (merged)")
    evaluate.add_argument("--langs", help="comma-separated languages to keep (default: all in the files)")
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N items")
    evaluate.add_argument("--protocol", choices=["single", "sequential"], default="single",
                          help="single: roll each edit back (the paper's); sequential: keep edits accumulating")
    evaluate.add_argument("--mode", choices=["generate", "teacher_forced"], default="generate",
                          help="generate: greedy decoding; teacher_forced: argmax at each gold position")
    evaluate.add_argument("--margin", type=int, default=2, help="extra tokens decoded beyond the gold length")
    evaluate.add_argument("--out", required=True, help="summary JSON")
    evaluate.add_argument("--results", help="per-item JSONL (default: --out with .jsonl); reruns resume from it")
    add_config_options(evaluate)
    evaluate.set_defaults(run=cmd_eval)
    bench = sub.add_parser("bench", help="editing methods side by side on MzsRE / Bi-ZsRE files (resumable)")
    add_model_options(bench)
    bench.add_argument("--data", required=True, nargs="+", help="MzsRE pair files (merged by index) or bizsre_test.json")
    bench.add_argument("--methods", default="lafn,unedited,in-context",
                       help="comma-separated: lafn, unedited, in-context, lora (lora needs peft)")
    bench.add_argument("--langs", help="comma-separated languages to keep (default: all in the files)")
    bench.add_argument("--limit", type=int, help="run only the first N items")
    bench.add_argument("--mode", choices=["generate", "teacher_forced"], default="generate",
                       help="generate: greedy decoding (default); teacher_forced: argmax at each gold position")
    bench.add_argument("--margin", type=int, default=2, help="extra tokens decoded beyond the gold answer's length")
    bench.add_argument("--free-tokens", type=int, default=10, help="tokens decoded for a Locality-Hard question")
    bench.add_argument("--batch-size", type=int, default=16,
                       help="questions answered per generate() call (left-padded; 1: one by one)")
    bench.add_argument("--locality-hard", help="Locality-Hard JSON (default: the set shipped for the MzsRE dev split)")
    bench.add_argument("--locate-strategy", choices=LOCATE_STRATEGIES,
                       help="LAFN's locating (paper Table 4; default: the config's, paraphrases)")
    bench.add_argument("--routing", choices=list(ROUTING_PRESETS), default="full",
                       help="routing stages for lafn: the exact matcher, + normalised matching and aliases, "
                            "+ keys (unscoped), + question scopes (full)")
    bench.add_argument("--subject-search", choices=SUBJECT_SEARCHES, default="aligned",
                       help="how far each language's subject is looked for in its question (LafnConfig.subject_search; "
                            "'written': only languages whose question writes the given subject are edited)")
    bench.add_argument("--out", required=True, help="directory: results.jsonl, summary.json, tables.md, plot.png")
    bench.add_argument("--fresh", action="store_true", help="start a new results file (the old one is kept renamed)")
    add_config_options(bench)
    bench.set_defaults(run=cmd_bench)
    neurons = sub.add_parser("neurons", help="count factual neurons per layer and language (paper Fig. 2)")
    add_model_options(neurons)
    neurons.add_argument("--corpus", required=True, action="append", help="LANG=FILE, one sentence per line")
    neurons.add_argument("--beta", type=float, default=0.8, help="activation-frequency threshold (Eq. 4)")
    neurons.add_argument("--layers", help="comma-separated layer indices (default: all)")
    neurons.add_argument("--plot", help="PNG path for a bar chart of the counts")
    neurons.set_defaults(run=cmd_neurons)
