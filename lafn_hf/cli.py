"""``lafn`` command line: demo, edit, info, push, models."""

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

logger = logging.getLogger(__name__)
TINY_MODEL = "tiny-bilingual"


def _load_model(name: str, dtype: str = "float32") -> Any:
    """``name``: a shipped asset (tiny-bilingual), an offline model (gemma-3-270m, ...), a path or a Hub id."""
    import torch

    from .model import EditableCausalLM
    from .models import OFFLINE_MODELS, materialize

    if name == TINY_MODEL:
        path: str = str(resources.files("lafn_hf") / "assets" / TINY_MODEL)
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


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model == TINY_MODEL:
        data = json.loads((resources.files("lafn_hf") / "assets" / TINY_MODEL / "facts.json").read_text("utf-8"))
        fact, other = data["facts"][0], data["facts"][1]
        group = EditGroup.from_dict({"zh": {"prompt": data["templates"]["zh"][0].format(s=fact["zh"]["subject"]),
                                            "subject": fact["zh"]["subject"], "target": other["zh"]["object"],
                                            "paraphrases": [t.format(s=fact["zh"]["subject"])
                                                            for t in data["templates"]["zh"][1:]]}})
        held_out = {"zh": [data["templates"]["zh"][1].format(s=fact["zh"]["subject"])]}
        unrelated = [data["templates"]["en"][0].format(s=data["facts"][5]["en"]["subject"])]
        config = LafnConfig(layers=(0, 1))
    else:
        data = json.loads((resources.files("lafn_hf") / "assets" / "demo_eiffel.json").read_text("utf-8"))
        group, held_out, unrelated = EditGroup.from_dict(data["group"]), data["held_out"], data["unrelated"]
        config = LafnConfig()
    model = _load_model(args.model)
    prompts = [(lang, e.prompt) for lang, e in group.edits.items()]
    prompts += [(lang, p) for lang, ps in held_out.items() for p in ps] + [("unrelated", p) for p in unrelated]
    before = [_generate(model, p) for _, p in prompts]
    print(f"Editing {args.model}: " + ", ".join(f"{lang}: {e.subject} -> {e.target}" for lang, e in group.edits.items()))
    result = model.edit(group, config)
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
    config = LafnConfig.from_json(Path(args.config).read_text("utf-8")) if args.config else LafnConfig()
    if args.layers:
        config = LafnConfig.from_dict({**config.to_dict(), "layers": [int(x) for x in args.layers.split(",")]})
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


def cmd_models(args: argparse.Namespace) -> int:
    from .models import materialize

    print(materialize(args.name))
    return 0


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
    edit.add_argument("--config", help="LafnConfig JSON")
    edit.add_argument("--layers", help="comma-separated layer indices")
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
