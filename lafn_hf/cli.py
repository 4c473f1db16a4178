"""``lafn`` command line: demo, edit, eval, neurons, info, push, models, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from .config import SUBJECT_SEARCHES, LafnConfig
from .editing.subject_span import resolve_group
from .models import TINY_MODEL, tiny_fact_group, tiny_facts, tiny_model_path
from .request import EditGroup

logger = logging.getLogger(__name__)


def _load_model(name: str, dtype: str = "auto", device: str = "auto") -> Any:
    """``name``: a shipped asset (tiny-bilingual), an offline model (gemma-3-270m, ...), a path or a Hub id.

    ``dtype`` "auto" loads float32 on CPU and the checkpoint's dtype on GPU; ``device`` "auto" is CUDA when
    available. Says on stderr what it loaded.
    """
    import torch

    from .model import EditableCausalLM
    from .models import OFFLINE_MODELS, load_dtype, materialize

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = load_dtype(dtype, device)
    if name == TINY_MODEL:
        path: str = str(tiny_model_path())
    elif name in OFFLINE_MODELS:
        path = str(materialize(name))
    else:
        path = name
    model = EditableCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device)
    parameter = next(model.parameters())
    print(f"lafn: loaded {name} in {parameter.dtype} on {parameter.device} (--dtype, --device to change)",
          file=sys.stderr)
    return model


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
    other_facts: dict[str, list[str]] = {}  # same subject, another relation: keeps its answer (question scope)
    if args.model == TINY_MODEL:
        group, held_out, unrelated = _tiny_demo_edit()
        config = LafnConfig(steps=60)  # layers: the toy's config pins 0, 1
    else:
        data = json.loads((resources.files("lafn_hf") / "assets" / "demo_eiffel.json").read_text("utf-8"))
        group, held_out, unrelated = EditGroup.from_dict(data["group"]), data["held_out"], data["unrelated"]
        other_facts = data["other_facts"]
        config = LafnConfig()
    model = _load_model(args.model, args.dtype, args.device)
    prompts = [(lang, e.prompt) for lang, e in group.edits.items()]
    prompts += [(lang, p) for lang, ps in held_out.items() for p in ps]
    prompts += [(f"{lang}, other fact", p) for lang, ps in other_facts.items() for p in ps]
    prompts += [("unrelated", p) for p in unrelated]
    before = [_generate(model, p) for _, p in prompts]
    print(f"Editing {args.model}: " + ", ".join(f"{lang}: {e.subject} -> {e.target}" for lang, e in group.edits.items()))
    result = model.edit(group, config)  # a progress bar when stderr is a terminal
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


def _read_groups(path: str) -> list[EditGroup]:
    text = Path(path).read_text("utf-8")
    try:
        return EditGroup.list_from_json(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    except (TypeError, ValueError) as error:
        raise type(error)(f"{path}: {error}") from None


def _read_groups_jsonl(path: str) -> list[EditGroup]:
    """JSON lines: one group per (non-blank) line; errors name the line."""
    groups = []
    for number, line in enumerate(Path(path).read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            groups.append(EditGroup.from_json(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON: {error}") from None
        except (TypeError, ValueError) as error:
            raise type(error)(f"{path} line {number}: {error}") from None
    if not groups:
        raise ValueError(f"{path} holds no edit group")
    return groups


def _cmd_edit_sharded(args: argparse.Namespace) -> int:
    """``lafn edit --groups FILE.jsonl``: resumable; sharded over ranks under torchrun (WORLD_SIZE > 1)."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from .distributed import edit_groups_sharded

    groups = _read_groups_jsonl(args.groups)  # checked before the model loads
    config = _config(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if world > 1:
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if use_cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        # ranks wait at the final barrier for the slowest one: allow a long run
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=24))
    try:
        model = _load_model(args.model, args.dtype, device)
        outcome = edit_groups_sharded(model, groups, args.out, config)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    prefix = f"[rank {outcome.rank}] " if outcome.world_size > 1 else ""
    for result in outcome.results:
        shown = {lang: round(p, 3) for lang, p in result.target_probabilities.items()}
        print(f"{prefix}{result.entry_id}: {result.subjects} p(target) {shown} in {result.wall_time_s:.1f}s")
    if not outcome.merged:
        return 1 if outcome.failures else 0
    for index, error in outcome.failures:
        print(f"group {index} failed: {error}", file=sys.stderr)
    resumed = f" ({len(outcome.resumed)} on rank 0 resumed from checkpoints)" if outcome.resumed else ""
    if not len(outcome.bank):
        print(f"no edit took; nothing was saved to {args.out}", file=sys.stderr)
        return 1
    print(f"saved {len(outcome.bank)} edit(s) from {outcome.world_size} rank(s) to {args.out}{resumed}")
    if outcome.failures:
        print(f"{len(outcome.failures)} of {len(groups)} group(s) failed (listed above); rerun the same command "
              "to retry them (finished groups are kept)", file=sys.stderr)
    return 1 if outcome.failures else 0


