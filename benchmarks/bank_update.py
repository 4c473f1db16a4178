"""Time to bring a 100k-entry bank's compiled view (matcher + device tensors) up to date after one change.

Adding or removing one entry replays the bank's change log onto the last compiled view (the matcher grows
by a small automaton) instead of recompiling the bank. Prints the median time of add and remove against a
full rebuild, and their ratios (target: < 50 ms per change at 100k entries).

    python benchmarks/bank_update.py [--entries 100000] [--changes 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lafn_hf import BankEntry, EditBank, LayerUpdate
from lafn_hf.routing.compiled import CompiledBank


def synthetic_entry(index: int, generator: torch.Generator, layers: tuple[int, ...] = (6, 7, 8)) -> BankEntry:
    updates = {layer: LayerUpdate(torch.randperm(2048, generator=generator)[:32].sort().values,
                                  torch.randn(32, generator=generator)) for layer in layers}
    return BankEntry(subjects={"en": f"Subject{index:06d}x", "zh": f"主题{index:06d}"}, updates=updates,
                     id=f"edit-{index:08d}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    bank = EditBank([synthetic_entry(i, generator) for i in range(args.entries)])
    print(f"{args.entries} entries built in {time.perf_counter() - started:.1f} s")
    cpu = torch.device("cpu")
    started = time.perf_counter()
    compiled = CompiledBank.build(bank, cpu)
    rebuild = time.perf_counter() - started
    adds, removes = [], []
    for change in range(args.changes):
        entry = synthetic_entry(args.entries + change, generator)
        bank.add(entry)
        started = time.perf_counter()
        compiled = compiled.updated(bank) or CompiledBank.build(bank, cpu)
        adds.append(time.perf_counter() - started)
        bank.remove(f"edit-{change:08d}")
        started = time.perf_counter()
        compiled = compiled.updated(bank) or CompiledBank.build(bank, cpu)
        removes.append(time.perf_counter() - started)
    check = CompiledBank.build(bank, cpu)
    if check.entries_of != compiled.entries_of or check.updates.keys() != compiled.updates.keys():
        raise SystemExit("incremental view differs from a rebuild")
    add, remove = statistics.median(adds), statistics.median(removes)
    print("| operation | median ms | max ms | ratio to a full rebuild |")
    print("| --- | --- | --- | --- |")
    print(f"| full rebuild | {rebuild * 1e3:.0f} | - | 1.000 |")
    print(f"| add one entry | {add * 1e3:.1f} | {max(adds) * 1e3:.1f} | {add / rebuild:.3f} |")
    print(f"| remove one entry | {remove * 1e3:.1f} | {max(removes) * 1e3:.1f} | {remove / rebuild:.3f} |")


if __name__ == "__main__":
    main()
