"""Groups/s of edit_many(batch_size=B) against one group at a time, and whether the edits are the same.

MzsRE dev en+zh groups (../shared/data/mzsre-dev; the item's edit group as lafn bench builds it) edited into
a fresh bank for each B (default 1, 4, 16) on Gemma-3-270M (CPU float32 by default). Prints per B: seconds,
groups/s and the speed ratio against B=1, the largest |p(target) - p(target at B=1)|, and answer hit on the
groups' own questions (greedy; the new answer starts the generated answer).

    python benchmarks/batched_edit.py [--model gemma-3-270m] [--groups 16] [--batch-sizes 1,4,16]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from lafn_hf import EditableCausalLM
from lafn_hf.bench.metrics import answer_hit
from lafn_hf.cli.common import load_model
from lafn_hf.evaluate import predict_ids
from lafn_hf.zsre import edit_group, load_files

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre-dev" / "mzsre_dev_enzh.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,4,16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(2)
    model: EditableCausalLM = load_model(args.model)
    groups = [g for g in (edit_group(item) for item in load_files([args.data], ["en", "zh"])) if g][: args.groups]
    reference: dict[int, dict[str, float]] = {}
    base_time = None
    print(f"{args.model}, {len(groups)} MzsRE dev en+zh groups")
    print("| batch size | seconds | groups/s | speed vs B=1 | max abs diff p(target) vs B=1 | answer hit | failed |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in (int(x) for x in args.batch_sizes.split(",")):
        model.bank.clear()
        started = time.perf_counter()
        outcome = model.edit_many(groups, batch_size=size, progress=False)
        seconds = time.perf_counter() - started
        base_time = base_time or seconds
        done = {result.entry_id: result for result in outcome.results}
        order = [e.id for e in model.bank]
        probabilities = {i: done[entry_id].target_probabilities for i, entry_id in enumerate(order)}
        if not reference:
            reference = probabilities
        diff = max((abs(p - reference[i][lang]) for i, ps in probabilities.items() if i in reference
                    for lang, p in ps.items()), default=0.0)
        hits = total = 0
        for group in groups:
            for edit in group.edits.values():
                answer = model.tokenizer.decode(predict_ids(model, edit.prompt, max_new_tokens=8), skip_special_tokens=True)
                hits += answer_hit(answer, edit.target)
                total += 1
        print(f"| {size} | {seconds:.1f} | {len(groups) / seconds:.3f} | {base_time / seconds:.2f} | {diff:.4f} "
              f"| {100 * hits / total:.1f} | {len(outcome.failures)} |", flush=True)


if __name__ == "__main__":
    main()
