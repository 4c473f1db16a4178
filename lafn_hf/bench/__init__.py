"""``lafn bench``: editing methods side by side on the same benchmark items (kept out of the core library).

``methods`` (the ``EditMethod`` interface and LAFN, unedited, in-context and LoRA baselines; peft is
imported only by ``LoraMethod``), ``metrics`` (answer hit, contains, token F1), ``settings`` (``BenchSettings``,
``Question``), ``runner`` (resumable runs keyed on their settings), ``report`` (markdown tables, JSON summary,
grouped-bar plot) and ``data/locality_hard.json`` (600 hand-written Locality-Hard questions, one per language in
en, zh, de and fr for each of items 0-149 of the MzsRE dev split).
"""

from .methods import (
    EditMethod,
    Handle,
    InContextMethod,
    LafnMethod,
    LoraMethod,
    LoraSettings,
    UneditedMethod,
    build_methods,
)
from .metrics import answer_hit, contains, normalize_answer, same_answer
from .report import markdown_table, plot_summary, reach_table, summarize
from .runner import load_locality_hard, run_bench, run_benchmark
from .settings import BenchSettings, Question

__all__ = [
    "BenchSettings", "EditMethod", "Handle", "InContextMethod", "LafnMethod", "LoraMethod", "LoraSettings", "Question",
    "UneditedMethod", "answer_hit", "build_methods", "contains", "load_locality_hard", "markdown_table",
    "normalize_answer", "plot_summary", "reach_table", "run_bench", "run_benchmark", "same_answer",
    "summarize",
]
