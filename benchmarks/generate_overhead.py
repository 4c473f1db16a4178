"""Tokens/s of EditableCausalLM.generate vs plain generate, in one process (Gemma-3-270M by default).

Banks with 0, 1 and 10,000 entries (``--counts``), each with a routing key (the representation stage compares
every token's hidden state with all keys; ``--no-keys`` for lexical routing only) and a question scope
(``--no-scopes`` without); a prompt that matches a bank
subject and one that does not. Edited and plain runs alternate; prints the median of the paired time ratios
edited/plain (targets: <= 1.02 without a match, <= 1.05 with one; routing: <= 1.05 at 10k entries) and the
best-of ratio. The empty bank runs no routing at all: its spread is this machine's noise.

    python benchmarks/generate_overhead.py [--model gemma-3-270m|tiny-bilingual] [--new-tokens 32]
        [--counts 0,1,10000,100000]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from typing import Any

import torch

from lafn_hf import BankEntry, EditableCausalLM, EditBank, LayerUpdate
from lafn_hf.bank.entries import KeySpace, QuestionScope, RoutingKey, ScopeSpace
from lafn_hf.cli.common import load_model
from lafn_hf.routing.keys import calibrate_key_space
from lafn_hf.routing.scope import calibrate_scope_space


def run_once(model: Any, encoded: Any, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def paired_times(model: EditableCausalLM, encoded: Any, new_tokens: int, repeats: int) -> tuple[list[float], list[float]]:
    """(edited, plain) seconds of ``repeats`` runs each, alternated so drift hits both alike."""
    edited, plain = [], []
    for _ in range(repeats):
        edited.append(run_once(model, encoded, new_tokens))
        with model.edits_disabled():
            plain.append(run_once(model, encoded, new_tokens))
    return edited, plain


def hook_share(model: EditableCausalLM, encoded: Any, new_tokens: int) -> float:
    """Share of an edited ``generate()``'s time spent in lafn_hf code entered from outside it (the hooks: reading,
    matching, key comparison, dV plans), measured under cProfile: a within-run share, free of run-to-run noise."""
    profile = cProfile.Profile()
    profile.enable()
    start = time.perf_counter()
    model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    total = time.perf_counter() - start
    profile.disable()
    ours = 0.0
    for (filename, _, name), (*_, callers) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        if "lafn_hf" in filename and name != "generate":
            ours += sum(timing[3] for caller, timing in callers.items() if "lafn_hf" not in caller[0])
    return ours / total


def synthetic_bank(count: int, layers: tuple[int, ...], size: int, subject: str | None,
                   space: KeySpace | None, scopes: ScopeSpace | None = None) -> EditBank:
    """``count`` entries; with ``space``, each has a random unit key (threshold 0.7: random keys never fire); with
    ``scopes``, a question scope of one random vector (the first entry's admits every question, margin -2)."""
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
        scope = None
        if scopes is not None:
            vector = torch.randn(1, scopes.mean.numel(), generator=generator)
            scope = QuestionScope(scopes, vector / vector.norm(), i % 46, -2.0 if i == 0 else -0.1)
        entries.append(BankEntry(subjects={"en": name}, updates=updates, key=key, scope=scope))
    return EditBank(entries)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--counts", default="0,1,10000", help="bank sizes, comma-separated")
    parser.add_argument("--no-keys", action="store_true", help="entries without routing keys (lexical routing only)")
    parser.add_argument("--no-scopes", action="store_true", help="entries without question scopes")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model: EditableCausalLM = load_model(args.model)
    layers = model.edit_layers()
    size = model.base_ref.intermediate_size
    space = None if args.no_keys else calibrate_key_space(model.model, model.tokenizer, min(layers))[0]
    scopes = None if args.no_scopes else calibrate_scope_space(model.model, model.tokenizer, min(layers))
    prompts = {"match": "The Eiffel Tower is located in the city of", "no match": "The capital of Japan is a city that"}
    print(f"model {args.model}, {args.new_tokens} new tokens, {args.repeats} alternating runs each, "
          f"{'no routing keys' if space is None else 'every entry with a routing key'}, "
          f"{'no question scopes' if scopes is None else 'every entry with a question scope'}")
    print("| bank entries | prompt | plain tok/s | edited tok/s | ratio edited/plain (median of pairs) | best/best "
          "| lafn_hf hooks' share (profiled) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for count in (int(c) for c in args.counts.split(",")):
        model.set_bank(synthetic_bank(count, layers, size, "Eiffel Tower", space, scopes))
        for label, prompt in prompts.items():
            encoded = model.tokenizer(prompt, return_tensors="pt")
            run_once(model, encoded, 2)  # warm-up (and matcher build)
            edited, plain = paired_times(model, encoded, args.new_tokens, args.repeats)
            ratio = statistics.median(e / p for e, p in zip(edited, plain))
            share = 100 * hook_share(model, encoded, args.new_tokens)
            print(f"| {count} | {label} | {args.new_tokens / min(plain):.1f} | {args.new_tokens / min(edited):.1f} "
                  f"| {ratio:.3f} | {min(edited) / min(plain):.3f} | {share:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
