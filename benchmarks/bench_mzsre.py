"""``lafn bench`` on the MzsRE dev split: LAFN and the baselines side by side, per language set.

Reads ../shared/data/mzsre-dev/mzsre_dev_en{xx}.json (343 items per pair, aligned by index; never copied
into the repository). Language sets: en+zh, en+de, en+fr, en+zh+de by default; any en+X pair; ``pairs`` (every
en+X pair); ``all`` (the paper's setting: one group over all twelve languages, the files merged by index).
Each set is one resumable run in OUT/<set>/ (results.jsonl, summary.json, tables.md, plot.png); the script
prints each set's answer-hit table, the wall time and the time per item. Rerunning resumes; other settings
need --fresh or another --out.

    python benchmarks/bench_mzsre.py --model gemma-3-270m --limit 100 --out bench-mzsre
    python benchmarks/bench_mzsre.py --model tiny-bilingual --limit 2 --sets en+zh --out /tmp/smoke   # smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lafn_hf import LafnConfig
from lafn_hf.bench import BenchSettings, build_methods, markdown_table, reach_table, run_benchmark
from lafn_hf.cli.common import load_model
from lafn_hf.config import LOCATE_STRATEGIES
from lafn_hf.routing.config import ROUTING_PRESETS
from lafn_hf.zsre import MZSRE_LANGUAGES, load_files, pair_file_code

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre-dev"
SETS = ("en+zh", "en+de", "en+fr", "en+zh+de")


def expand(sets: str) -> list[str]:
    """``pairs`` -> every en+X pair, ``all`` -> the twelve languages; other names as given."""
    names: list[str] = []
    for name in sets.split(","):
        names += [f"en+{lang}" for lang in MZSRE_LANGUAGES[1:]] if name == "pairs" else [name]
    return names


def languages_of(name: str) -> list[str]:
    return list(MZSRE_LANGUAGES) if name == "all" else name.split("+")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m", help="as for lafn: gemma-3-270m, tiny-bilingual, a path")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help=f"default: {DATA_DIR}")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated language sets (default: {','.join(SETS)})")
    parser.add_argument("--methods", default="lafn,unedited,in-context", help="add lora when peft is installed")
    parser.add_argument("--limit", type=int, default=100, help="first N dev items per set (default 100)")
    parser.add_argument("--mode", choices=["generate", "teacher_forced"], default="generate")
    parser.add_argument("--locate-strategy", choices=LOCATE_STRATEGIES, default="paraphrases")
    parser.add_argument("--layers", help="comma-separated edit layers (default: the modeling/ table's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 avoids oversubscription on a busy machine)")
    parser.add_argument("--routing", choices=sorted(ROUTING_PRESETS), default="full", help="routing stages for lafn")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate() call (1: one by one)")
    parser.add_argument("--subject-search", choices=["written", "other", "lexical", "aligned"], default="aligned",
                        help="how far each language's subject is looked for in its question ('written': only as given)")
    parser.add_argument("--out", type=Path, default=Path("bench-mzsre"))
    parser.add_argument("--fresh", action="store_true", help="start new results files (old ones kept renamed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    config = LafnConfig(layers=layers, locate_strategy=args.locate_strategy, subject_search=args.subject_search)
    model = load_model(args.model)
    model.routing = ROUTING_PRESETS[args.routing]
    methods = build_methods(args.methods.split(","), model, config)
    settings = BenchSettings(mode=args.mode, limit=args.limit, batch_size=args.batch_size,
                             subject_search=args.subject_search)
    started = time.perf_counter()
    for name in expand(args.sets):
        languages = languages_of(name)
        files = [args.data_dir / f"mzsre_dev_en{pair_file_code(lang)}.json" for lang in languages if lang != "en"]
        items = load_files(files, languages)
        begun = time.perf_counter()
        summary = run_benchmark(model, items, methods, args.out / name, settings, fresh=args.fresh)
        print(f"\n## {name} ({args.model})\n\n{markdown_table(summary)}\n\n{reach_table(summary)}\n\n"
              f"{time.perf_counter() - begun:.0f}s ({(time.perf_counter() - begun) / summary['items']:.1f}s per item "
              "when nothing was resumed); "
              f"contains / F1 tables: {args.out / name / 'tables.md'}")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
