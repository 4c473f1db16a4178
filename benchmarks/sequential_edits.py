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
    python benchmarks/sequential_edits.py --data toy --model tiny-bilingual --edits 10000 --batch-size 16 \
        --checkpoints 10,100,1000,2500,5000,10000 --sample 200 --out seq-toy        # about an hour

``--data toy`` edits the shipped toy instead: invented English country names (2-3 syllables of its own
names, none of them one of its 50 countries or capitals: a capital that is also an edited subject fires
that edit when the model answers it) each get one of its capitals; ``src`` is its template 0 (the prompt,
templates 1-2 locate), ``rephrase`` the held-out template 3, and the unrelated questions are its own 50
facts. ``--batch-size`` B edits B records per ``edit_many`` call: each edit is still optimised against the
unedited model (the bank is off while editing), so this equals making them one by one up to float rounding.

EasyEdit's issues report sequential editing collapsing after about 100 (ROME, MEMIT on 7B: #18) to 2,000
edits (#518); LAFN never changes weights, so only routing (two entries firing on one question) can interfere.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from pathlib import Path

import torch

from lafn_hf.bench.methods import EditMethod, LafnMethod, UneditedMethod
from lafn_hf.bench.metrics import answer_hit, same_answer
from lafn_hf.cli.common import load_model
from lafn_hf.evaluate import answer_ids
from lafn_hf.model import EditableCausalLM
from lafn_hf.models import tiny_facts
from lafn_hf.request import EditGroup, LanguageEdit
from lafn_hf.zsre import ZsreRecord, load_files

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre-dev"


def edit_records(data_dir: Path, languages: list[str]) -> list[tuple[int, str, ZsreRecord]]:
    """(item index, language, record) item by item over ``languages``."""
    files = [data_dir / f"mzsre_dev_en{lang}.json" for lang in languages if lang != "en"]
    items = load_files(files or [data_dir / "mzsre_dev_ende.json"], languages)
    return [(index, lang, item[lang]) for index, item in enumerate(items) for lang in languages
            if lang in item and item[lang].matchable and item[lang].alt.strip()]


def toy_records(count: int, seed: int = 0) -> list[tuple[int, str, ZsreRecord]]:
    """``count`` English records on invented country names for the shipped toy (``--data toy``)."""
    data = tiny_facts()
    templates, facts = data["templates"]["en"], data["facts"]
    known = {fact["en"][part].lower() for fact in facts for part in ("subject", "object")}  # no toy name
    syllables = sorted({fact["en"]["subject"][i : i + 3].lower() for fact in facts
                        for i in range(0, len(fact["en"]["subject"]) - 2, 3)})
    spell, assign = random.Random(seed), random.Random(seed + 1)  # the first n records never depend on count
    names: dict[str, None] = {}
    while len(names) < count:
        name = "".join(spell.choice(syllables) for _ in range(spell.choice((2, 3)))).capitalize()
        if name.lower() not in known:
            names.setdefault(name)
    records = []
    for index, name in enumerate(names):
        fact = facts[assign.randrange(len(facts))]
        unrelated = facts[index % len(facts)]["en"]
        records.append((index, "en", ZsreRecord(name, templates[0].format(s=name), templates[3].format(s=name),
                                                fact["en"]["object"], templates[0].format(s=unrelated["subject"]),
                                                unrelated["object"])))
    return records


@functools.cache
def _toy_templates() -> tuple[str, ...]:
    return tuple(tiny_facts()["templates"]["en"])


def toy_group(record: ZsreRecord) -> EditGroup:
    """A toy record's edit: its prompt, located over templates 1-2 like ``tiny_fact_group``."""
    paraphrases = tuple(t.format(s=record.subject) for t in _toy_templates()[1:3])
    return EditGroup({"en": LanguageEdit(record.src, record.subject, record.alt, paraphrases)})


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
    parser.add_argument("--data", choices=("mzsre", "toy"), default="mzsre")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--langs", default="en,de,fr,es,pt,vi")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1, help="records per edit_many call")
    parser.add_argument("--checkpoints", default="10,100,250,500,1000")
    parser.add_argument("--sample", type=int, default=50, help="earlier edits checked per checkpoint")
    parser.add_argument("--unrelated", type=int, default=50, help="unrelated loc questions checked")
    parser.add_argument("--save-every", type=int, default=10, help="edits between bank saves (resume points)")
    parser.add_argument("--out", type=Path, default=Path("seq-edits"))
    args = parser.parse_args()
    if args.save_every < 1 or args.batch_size < 1:
        parser.error(f"--save-every and --batch-size must be >= 1, got {args.save_every}, {args.batch_size}")
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.edits} | {args.edits})
    torch.manual_seed(0)
    records = (toy_records(2 * args.edits) if args.data == "toy"  # room for refused edits
               else edit_records(args.data_dir, args.langs.split(",")))
    if len(records) < args.edits:
        raise ValueError(f"--edits {args.edits}: the dev data gives only {len(records)} usable edits for "
                         f"{args.langs}; add languages to --langs")
    unrelated = [(r.loc, r.loc_ans) for _, _, r in records[-args.unrelated:]]
    model = load_model(args.model)
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
    skipped, saved = position - len(made), len(made)
    print("| edits | Rel hit | Gen hit | retained (n) | unrelated unchanged | s/edit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    while len(made) < args.edits and position < len(records):
        wanted = min(args.batch_size, next(c for c in checkpoints if c > len(made)) - len(made))
        chunk = list(range(position, min(position + wanted, len(records))))
        fresh = edit_chunk(model, edited, records, chunk, args.data)
        skipped, position = skipped + len(chunk) - len(fresh), chunk[-1] + 1
        made += fresh
        with log.open("a") as handle:
            handle.writelines(json.dumps(m) + "\n" for m in fresh)
        if len(made) in checkpoints or len(made) - saved >= args.save_every:
            model.save_pretrained(args.out / "bank")
            saved = len(made)
        if len(made) in checkpoints:
            print(checkpoint(edited, made, records, unrelated, reference, args.sample), flush=True)
    if made and len(made) not in checkpoints:  # the records ran out (refusals): keep what was made
        model.save_pretrained(args.out / "bank")
        print(checkpoint(edited, made, records, unrelated, reference, args.sample), flush=True)
    print(f"\n{len(made)} edits made, {skipped} refused or not reached; {args.model}, data {args.data}"
          + (f", langs {args.langs}" if args.data == "mzsre" else ""))


def edit_chunk(model: EditableCausalLM, edited: EditMethod, records: list[tuple[int, str, ZsreRecord]],
               chunk: list[int], data: str) -> list[dict]:
    """Edit the records at positions ``chunk`` (one ``edit_many`` call); the log lines of those stored, each
    with whether its ``src`` question answered right straight after."""
    started = time.perf_counter()
    groups = [toy_group(records[p][2]) if data == "toy" else
              EditGroup({records[p][1]: LanguageEdit(records[p][2].src, records[p][2].subject, records[p][2].alt)})
              for p in chunk]
    outcome = model.edit_many(groups, batch_size=len(groups), progress=False)
    refused = {index for index, _ in outcome.failures}
    stored = [p for k, p in enumerate(chunk) if k not in refused]
    hits = [answer_hit(answer, records[p][2].alt) for answer, p in
            zip(answers(edited, [records[p][2].src for p in stored], [records[p][2].alt for p in stored]), stored)]
    seconds = (time.perf_counter() - started) / max(1, len(stored))
    return [{"position": p, "index": records[p][0], "lang": records[p][1], "entry_id": result.entry_id,
             "hit_after": hit, "seconds": seconds} for p, result, hit in zip(stored, outcome.results, hits)]


if __name__ == "__main__":
    main()
