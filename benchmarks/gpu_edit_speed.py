"""GPU figures (issue: scale, item 6): seconds per edit group on a 7B-shaped LLaMA with random weights.

Speed does not depend on the weights' values, so the model is built from a config (LLaMA-2-7B's shape: 32
layers, hidden 4096, MLP 11008, 32 heads) with random weights, in bf16 or fp16, on one GPU. The tokenizer is
SmolLM2's (49,152 pieces: the embedding and head are 2% larger than LLaMA-2's 32,000). Paper setting: edit
layers 10-12 (the modeling default for 32 layers), M=4 prefixes, 30 paraphrases per language (the shipped toy's
facts in en+zh, each written with 12 question leads as in edit_speed.py). A random model never reaches its
target, so every edit is accepted (min_target_probability 0) and timed at a fixed step count: 20 steps
(MEMIT's count; Gemma-3-270M's dev edits stop after 11-15 on average) and 60 (this library's cap).

Prints per setting: seconds per group (median of timed edits after a warm-up), its parts (locating,
the rest), seconds per optimisation step, groups/s of edit_many at B = 1, 4, 16 and the ratio to B=1, the
peak GPU memory above the weights, and generate() tokens/s with banks of 0, 1 and 10,000 entries (routing
keys on) against the plain model.

    python benchmarks/gpu_edit_speed.py [--tokenizer DIR] [--dtype bfloat16] [--preset llama-7b|tiny]
        [--batch-sizes 1,4,16] [--batch-groups 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from edit_speed import with_paraphrases
from generate_overhead import synthetic_bank
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from lafn_hf import EditableCausalLM, LafnConfig
from lafn_hf.editing.locate import locate_neurons
from lafn_hf.models import materialize, tiny_fact_group
from lafn_hf.request import EditGroup
from lafn_hf.routing.keys import calibrate_key_space

PRESETS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),  # a CPU smoke test of this script
}


def build_model(preset: str, tokenizer: Any, dtype: torch.dtype, device: str) -> EditableCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, **PRESETS[preset])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return EditableCausalLM(model, tokenizer)


def synchronized(device: str, work: Callable[[], Any]) -> tuple[float, Any]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def groups(count: int) -> list[EditGroup]:
    return [with_paraphrases(tiny_fact_group(i, (i + 1) % 50)) for i in range(count)]


def per_group(model: EditableCausalLM, device: str, steps: int, timed: list[EditGroup]) -> None:
    config = LafnConfig(steps=steps, early_stop_loss=0.0, min_target_probability=0.0)
    layers = model.edit_layers(config)
    model.bank.clear()
    model.edit(timed[0], config, progress=False)  # warm-up (prefix sampling, kernels)
    totals, locating = [], []
    for group in timed[1:]:
        seconds, result = synchronized(device, lambda g=group: model.edit(g, config, progress=False))
        totals.append(seconds)
        with model.edits_disabled():
            locating.append(synchronized(device, lambda g=group: locate_neurons(model.model, model.tokenizer, g, layers,
                                                                                  config))[0])
        if result.steps != steps:
            raise RuntimeError(f"an edit stopped after {result.steps} of {steps} steps; the timing assumes all")
    total, locate = statistics.median(totals), statistics.median(locating)
    shared = sum(result.shared_counts.values())
    print(f"| {steps} | {total:.3f} | {locate:.3f} | {total - locate:.3f} | {(total - locate) / steps * 1000:.1f} "
          f"| {shared} |", flush=True)


def batched(model: EditableCausalLM, device: str, sizes: list[int], work: list[EditGroup]) -> None:
    config = LafnConfig(steps=20, early_stop_loss=0.0, min_target_probability=0.0)
    base = None
    for size in sizes:
        model.bank.clear()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds, outcome = synchronized(device, lambda s=size: model.edit_many(work, config, progress=False,
                                                                               batch_size=s))
        base = base or seconds
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        print(f"| {size} | {seconds:.2f} | {len(work) / seconds:.2f} | {base / seconds:.2f} | {len(outcome.failures)} "
              f"| {peak:.1f} |", flush=True)


def generate_speed(model: EditableCausalLM, device: str, counts: list[int], new_tokens: int) -> None:
    layers = model.edit_layers()
    space = calibrate_key_space(model.model, model.tokenizer, min(layers))[0]
    size = model.base_ref.intermediate_size
    prompt = model.tokenizer(["The Eiffel Tower is located in the city of"] * 4, return_tensors="pt").to(device)

    def run() -> Any:
        return model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    for count in counts:
        bank = synthetic_bank(count, layers, size, "Eiffel Tower", space)
        model.set_bank(bank)
        run()  # warm-up and matcher build
        edited, plain = [], []
        for _ in range(3):
            edited.append(synchronized(device, run)[0])
            with model.edits_disabled():
                plain.append(synchronized(device, run)[0])
        print(f"| {count} | {4 * new_tokens / min(plain):.0f} | {4 * new_tokens / min(edited):.0f} "
              f"| {min(edited) / min(plain):.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="a fast tokenizer's folder (default: SmolLM2's, materialised)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-7b")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", default="20,60")
    parser.add_argument("--timed", type=int, default=5, help="edits timed per step count (after one warm-up)")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--batch-groups", type=int, default=16, help="groups edited by edit_many at each B")
    parser.add_argument("--counts", default="0,1,10000", help="bank sizes for generate() speed")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: batched, generate")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or materialize("smollm2-135m"))
    started = time.perf_counter()
    model = build_model(args.preset, tokenizer, getattr(torch, args.dtype), args.device)
    weights = torch.cuda.memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{args.preset} ({sum(p.numel() for p in model.model.parameters()) / 1e9:.2f}B parameters, random), "
          f"{args.dtype} on {name}; built in {time.perf_counter() - started:.1f} s; weights {weights:.1f} GiB; "
          f"edit layers {model.edit_layers()}; torch {torch.__version__}")
    work = groups(max(args.batch_groups, args.timed + 1))
    lengths = [len(tokenizer(p).input_ids) for e in work[0].edits.values() for p in (e.prompt, *e.paraphrases)]
    print(f"groups: en+zh, {len(work[0].edits['en'].paraphrases)} paraphrases each, prompt+paraphrase tokens "
          f"{min(lengths)}-{max(lengths)}")
    print("\n| steps | s/group | locating s | optimising + rest s | ms/step (rest / steps) | shared neurons (3 layers) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for steps in (int(s) for s in args.steps.split(",")):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        per_group(model, args.device, steps, work[: args.timed + 1])
    if args.device.startswith("cuda"):
        print(f"peak GPU memory during one-at-a-time edits: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
              f"({torch.cuda.max_memory_allocated() / 2**30 - weights:.1f} above the weights)")
    if "batched" not in args.skip:
        print(f"\nedit_many, {args.batch_groups} groups, 20 steps each")
        print("| B | seconds | groups/s | ratio to B=1 | failed | peak GiB |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        batched(model, args.device, [int(s) for s in args.batch_sizes.split(",")], work[: args.batch_groups])
    if "generate" not in args.skip:
        print("\ngenerate(), batch 4, 32 new tokens, prompt names an edited subject; bank entries with routing keys")
        print("| bank entries | plain tok/s | edited tok/s | time ratio edited/plain (best of 3) |")
        print("| ---: | ---: | ---: | ---: |")
        generate_speed(model, args.device, [int(c) for c in args.counts.split(",")], 32)


if __name__ == "__main__":
    main()
