"""LAFN's settings side by side on chosen MzsRE dev items (``lafn bench``, lafn rows only), for tuning.

Each variant overrides fields of ``LafnConfig`` (values as JSON: ``steps=60``, ``clamp_norm_factor=null``,
``layers=[4,5]``) and runs ``lafn bench`` on the same items into OUT/<set>/<variant>/ (resumable). Prints,
per variant and language, the answer hit on Rel/Gen questions whose subject the exact matcher finds (the
efficacy goal), Loc-Hard, the located (shared) neurons as a share of each edited layer's MLP, the edits
refused, mean optimisation steps and seconds per item.

    python benchmarks/lafn_settings.py --set en+fr --items 0-39 \\
        --variant default: --variant steps60:steps=60 --variant clamp8:clamp_norm_factor=8 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from lafn_hf import LafnConfig
from lafn_hf.bench import BenchSettings, LafnMethod, load_locality_hard, run_bench
from lafn_hf.cli.common import load_model
from lafn_hf.zsre import MZSRE_LANGUAGES, load_files, pair_file_code

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre-dev"


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (name, overrides); values are JSON."""
    name, _, rest = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"a variant needs a name before ':', got {text!r}")
    fields = {f.name for f in dataclasses.fields(LafnConfig)}
    overrides: dict[str, Any] = {}
    for pair in filter(None, re.split(r",(?=\w+=)", rest)):  # commas inside JSON values stay
        key, _, value = pair.partition("=")
        if key not in fields:
            raise argparse.ArgumentTypeError(f"{key!r} is not a LafnConfig field ({sorted(fields)})")
        overrides[key] = json.loads(value)
    return name, overrides


def parse_items(text: str) -> list[int]:
    """``"0-39,50,60-62"`` -> indices."""
    indices: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        indices += range(int(low), int(high or low) + 1)
    return indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--set", default="en+zh", help="a language set: en+zh, en+fr, en+de, en+zh+de, ...; all: the "
                        "twelve MzsRE languages in one group")
    parser.add_argument("--items", default="0-19", help="dev item indices, e.g. 0-39,50")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        help="name:key=value,... (LafnConfig overrides; 'default:' for none)")
    parser.add_argument("--out", type=Path, default=Path("lafn-settings"))
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    languages = list(MZSRE_LANGUAGES) if args.set == "all" else args.set.split("+")
    files = [args.data_dir / f"mzsre_dev_en{pair_file_code(lang)}.json" for lang in languages if lang != "en"]
    every = load_files(files, languages)
    indices = parse_items(args.items)
    items = [every[i] for i in indices]
    shipped = load_locality_hard()  # keyed by dev index; run_bench keys by position in ``items``
    hard = {position: shipped[index] for position, index in enumerate(indices) if index in shipped}
    model = load_model(args.model)
    lines = []
    for name, overrides in args.variant:
        config = dataclasses.replace(LafnConfig(), **overrides)
        if config.layers is not None:
            config = dataclasses.replace(config, layers=tuple(config.layers))
        started = time.perf_counter()
        summary = run_bench(model, items, [LafnMethod(model, config)], args.out / args.set / name / "results.jsonl",
                            BenchSettings(), locality_hard=hard, progress=False)
        seconds = (time.perf_counter() - started) / len(items)
        found = summary["hit_by_reach"]["found"].get("lafn", {})
        hit = summary["scores"]["hit"]["lafn"]
        cells = []
        for lang in summary["languages"]:
            rel, gen = found.get(lang, {}).get("reliability"), found.get(lang, {}).get("generality")
            loc_hard = hit.get(lang, {}).get("locality_hard")
            cells.append(f"{lang} {_show(rel)} / {_show(gen)} / {_show(loc_hard)}")
        edits = summary["edits"]["lafn"]
        size = model.base_ref.intermediate_size
        shared = "/".join(f"{100 * count / size:.0f}" for count in edits.get("mean_shared_neurons", {}).values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {shared or '-'} | {edits['errors']} | "
                     f"{edits.get('mean_steps', 0):.1f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    header = " | ".join(f"{lang} Rel / Gen found, Loc-Hard" for lang in summary["languages"])  # the cells' order
    print(f"\n{args.model}, {args.set}, {len(items)} items ({args.items}), answer hit x100\n")
    print(f"| variant | {header} | shared neurons % per layer | refused | mean steps | s / item |")
    print("| --- |" + " --- |" * len(languages) + " ---: | ---: | ---: | ---: |")
    print("\n".join(lines))


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
