"""Tokens/s of EditableCausalLM.generate vs plain generate, in one process (Gemma-3-270M by default).

Banks with 0, 1 and 10,000 entries, each with a routing key (the representation stage compares every
token's hidden state with all keys; ``--no-keys`` for lexical routing only); a prompt that matches a bank
subject and one that does not. Prints time ratios edited/plain (targets: <= 1.02 without a match, <= 1.05
with one; routing: <= 1.05 at 10k entries).

    python benchmarks/generate_overhead.py [--model gemma-3-270m|tiny-bilingual] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from lafn_hf import BankEntry, EditableCausalLM, EditBank, LayerUpdate
from lafn_hf.bank import KeySpace, RoutingKey
from lafn_hf.cli import _load_model
from lafn_hf.routing.keys import calibrate_key_space


def run_once(model: Any, encoded: Any, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def best_times(model: EditableCausalLM, encoded: Any, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(edited, plain) best-of-``repeats`` seconds, the two interleaved so drift hits both alike."""
    edited, plain = [], []
    for _ in range(repeats):
        edited.append(run_once(model, encoded, new_tokens))
        with model.edits_disabled():
            plain.append(run_once(model, encoded, new_tokens))
    return min(edited), min(plain)


def synthetic_bank(count: int, layers: tuple[int, ...], size: int, subject: str | None,
                   space: KeySpace | None) -> EditBank:
    """``count`` entries; with ``space``, each has a random unit key (threshold 0.7: random keys never fire)."""
    generator = torch.Generator().manual_seed(0)
    entries = []
    for i in range(count):
        name = subject if (subject and i == 0) else f"Subject{i:05d}x"
        updates = {layer: LayerUpdate(torch.randperm(size, generator=generator)[:100].sort().values,
                                      torch.randn(100, generator=generator)) for layer in layers}
        key = None
        if space is not None:
            vector = torch.randn(space.mean.numel(), generator=generator)
            key = RoutingKey(space, vector / vector.norm(), 0.7)
        entries.append(BankEntry(subjects={"en": name}, updates=updates, key=key))
    return EditBank(entries)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-keys", action="store_true", help="entries without routing keys (lexical routing only)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model: EditableCausalLM = _load_model(args.model)
    layers = model.edit_layers()
    size = model.base_ref.intermediate_size
    space = None if args.no_keys else calibrate_key_space(model.model, model.tokenizer, min(layers))[0]
    prompts = {"match": "The Eiffel Tower is located in the city of", "no match": "The capital of Japan is a city that"}
    print(f"model {args.model}, {args.new_tokens} new tokens, best of {args.repeats}, "
          f"{'no routing keys' if space is None else 'every entry with a routing key'}")
    print("| bank entries | prompt | plain tok/s | edited tok/s | time ratio edited/plain |")
    print("| --- | --- | --- | --- | --- |")
    for count in (0, 1, 10_000):
        model.set_bank(synthetic_bank(count, layers, size, "Eiffel Tower", space))
        for label, prompt in prompts.items():
            encoded = model.tokenizer(prompt, return_tensors="pt")
            run_once(model, encoded, 2)  # warm-up (and matcher build)
            edited, plain = best_times(model, encoded, args.new_tokens, args.repeats)
            print(f"| {count} | {label} | {args.new_tokens / plain:.1f} | {args.new_tokens / edited:.1f} "
                  f"| {edited / plain:.3f} |")


if __name__ == "__main__":
    main()
