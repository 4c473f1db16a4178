"""Edit success on the shipped tiny model: every fact i gets fact i+1's capital, in en and zh at once.

Per setting: the share of prompts (4 templates per language: the edit prompt, the two locating-only
paraphrases and one held-out template) whose greedy answer starts with the new capital, the number
of unrelated prompts (fact i+25, both languages) whose greedy tokens changed, and seconds per edit.
Layer 0 of the toy has no attention (see scripts/train_tiny_model.py), so edits must include it.

    python benchmarks/tiny_edit_success.py [--facts 50]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from lafn_hf import EditableCausalLM, LafnConfig
from lafn_hf.cli.common import generate_text, load_model
from lafn_hf.models import tiny_fact_group, tiny_facts

LANGUAGES = ("en", "zh")
KEEP_ALL = dict(steps=60, min_target_probability=0.0)  # measure what every edit does, also those edit() would refuse
SETTINGS = {
    "layers 0-1, paraphrases (default)": LafnConfig(layers=(0, 1), **KEEP_ALL),
    "layers 0-1, single (no paraphrases)": LafnConfig(layers=(0, 1), locate_strategy="single", **KEEP_ALL),
    "layers 0-1, random neurons": LafnConfig(layers=(0, 1), locate_strategy="random", **KEEP_ALL),
    "layers 1-2, paraphrases": LafnConfig(layers=(1, 2), **KEEP_ALL),
}


def run(model: EditableCausalLM, data: dict[str, Any], config: LafnConfig, count: int) -> str:
    templates, facts = data["templates"], data["facts"]
    hits = {lang: 0 for lang in LANGUAGES}
    changed = 0
    seconds = 0.0
    for source in range(count):
        target = (source + 1) % len(facts)
        unrelated = [templates[lang][0].format(s=facts[(source + 25) % len(facts)][lang]["subject"])
                     for lang in LANGUAGES]
        before = [generate_text(model, p) for p in unrelated]
        start = time.perf_counter()
        entry_id = model.edit(tiny_fact_group(source, target, LANGUAGES, data), config).entry_id
        seconds += time.perf_counter() - start
        for lang in LANGUAGES:
            answers = [generate_text(model, t.format(s=facts[source][lang]["subject"])) for t in templates[lang]]
            hits[lang] += sum(a.startswith(facts[target][lang]["object"]) for a in answers)
        changed += sum(generate_text(model, p) != b for p, b in zip(unrelated, before))
        model.remove_edit(entry_id)
    prompts = count * len(templates["en"])
    rates = " | ".join(f"{100 * hits[lang] / prompts:.1f}%" for lang in LANGUAGES)
    return f"{rates} | {changed}/{count * len(LANGUAGES)} | {seconds / count:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=int, default=50, help="edit facts 0..N-1 (default: all 50)")
    count = parser.parse_args().facts
    torch.set_num_threads(2)
    model = load_model("tiny-bilingual")
    data = tiny_facts()
    print(f"{count} edits per setting, en + zh in one group")
    print("| setting | en prompts answering the target | zh | unrelated changed | s/edit |")
    print("| --- | --- | --- | --- | --- |")
    for name, config in SETTINGS.items():
        print(f"| {name} | {run(model, data, config, count)} |", flush=True)


if __name__ == "__main__":
    main()
