"""Seconds per edit group (30 paraphrases, M=4 prefixes) with and without the upper-layer shortcut.

Tiny shipped model (2 languages) and Gemma-3-270M (2 and 3 languages); prints ratios and peak RSS.

    python benchmarks/edit_speed.py [--skip-gemma]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from importlib import resources

import torch

from lafn_hf import EditableCausalLM, EditGroup, LafnConfig, LanguageEdit
from lafn_hf.cli.common import load_model
from lafn_hf.models import tiny_fact_group

LEADS = ["", "Tell me: ", "Question: ", "Quick fact: ", "I wonder: ", "Note: ", "Trivia: ", "Answer this: ",
         "Do you know? ", "Fact check: ", "Hint: ", "Quiz: "]


def with_paraphrases(group: EditGroup, count: int = 30) -> EditGroup:
    edits = {}
    for lang, edit in group.edits.items():
        pool = [lead + p for lead in LEADS for p in (edit.prompt, *edit.paraphrases)]
        edits[lang] = LanguageEdit(edit.prompt, edit.subject, edit.target, tuple(pool[1 : count + 1]))
    return EditGroup(edits)


def seconds_per_edit(model: EditableCausalLM, group: EditGroup, config: LafnConfig) -> tuple[float, int]:
    start = time.perf_counter()
    result = model.edit(group, config)
    model.remove_edit(result.entry_id)
    return time.perf_counter() - start, result.steps


def report(name: str, model: EditableCausalLM, group: EditGroup, layers: tuple[int, ...] | None) -> None:
    # same work with and without the shortcut; timing only, so no edit is refused for its p(target)
    fixed = dict(layers=layers, steps=20, early_stop_loss=0.0, min_target_probability=0.0)
    model.edit(group, LafnConfig(layers=layers, steps=1, min_target_probability=0.0))  # warm-up
    fast, steps = seconds_per_edit(model, group, LafnConfig(**fixed))
    slow, _ = seconds_per_edit(model, group, LafnConfig(**fixed, upper_layer_shortcut=False))
    default, default_steps = seconds_per_edit(model, group, LafnConfig(layers=layers, min_target_probability=0.0))
    print(f"| {name} | {len(group.edits)} | {default:.2f} ({default_steps} steps) | {fast:.2f} | {slow:.2f} "
          f"| {slow / fast:.2f} | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-gemma", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model | languages | s/edit, defaults | s/edit, 20 steps, shortcut | s/edit, 20 steps, full forward "
          "| speed-up | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    tiny = load_model("tiny-bilingual")
    tiny_group = tiny_fact_group(0, 1)
    report("tiny-bilingual (layers 2,3)", tiny, with_paraphrases(tiny_group), (2, 3))
    if args.skip_gemma:
        return
    gemma = load_model("gemma-3-270m")
    demo = json.loads((resources.files("lafn_hf") / "assets" / "demo_eiffel.json").read_text("utf-8"))
    full = with_paraphrases(EditGroup.from_dict(demo["group"]))
    report("gemma-3-270m", gemma, EditGroup({k: full.edits[k] for k in ("en", "zh")}), None)
    report("gemma-3-270m", gemma, full, None)


if __name__ == "__main__":
    main()
