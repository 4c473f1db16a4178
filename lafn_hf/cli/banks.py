"""``lafn demo``, ``lafn edit``, ``lafn info``, ``lafn push``: making an edit bank and sharing it."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path

from ..config import SUBJECT_SEARCHES, LafnConfig
from ..editing.subject_span import resolve_group
from ..models import TINY_MODEL, tiny_fact_group, tiny_facts
from ..request import EditGroup
from .common import add_config_options, add_model_options, config_from_args, generate_text, load_model


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
    model = load_model(args.model, args.dtype, args.device)
    prompts = [(lang, e.prompt) for lang, e in group.edits.items()]
    prompts += [(lang, p) for lang, ps in held_out.items() for p in ps]
    prompts += [(f"{lang}, other fact", p) for lang, ps in other_facts.items() for p in ps]
    prompts += [("unrelated", p) for p in unrelated]
    before = [generate_text(model, p) for _, p in prompts]
    print(f"Editing {args.model}: " + ", ".join(f"{lang}: {e.subject} -> {e.target}" for lang, e in group.edits.items()))
    result = model.edit(group, config)  # a progress bar when stderr is a terminal
    print(f"  layers {list(result.layers)}, shared neurons {result.shared_counts}, {result.steps} steps, "
          f"p(target) {({k: round(v, 3) for k, v in result.target_probabilities.items()})}, "
          f"{result.wall_time_s:.1f}s")
    after = [generate_text(model, p) for _, p in prompts]
    print("\n| lang | prompt | before | after |\n| --- | --- | --- | --- |")
    for (lang, prompt), old, new in zip(prompts, before, after):
        print(f"| {lang} | {prompt} | {old} | {new} |")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lafn-demo-")) / "bank"
    model.save_pretrained(out)
    reloaded = type(model)(model.unwrap(), model.tokenizer)
    reloaded.load_bank(out)
    same = [generate_text(reloaded, p) for _, p in prompts] == after
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

    from ..distributed import edit_groups_sharded

    groups = _read_groups_jsonl(args.groups)  # checked before the model loads
    config = config_from_args(args)
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
        model = load_model(args.model, args.dtype, device)
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
    config = config_from_args(args)
    _check_spans(groups, config)
    model = load_model(args.model, args.dtype, args.device)
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
    from ..bank.store import load_bank

    bank, base = load_bank(args.bank, allow_common=True)  # shown, not used
    print(f"base model: {base.name_or_path} (revision {base.revision}, {base.model_type}, "
          f"{base.num_hidden_layers} layers, intermediate {base.intermediate_size})")
    for entry in bank:
        neurons = {layer: int(u.neurons.numel()) for layer, u in entry.updates.items()}
        print(f"- {entry.id}: {entry.subjects} -> {entry.metadata.get('targets', {})}; neurons per layer {neurons}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..bank.hub import push_bank, warn_if_local_base
    from ..bank.store import load_bank

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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The subcommands of this module, on ``lafn``'s parser."""
    demo = sub.add_parser("demo", help="edit one fact in several languages and show generations before/after")
    add_model_options(demo, required=False, default="gemma-3-270m",
                      help=f"gemma-3-270m (default: a real model, offline) or {TINY_MODEL} (seconds)")
    demo.add_argument("--out", help="where to save the bank (default: a temporary directory)")
    demo.set_defaults(run=cmd_demo)
    edit = sub.add_parser("edit", help="apply edit group(s) from a JSON file and save the bank")
    add_model_options(edit)
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
    add_config_options(edit)
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