def _check_spans(groups: list[EditGroup], config: LafnConfig) -> None:
    """Every language's subject is found in its prompt (``lafn_hf.editing.subject_span``), before the model loads."""
    for number, group in enumerate(groups):
        try:
            resolve_group(group, config.subject_search, config.alignment_threshold)
        except ValueError as error:
            raise ValueError(f"group {number}: {error}") from None


def cmd_edit(args: argparse.Namespace) -> int:
    if args.groups:
        return _cmd_edit_sharded(args)
    groups = _read_groups(args.group)  # checked before the model loads
    config = _config(args)
    _check_spans(groups, config)
    model = _load_model(args.model, args.dtype, args.device)
    outcome = model.edit_many(groups, config, batch_size=args.batch_size)
    for result in outcome.results:
        shown = {lang: round(p, 3) for lang, p in result.target_probabilities.items()}
        print(f"{result.entry_id}: {result.subjects} p(target) {shown} in {result.wall_time_s:.1f}s")
        for span in result.spans.values():
            if span.how != "written":
                print(f"  {span.language}: {span.given!r} is written {span.text!r} in its prompt "
                      f"(found from {span.source!r}, {span.how}{f' {span.score:.0f}' if span.how == 'aligned' else ''})")
    for index, error in outcome.failures:
        print(f"group {index} failed: {error}", file=sys.stderr)
    if not outcome.results:
        print(f"no edit took; nothing was saved to {args.out}", file=sys.stderr)
        return 1
    model.save_pretrained(args.out)
    print(f"saved {len(model.bank)} edit(s) to {args.out}")
    if outcome.failures:
        print(f"{len(outcome.failures)} of {len(groups)} group(s) failed (listed above)", file=sys.stderr)
    return 1 if outcome.failures else 0


def cmd_info(args: argparse.Namespace) -> int:
    from .bank.store import load_bank

    bank, base = load_bank(args.bank, allow_common=True)  # shown, not used
    print(f"base model: {base.name_or_path} (revision {base.revision}, {base.model_type}, "
          f"{base.num_hidden_layers} layers, intermediate {base.intermediate_size})")
    for entry in bank:
        neurons = {layer: int(u.neurons.numel()) for layer, u in entry.updates.items()}
        print(f"- {entry.id}: {entry.subjects} -> {entry.metadata.get('targets', {})}; neurons per layer {neurons}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .bank.hub import push_bank, warn_if_local_base
    from .bank.store import load_bank

    bank, base = load_bank(args.bank, allow_common=True)  # the user's own bank, as edited
    if args.base_model:
        base = base.with_base_model(args.base_model)
    if args.dry_run:
        warn_if_local_base(base)
        revision = f"@{base.revision}" if base.revision else ""
        print(f"dry run: would push {len(bank)} edit(s) for {base.name_or_path}{revision} to {args.repo_id}")
        return 0
    print(push_bank(args.repo_id, bank, base, private=args.private, token=args.token, revision=args.revision))
    return 0


def _config(args: argparse.Namespace) -> LafnConfig:
    config = LafnConfig.from_json(Path(args.config).read_text("utf-8")) if args.config else LafnConfig()
    if getattr(args, "subject_search", None):
        config = LafnConfig.from_dict({**config.to_dict(), "subject_search": args.subject_search})
    if args.layers:
        config = LafnConfig.from_dict({**config.to_dict(), "layers": [int(x) for x in args.layers.split(",")]})
    return config


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalSettings, evaluate, markdown_table
    from .zsre import load_files

    settings = EvalSettings(mode=args.mode, protocol=args.protocol, margin=args.margin, limit=args.limit)
    items = load_files(args.data, args.langs.split(",") if args.langs else None)
    config = _config(args)
    model = _load_model(args.model, args.dtype, args.device)
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

    from .bench import BenchSettings, build_methods, load_locality_hard, markdown_table, reach_table, run_benchmark
    from .bench.methods import METHODS
    from .routing.config import ROUTING_PRESETS
    from .zsre import load_files

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
    config = _config(args)
    if args.locate_strategy:
        config = LafnConfig.from_dict({**config.to_dict(), "locate_strategy": args.locate_strategy})
    model = _load_model(args.model, args.dtype, args.device)
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
    from .editing.analysis import count_factual_neurons, plot_neuron_counts

    corpora: dict[str, list[str]] = {}
    for spec in args.corpus:
        lang, sep, file = spec.partition("=")
        if not sep or not lang or not file:
            raise ValueError(f"--corpus must look like LANG=FILE, got {spec!r}")
        corpora[lang] = [line.strip() for line in Path(file).read_text("utf-8").splitlines() if line.strip()]
    model = _load_model(args.model, args.dtype, args.device)
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


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve  # needs the serve extra (fastapi, uvicorn, openai)
    from .serve.requests import RequestLimits

    limits = RequestLimits() if args.max_new_tokens is None else RequestLimits(max_new_tokens=args.max_new_tokens)
    return serve(args.model, args.bank or [], host=args.host, port=args.port, dtype=args.dtype, device=args.device,
                 continuous_batching=args.continuous_batching, chat_template=args.chat_template,
                 admin=not args.no_admin, admin_token=args.admin_token, admin_token_file=args.admin_token_file,
                 allowed_hosts=args.allowed_host or [], limits=limits,
                 log_level="info" if args.verbose else "warning")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="LafnConfig JSON (keys as LafnConfig's fields; unknown keys are dropped)")
    parser.add_argument("--layers", help="comma-separated layer indices (default: the modeling/ table's)")


