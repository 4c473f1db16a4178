"""The package's import graph: no cycles, and imports only point down the pipeline.

Stages, first to last (a module may import its own stage and the stages before it, never a later one):
ground (text, stopwords, tokens, hooks, values) -> config (config, request, models) -> bank -> routing -> editing
-> runtime -> model -> evaluation (evaluate, zsre, distributed) -> bench -> serve -> cli. Every import counts,
including those inside functions and under ``TYPE_CHECKING``. The package face (``lafn_hf/__init__.py``) may
import any stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lafn_hf"

STAGES = (
    ("text", "stopwords", "tokens", "hooks", "values"),
    ("config", "request", "models"),
    ("bank",),
    ("routing",),
    ("editing",),
    ("runtime",),
    ("model",),
    ("evaluate", "zsre", "distributed"),
    ("bench",),
    ("serve",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(STAGES) for name in names}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + ([base] if node.module else [])
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _stage(module: str) -> str:
    return module.split(".")[1]


def test_every_module_has_a_stage() -> None:
    assert {_stage(name) for name in MODULES if name != "lafn_hf"} <= set(RANK)


def test_imports_point_down_the_pipeline() -> None:
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items() if name != "lafn_hf"
        for target in targets if target != "lafn_hf" and RANK[_stage(target)] > RANK[_stage(name)]
    )
    assert upward == []


def test_no_import_cycles() -> None:
    # a package's __init__ importing its own modules is its face, not a loop
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in GRAPH.items()}
    state: dict[str, int] = {}
    loops: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                loops.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert loops == []
