"""Which layers to edit on Gemma-3-270M: three 3-layer windows on the demo edit (en, zh, de).

Counts, per window, the prompts (edit prompts + held-out paraphrases) that now start with the target,
and unrelated prompts whose greedy tokens changed (must be 0).

    python benchmarks/layer_choice.py
"""

from __future__ import annotations

import json
from importlib import resources

import torch

from lafn_hf import EditGroup, LafnConfig
from lafn_hf.cli.common import generate_text, load_model


def main() -> None:
    torch.set_num_threads(2)
    model = load_model("gemma-3-270m")
    data = json.loads((resources.files("lafn_hf") / "assets" / "demo_eiffel.json").read_text("utf-8"))
    group = EditGroup.from_dict(data["group"])
    checks = [(lang, e.prompt) for lang, e in group.edits.items()]
    checks += [(lang, p) for lang, prompts in data["held_out"].items() for p in prompts]
    unrelated_before = [generate_text(model, p) for p in data["unrelated"]]
    print("| layers | edited prompts answering the target | unrelated changed | steps | s/edit |")
    print("| --- | --- | --- | --- | --- |")
    for layers in ((3, 4, 5), (6, 7, 8), (9, 10, 11)):
        result = model.edit(group, LafnConfig(layers=layers, min_target_probability=0.0))  # keep weak edits: measured
        hits = sum(generate_text(model, p).startswith(group.edits[lang].target) for lang, p in checks)
        changed = sum(generate_text(model, p) != b for p, b in zip(data["unrelated"], unrelated_before))
        print(f"| {layers} | {hits}/{len(checks)} | {changed} | {result.steps} | {result.wall_time_s:.1f} |")
        model.remove_edit(result.entry_id)


if __name__ == "__main__":
    main()
