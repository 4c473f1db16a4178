"""Where each language's subject is found in its question, on MzsRE dev (no model needed; seconds).

For every en+X pair and for the twelve-language group (the pair files merged by index), per language:
- edits made: items whose language takes part in the edit group, with ``--search written`` (the strict rule
  of earlier versions: the given subject as written) against the default ``aligned``;
- how the subject was found (written, alias, another language's subject, lexical, aligned);
- rephrase (Generality) questions that write none of the forms the item's edit routes on, before (the given
  subjects of the languages edited under ``written``) and after (every span found and every given subject);
- aligned spans that look unlike both the English and the given subject (letters-only similarity after
  transliteration below 0.5): candidates for a false span, printed for reading by hand (``--show``);
- the time to find the spans, per language-prompt.

    python benchmarks/subject_spans.py
    python benchmarks/subject_spans.py --show 40     # also print 40 aligned spans, lowest score first
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

from rapidfuzz.distance import Indel

from lafn_hf.editing.subject_span import SubjectSpan, alignment_key
from lafn_hf.routing.matcher import SubjectMatcher
from lafn_hf.zsre import MZSRE_LANGUAGES, Item, load_files, pair_file_code, resolve_item, subject_forms

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre-dev"
LANGUAGES = MZSRE_LANGUAGES[1:]


def load(data_dir: Path, languages: list[str]) -> list[Item]:
    files = [data_dir / f"mzsre_dev_en{pair_file_code(lang)}.json" for lang in languages if lang != "en"]
    return load_files(files, languages)


def unlike(span: SubjectSpan, item: Item) -> bool:
    names = (item["en"].subject, item[span.language].subject)
    return max(Indel.normalized_similarity(alignment_key(span.text), alignment_key(name)) for name in names) < 0.5


def measure(items: list[Item]) -> tuple[dict[str, dict[str, object]], list[tuple[SubjectSpan, Item]], float, int]:
    rows: dict[str, dict[str, object]] = {}
    aligned: list[tuple[SubjectSpan, Item]] = []
    seconds, prompts = 0.0, 0
    for item in items:
        before, _, _ = resolve_item(item, "written")
        started = time.perf_counter()
        group, spans, skipped = resolve_item(item)
        seconds += time.perf_counter() - started
        prompts += len(item)
        forms_before = SubjectMatcher([item[lang].subject for lang in (before.edits if before else {})])
        forms_after = SubjectMatcher(subject_forms(item, spans))
        for lang, record in item.items():
            row = rows.setdefault(lang, {"items": 0, "before": 0, "after": 0, "how": Counter(), "lost_before": 0,
                                         "lost_after": 0, "unlike": 0})
            row["items"] += 1  # type: ignore[operator]
            row["before"] += int(before is not None and lang in before.edits)  # type: ignore[operator]
            row["after"] += int(group is not None and lang in group.edits)  # type: ignore[operator]
            row["lost_before"] += int(not forms_before.find(record.rephrase))  # type: ignore[operator]
            row["lost_after"] += int(not forms_after.find(record.rephrase))  # type: ignore[operator]
            if lang in spans:
                row["how"][spans[lang].how] += 1  # type: ignore[index]
                if spans[lang].how == "aligned":
                    aligned.append((spans[lang], item))
                    row["unlike"] += int(unlike(spans[lang], item))  # type: ignore[operator]
    return rows, aligned, seconds, prompts


def table(name: str, rows: dict[str, dict[str, object]]) -> str:
    lines = [f"### {name}", "", "| lang | edits made: written -> aligned | found as | rephrase with no form: before "
             "-> after | aligned unlike en and given |", "| --- | ---: | --- | ---: | ---: |"]
    for lang, row in rows.items():
        n = row["items"]
        how = ", ".join(f"{k} {v}" for k, v in sorted(row["how"].items()))  # type: ignore[attr-defined]
        lines.append(f"| {lang} | {row['before']}/{n} -> {row['after']}/{n} | {how} | {row['lost_before']} -> "
                     f"{row['lost_after']} | {row['unlike']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--show", type=int, default=0, help="print this many aligned spans, lowest score first")
    args = parser.parse_args()
    logging.getLogger("lafn_hf.editing.subject_span").setLevel(logging.ERROR)  # one warning per aligned span otherwise
    sets = [[("en", lang)] for lang in LANGUAGES] + [[("all", "")]]
    everything: list[tuple[SubjectSpan, Item]] = []
    for (first, second), in sets:
        languages = ["en", *LANGUAGES] if first == "all" else ["en", second]
        rows, aligned, seconds, prompts = measure(load(args.data_dir, languages))
        name = "twelve languages, one group" if first == "all" else f"en+{second}"
        print(table(name, rows))
        print(f"\n{seconds / prompts * 1000:.2f} ms per language-prompt to find its span\n")
        if first == "all":
            everything = aligned
    for span, item in sorted(everything, key=lambda pair: pair[0].score)[: args.show]:
        print(f"{span.score:5.1f} {span.language} {span.text!r} <- {span.source!r} | en {item['en'].subject!r} | "
              f"{item[span.language].src}")


if __name__ == "__main__":
    main()
