"""Sequential editing at scale: N edits in a row into one bank; do earlier edits still answer?

Edits are the MzsRE dev items of ../shared/data/mzsre-dev, one single-language group per (item, language)
whose subject occurs in its question, taken item by item over ``--langs`` (default en, de, fr, es, pt, vi:
1,459 usable of 6 x 343). Edits that ``edit()`` refuses (target not reached) are skipped and counted.
At each checkpoint N the script answers, greedily through ``generate()`` with the whole bank loaded:

- the ``src`` and ``rephrase`` questions of up to ``--sample`` earlier edits, evenly spaced over edits 1..N
  (answer hit: the normalised new answer starts the answer), and the same share among edits whose ``src``
  answered right after they were made ("retained");
- a fixed set of unrelated ``loc`` questions (MzsRE's locality questions of the last items; they never name
  an edited subject): the share whose answer equals the unedited model's.

It prints one line per checkpoint. Resumable: the bank is saved under OUT/bank every ``--save-every`` edits
and at every checkpoint, each edit is one line of OUT/edits.jsonl; a rerun continues after the last save.

    python benchmarks/sequential_edits.py --edits 1000 --out seq-gemma          # hours on 2 CPU cores
    python benchmarks/sequential_edits.py --edits 6 --checkpoints 3,6 --sample 3 --out /tmp/seq   # smoke run

EasyEdit's issues report sequential editing collapsing after about 100 (ROME, MEMIT on 7B: #18) to 2,000
edits (#518); LAFN never changes weights, so only routing (two entries firing on one question) can interfere.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lafn_hf.bench.methods import EditMethod, LafnMethod, UneditedMethod
from lafn_hf.bench.metrics import answer_hit, same_answer
from lafn_hf.cli import _load_model
from lafn_hf.config import EditGroup, LanguageEdit
from lafn_hf.evaluate import answer_ids
from lafn_hf.zsre import ZsreRecord, load_files

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre-dev"


def edit_records(data_dir: Path, languages: list[str]) -> list[tuple[int, str, ZsreRecord]]:
    """(item index, language, record) item by item over ``languages``."""
    files = [data_dir / f"mzsre_dev_en{lang}.json" for lang in languages if lang != "en"]
    items = load_files(files or [data_dir / "mzsre_dev_ende.json"], languages)
    return [(index, lang, item[lang]) for index, item in enumerate(items) for lang in languages
            if lang in item and item[lang].matchable and item[lang].alt.strip()]


def answers(method: EditMethod, questions: list[str], golds: list[str]) -> list[str]:
    """Greedy answers (len(gold) + 2 tokens), batched by the bench's ``predict_many``."""
    budgets = [len(answer_ids(method.model.tokenizer, q, g)) + 2 for q, g in zip(questions, golds)]
    return [method.decode(ids) for ids in method.predict_many(questions, [None] * len(questions), budgets=budgets)]


def checkpoint(edited: EditMethod, made: list[dict], records: list[tuple[int, str, ZsreRecord]],
               unrelated: list[tuple[str, str]], reference: list[str], sample: int) -> str:
    step = max(1, len(made) // sample)
    chosen = made[::step][:sample]
    picked = [records[m["position"]][2] for m in chosen]
    src = answers(edited, [r.src for r in picked], [r.alt for r in picked])
    gen = answers(edited, [r.rephrase for r in picked], [r.alt for r in picked])
    src_hit = [answer_hit(a, r.alt) for a, r in zip(src, picked)]
    gen_hit = [answer_hit(a, r.alt) for a, r in zip(gen, picked)]
    kept = [hit for hit, m in zip(src_hit, chosen) if m["hit_after"]]
    loc = answers(edited, [q for q, _ in unrelated], [a for _, a in unrelated])
    same = [same_answer(a, b) for a, b in zip(loc, reference)]

    def pct(values: list[bool]) -> str:
        return f"{100 * sum(values) / len(values):.1f}" if values else "-"

    return (f"| {len(made)} | {pct(src_hit)} | {pct(gen_hit)} | {pct(kept)} ({len(kept)}) | {pct(same)} | "
            f"{sum(m['seconds'] for m in made) / len(made):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--langs", default="en,de,fr,es,pt,vi")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--checkpoints", default="10,100,250,500,1000")
    parser.add_argument("--sample", type=int, default=50, help="earlier edits checked per checkpoint")
    parser.add_argument("--unrelated", type=int, default=50, help="unrelated loc questions checked")
    parser.add_argument("--save-every", type=int, default=10, help="edits between bank saves (resume points)")
    parser.add_argument("--out", type=Path, default=Path("seq-edits"))
    args = parser.parse_args()
    if args.save_every < 1:
        parser.error(f"--save-every must be >= 1, got {args.save_every}")
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.edits} | {args.edits})
    torch.manual_seed(0)
    records = edit_records(args.data_dir, args.langs.split(","))
    if len(records) < args.edits:
        raise ValueError(f"--edits {args.edits}: the dev data gives only {len(records)} usable edits for "
                         f"{args.langs}; add languages to --langs")
    unrelated = [(r.loc, r.loc_ans) for _, _, r in records[-args.unrelated:]]
    model = _load_model(args.model)
    reference = answers(UneditedMethod(model), [q for q, _ in unrelated], [a for _, a in unrelated])
    edited = LafnMethod(model)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "edits.jsonl"
    made = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if (args.out / "bank").is_dir():
        model.load_bank(args.out / "bank")
    made = made[: len(model.bank)]
    log.write_text("".join(json.dumps(m) + "\n" for m in made))
    position = made[-1]["position"] + 1 if made else 0
    skipped = position - len(made)
    print("| edits | Rel hit | Gen hit | retained (n) | unrelated unchanged | s/edit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    while len(made) < args.edits and position < len(records):
        index, lang, record = records[position]
        started = time.perf_counter()
        try:
            result = model.edit(EditGroup({lang: LanguageEdit(record.src, record.subject, record.alt)}), progress=False)
        except (ValueError, TypeError, RuntimeError):
            skipped, position = skipped + 1, position + 1
            continue
        hit = answer_hit(answers(edited, [record.src], [record.alt])[0], record.alt)
        made.append({"position": position, "index": index, "lang": lang, "entry_id": result.entry_id,
                     "hit_after": hit, "seconds": time.perf_counter() - started})
        with log.open("a") as handle:
            handle.write(json.dumps(made[-1]) + "\n")
        position += 1
        if len(made) in checkpoints or len(made) % args.save_every == 0:
            model.save_pretrained(args.out / "bank")
        if len(made) in checkpoints:
            print(checkpoint(edited, made, records, unrelated, reference, args.sample), flush=True)
    if made and len(made) not in checkpoints:  # the records ran out (refusals): keep what was made
        model.save_pretrained(args.out / "bank")
        print(checkpoint(edited, made, records, unrelated, reference, args.sample), flush=True)
    print(f"\n{len(made)} edits made, {skipped} refused or not reached; {args.model}, langs {args.langs}")


if __name__ == "__main__":
    main()
