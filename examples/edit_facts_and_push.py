"""Edit a batch of facts from a JSON file and push the bank to the Hub (a dry run without a token).

    python examples/edit_facts_and_push.py --facts examples/facts.json --repo you/my-edits [--token hf_...]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lafn_hf import EditableCausalLM, EditGroup
from lafn_hf.models import materialize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", default=str(Path(__file__).with_name("facts.json")))
    parser.add_argument("--repo", default="your-name/gemma-3-270m-lafn-edits")
    parser.add_argument("--out", default="edits-bank")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"))
    args = parser.parse_args()

    path = materialize("gemma-3-270m")
    model = EditableCausalLM(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                             AutoTokenizer.from_pretrained(path))
    groups = [EditGroup.from_dict(g) for g in json.loads(Path(args.facts).read_text("utf-8"))]
    outcome = model.edit_many(groups)
    for result in outcome.results:
        print(result.entry_id, result.target_probabilities)
    for index, error in outcome.failures:
        print(f"group {index} failed: {error}")
    model.save_pretrained(args.out)
    if args.token:
        print("pushed:", model.push_to_hub(args.repo, token=args.token, private=True))
    else:
        print(f"dry run (no HF_TOKEN): would push {len(model.bank)} edits in {args.out}/ to {args.repo}")


if __name__ == "__main__":
    main()
