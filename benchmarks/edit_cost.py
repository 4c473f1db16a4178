"""Seconds and optimisation steps per edit of LafnConfig variants, paired on the same MzsRE dev items.

Each item is edited once per variant, the variants interleaved item by item (so a machine busy with other work
slows them alike); prints per variant the total seconds, mean steps and the ratio to the first variant.
Variants as in ``lafn_settings.py`` (``name:field=json,...``).

    python benchmarks/edit_cost.py --data ../shared/data/mzsre-dev/mzsre_dev_enzh.json --items 0-9 \\
        --variant default: --variant held4:continuation_kl=4
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from lafn_settings import parse_items, parse_variant

from lafn_hf import LafnConfig
from lafn_hf.cli.common import load_model
from lafn_hf.zsre import load_files, resolve_item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--items", default="0-9")
    parser.add_argument("--variant", action="append", required=True)
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variant]
    configs = {name: dataclasses.replace(LafnConfig(), **fields) for name, fields in variants}
    model = load_model(args.model)
    items = load_files([args.data])
    seconds = {name: 0.0 for name in configs}
    steps: dict[str, list[int]] = {name: [] for name in configs}
    warm = model.edit(resolve_item(items[0])[0], configs[variants[0][0]])  # warm-up: the scope space, the prefixes
    model.remove_edit(warm.entry_id)
    for index in parse_items(args.items):
        group = resolve_item(items[index])[0]
        if group is None:
            continue
        for name, config in configs.items():
            start = time.perf_counter()
            result = model.edit(group, config)
            seconds[name] += time.perf_counter() - start
            steps[name].append(result.steps)
            model.remove_edit(result.entry_id)
        print(f"item {index}: " + ", ".join(f"{name} {steps[name][-1]} steps" for name in configs), flush=True)
    first = variants[0][0]
    print("variant | s total | mean steps | s ratio | steps ratio")
    for name in configs:
        mean = sum(steps[name]) / len(steps[name])
        print(f"{name} | {seconds[name]:.1f} | {mean:.1f} | {seconds[name] / seconds[first]:.2f} | "
              f"{mean / (sum(steps[first]) / len(steps[first])):.2f}")


if __name__ == "__main__":
    main()