def _add_model_options(parser: argparse.ArgumentParser, required: bool = True, default: str | None = None,
                       help: str = f"a local folder, a Hub id, gemma-3-270m / smollm2-135m (offline) or {TINY_MODEL}"
                       ) -> None:
    from .models import DTYPES

    parser.add_argument("--model", required=required, default=default, help=help)
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights dtype (default auto: float32 on CPU, where bf16 edits are ~20x slower; the "
                        "checkpoint's dtype on GPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps... (default: cuda if available)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lafn-hf")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lafn", description="Multilingual knowledge editing (LAFN) for HF LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO level)")
    parser.add_argument("--version", action="version", version=f"lafn {_version()}",
                        help="print the lafn-hf version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="edit one fact in several languages and show generations before/after")
    _add_model_options(demo, required=False, default="gemma-3-270m",
                       help=f"gemma-3-270m (default: a real model, offline) or {TINY_MODEL} (seconds)")
    demo.add_argument("--out", help="where to save the bank (default: a temporary directory)")
    demo.set_defaults(run=cmd_demo)
    edit = sub.add_parser("edit", help="apply edit group(s) from a JSON file and save the bank")
    _add_model_options(edit)
    source = edit.add_mutually_exclusive_group(required=True)
    source.add_argument("--group", help="JSON: one group {lang: {prompt, subject, target, paraphrases}}"
                        " or a list of groups")
    source.add_argument("--groups", help="JSON lines, one group per line: resumable (each group is checkpointed "
                        "under OUT/.shards) and sharded across ranks under torchrun --nproc_per_node N")
    edit.add_argument("--out", required=True, help="directory to save the bank to (written only if an edit took)")
    edit.add_argument("--batch-size", type=int, default=1,
                      help="with --group: optimise this many groups in one forward per step (each its own dV)")
    edit.add_argument("--subject-search", choices=SUBJECT_SEARCHES,
                      help="how far each language's subject is looked for in its prompt when the prompt does not "
                           "write it as given (LafnConfig.subject_search; default 'aligned', 'written' turns it off)")
    _add_config_options(edit)
    edit.set_defaults(run=cmd_edit)
    info = sub.add_parser("info", help="describe a saved bank")
    info.add_argument("bank", help="a bank directory")
    info.set_defaults(run=cmd_info)
    push = sub.add_parser("push", help="push a saved bank to the Hugging Face Hub")
    push.add_argument("bank", help="a bank directory")
    push.add_argument("repo_id", help="Hub repo to create or update, user/name")
    push.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    push.add_argument("--token", help="Hub token (default: the one `hf auth login` saved, or HF_TOKEN)")
    push.add_argument("--revision", help="branch of the bank repo to push to")
    push.add_argument("--base-model", help="record this base model: org/name or org/name@revision (default: the "
                      "one the bank names; a local path there only loads on this machine)")
    push.add_argument("--dry-run", action="store_true", help="check the bank and say what would be pushed")
    push.set_defaults(run=cmd_push)
    evaluate = sub.add_parser("eval", help="the paper's metrics on Bi-ZsRE / MzsRE files (resumable)")
    _add_model_options(evaluate)
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
    _add_config_options(evaluate)
    evaluate.set_defaults(run=cmd_eval)
    bench = sub.add_parser("bench", help="editing methods side by side on MzsRE / Bi-ZsRE files (resumable)")
    _add_model_options(bench)
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
    bench.add_argument("--locate-strategy", choices=["paraphrases", "single", "all", "random"],
                       help="LAFN's locating (paper Table 4; default: the config's, paraphrases)")
    bench.add_argument("--routing", choices=["exact", "lexical", "unscoped", "full"], default="full",
                       help="routing stages for lafn: the exact matcher, + normalised matching and aliases, "
                            "+ keys (unscoped), + question scopes (full)")
    bench.add_argument("--subject-search", choices=SUBJECT_SEARCHES, default="aligned",
                       help="how far each language's subject is looked for in its question (LafnConfig.subject_search; "
                            "'written': only languages whose question writes the given subject are edited)")
    bench.add_argument("--out", required=True, help="directory: results.jsonl, summary.json, tables.md, plot.png")
    bench.add_argument("--fresh", action="store_true", help="start a new results file (the old one is kept renamed)")
    _add_config_options(bench)
    bench.set_defaults(run=cmd_bench)
    neurons = sub.add_parser("neurons", help="count factual neurons per layer and language (paper Fig. 2)")
    _add_model_options(neurons)
    neurons.add_argument("--corpus", required=True, action="append", help="LANG=FILE, one sentence per line")
    neurons.add_argument("--beta", type=float, default=0.8, help="activation-frequency threshold (Eq. 4)")
    neurons.add_argument("--layers", help="comma-separated layer indices (default: all)")
    neurons.add_argument("--plot", help="PNG path for a bar chart of the counts")
    neurons.set_defaults(run=cmd_neurons)
    models = sub.add_parser("models", help="materialize an offline real model (gemma-3-270m, smollm2-135m)")
    models.add_argument("name", help="gemma-3-270m or smollm2-135m")
    models.set_defaults(run=cmd_models)
    serve = sub.add_parser("serve", help="serve the model and banks on an OpenAI-compatible API (transformers serve)")
    serve.add_argument("--model", required=True, help="path, Hub id, tiny-bilingual or an offline model; the model "
                       "name that gets every bank")
    serve.add_argument("--bank", action="append", help="DIR or NAME=DIR (repeatable); served as MODEL+NAME")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    serve.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    serve.add_argument("--continuous-batching", action="store_true",
                       help="transformers' continuous batching: concurrent requests packed into one forward, "
                            "each read and edited with its own banks")
    serve.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's)")
    serve.add_argument("--admin-token", help="the token /lafn/banks requires ('Authorization: Bearer TOKEN'; default: "
                       "$LAFN_ADMIN_TOKEN, else a new one, printed and written to --admin-token-file)")
    serve.add_argument("--admin-token-file", help="where a new admin token is written, mode 0600 (default: "
                       "$XDG_RUNTIME_DIR or ~/.cache, lafn_hf/serve-PORT.token)")
    serve.add_argument("--no-admin", action="store_true", help="no /lafn/banks routes: the banks are fixed at start")
    serve.add_argument("--allowed-host", action="append", help="another name the Host header of admin calls may give "
                       "(repeatable; default: the address served)")
    serve.add_argument("--max-new-tokens", type=int, help="most tokens one request may generate; a request asking "
                       "for more is refused (default: 4096, RequestLimits in lafn_hf/serve/requests.py)")
    serve.set_defaults(run=cmd_serve)
    return parser


def _hub_problem(error: BaseException) -> str | None:
    """One line for a network failure or a refusal by the Hub (any HTTP client huggingface_hub uses), else None."""
    from huggingface_hub.errors import HfHubHTTPError

    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub refused the request: {first_line}"
    transport = any(cls.__name__ in ("TransportError", "ConnectionError", "Timeout")
                    and cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
                    for cls in type(error).__mro__)
    if transport or isinstance(error, (ConnectionError, TimeoutError)):
        return f"cannot reach the Hugging Face Hub ({type(error).__name__}: {first_line}); check the network"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.run(args))
    except Exception as error:
        problem = _hub_problem(error)
        if problem is not None:
            print(f"lafn {args.command}: error: {problem}", file=sys.stderr)
            return 1
        if isinstance(error, (ValueError, TypeError, ImportError, OSError)):
            print(f"lafn {args.command}: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
