"""Bank file I/O: format 2 (two tensors per entry and layer) against format 3 (five tensors per bank).

10k Gemma-sized entries (3 layers x 300 neurons, like real Gemma-3-270M edits): load time of each format and
the ratio, file sizes. 1M small entries (1 layer x 4 neurons), which format 2 cannot store (safetensors'
header limit stops it near 176k entries x 3 layers): format-3 save and load time and sizes. Prints the load
average and peak RSS so that numbers from a busy machine are recognisable.

    python benchmarks/bank_io.py [--skip-million]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from lafn_hf import BankEntry, EditBank, LayerUpdate
from lafn_hf.bank.base_model import BaseModelRef
from lafn_hf.bank.format import paused_gc
from lafn_hf.bank.lafn_config import BANK_CONFIG_NAME, weights_name
from lafn_hf.bank.store import load_bank, save_bank

GEMMA = BaseModelRef("google/gemma-3-270m", None, "gemma3_text", 640, 2048, 18)


def write_format_2(directory: Path, bank: EditBank, base: BaseModelRef) -> None:
    """A bank as lafn-hf wrote format 2: ``{id}/{layer}/neurons`` int64 and ``{id}/{layer}/delta`` per update."""
    tensors = {f"{e.id}/{layer}/{kind}": getattr(u, kind) for e in bank for layer, u in e.updates.items()
               for kind in ("neurons", "delta")}
    data = save_safetensors(tensors, metadata={"format": "pt"})
    sha = hashlib.sha256(data).hexdigest()
    config: dict[str, Any] = {
        "format_version": 2, "library": "lafn-hf", "library_version": "0.2.0", "base_model": asdict(base),
        "weights_file": weights_name(sha), "weights_sha256": sha,
        "entries": [{"id": e.id, "subjects": e.subjects, "layers": list(e.layers), "metadata": e.metadata} for e in bank]}
    directory.mkdir(parents=True)
    (directory / weights_name(sha)).write_bytes(data)
    (directory / BANK_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False))


def gemma_bank(count: int = 10_000) -> EditBank:
    generator = torch.Generator().manual_seed(0)
    neurons = torch.arange(300) * 6 + torch.randint(0, 6, (count * 3, 1), generator=generator)  # (3 count, 300)
    deltas = torch.randn(count * 3, 300, generator=generator)
    return EditBank([BankEntry({"en": f"Subject {i}", "zh": f"主题{i}"},
                               {layer: LayerUpdate(neurons[3 * i + k].clone(), deltas[3 * i + k].clone())
                                for k, layer in enumerate((5, 6, 7))},
                               {"targets": {"en": "x", "zh": "乙"}}) for i in range(count)])


def million_bank(count: int = 1_000_000) -> EditBank:
    """Built through the bulk path: 1M checked ``LayerUpdate`` constructions alone take ~20 s."""
    neurons = (torch.arange(count) * 7 % 2000).repeat_interleave(4) + torch.arange(0, 8, 2).repeat(count)
    deltas = torch.randn(count * 4, generator=torch.Generator().manual_seed(1))
    n_views, d_views = neurons.split(4), deltas.split(4)
    with paused_gc():
        entries = [BankEntry._from_checked({"en": f"Subject {i}"},
                                           {i % 18: LayerUpdate._from_checked(n_views[i], d_views[i])}, {}, f"e{i}")
                   for i in range(count)]
    return EditBank._from_checked(entries)


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def sizes(directory: Path) -> tuple[int, int]:
    weights = next(directory.glob("lafn_bank*.safetensors")).stat().st_size
    return weights, (directory / BANK_CONFIG_NAME).stat().st_size


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def compare_10k(root: Path) -> None:
    bank = gemma_bank()
    write_format_2(root / "v2", bank, GEMMA)
    v2 = best_of(3, lambda: load_bank(root / "v2"))
    save_v3 = best_of(3, lambda: save_bank(root / "v3", bank, GEMMA))
    v3 = best_of(5, lambda: load_bank(root / "v3"))
    (w2, c2), (w3, c3) = sizes(root / "v2"), sizes(root / "v3")
    print("10k entries x 3 layers x 300 neurons (9M neuron updates):")
    print(f"  load  format 2 {v2:.3f} s, format 3 {v3:.3f} s: {v2 / v3:.1f}x faster")
    print(f"  save  format 3 {save_v3:.3f} s")
    print(f"  size  format 2 {mb(w2)} + {mb(c2)} config, format 3 {mb(w3)} + {mb(c3)} config: "
          f"{(w2 + c2) / (w3 + c3):.2f}x smaller")


def million(root: Path) -> None:
    bank = million_bank()
    started = time.perf_counter()
    save_bank(root / "m", bank, GEMMA)
    save = time.perf_counter() - started
    del bank
    started = time.perf_counter()
    loaded, _ = load_bank(root / "m")
    load = time.perf_counter() - started
    assert len(loaded) == 1_000_000
    weights, config = sizes(root / "m")
    print("1M entries x 1 layer x 4 neurons (format 2 cannot hold them):")
    print(f"  save  {save:.1f} s, load {load:.1f} s ({load / 100:.3f} s per 10k entries)")
    print(f"  size  {mb(weights)} weights + {mb(config)} config ({(weights + config) / 1e6:.0f} bytes per entry)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-million", action="store_true", help="only the 10k-entry comparison")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        compare_10k(Path(folder))
        if not args.skip_million:
            million(Path(folder))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak RSS {peak:.0f} MB; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
