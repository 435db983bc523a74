"""The import graph: layers only import downwards, no library module imports a command-line script, no circle.

Layers, bottom to top: ``utils`` < ``extensions`` < ``models`` / ``datasets`` < ``tools.engine`` (the training
loop, recovery, optimiser, checkpoints, run set-up, builders) < ``tools.vis`` (figures and diagnostics; the
pre-training wires its evaluators in) < ``tools.tasks`` (pre-training, fine-tuning, few-shot, segmentation,
SVM) < ``tools.launch`` (the job runner) < command-line scripts (``main_*.py``, ``segmentation/main.py``, the
``tools/*.py`` files with a ``__main__`` guard, ``bench/``). Every import statement counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "extensions", "models", "datasets", "tools", "segmentation")
RANK = {"utils": 0, "extensions": 1, "models": 2, "datasets": 2, "tools.engine": 3, "tools.vis": 4, "tools.tasks": 5,
        "tools.launch": 6, "tools": 7, "segmentation": 8}
"""Floors by name (the longest prefix decides): ``tools`` itself holds the command-line scripts, ``segmentation``
the segmentation entry point."""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            mods[module_name(path)] = path
    for path in ROOT.glob("main_*.py"):
        mods[module_name(path)] = path
    return mods


def is_script(path: Path) -> bool:
    text = path.read_text()
    return path.name.startswith("main_") or "__name__ == \"__main__\"" in text or "__name__ == '__main__'" in text


def imports_of(path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules imported by ``path`` (resolved to the longest existing module name)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    out = set()
    for n in names:
        parts = n.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in mods:
                out.add(cand)
                break
    return out


@pytest.fixture(scope="module")
def graph():
    mods = project_modules()
    return mods, {m: imports_of(p, mods) - {m} for m, p in mods.items()}


def floor(module: str) -> str | None:
    """The layer of ``module``: the longest prefix of its dotted name listed in :data:`RANK`."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in RANK:
            return ".".join(parts[:i])
    return None


def test_every_floor_holds_modules(graph):
    """The layer rule cannot pass vacuously: each floor of the library holds modules (``tools.launch`` once it
    exists), and the engine and the tasks hold the modules they are named for."""
    mods, _ = graph
    floors = {f: sorted(m for m in mods if floor(m) == f) for f in RANK}
    empty = [f for f, ms in floors.items() if not ms and f != "tools.launch"]
    assert not empty, f"floors without modules: {empty}"
    assert {"tools.engine.trainer", "tools.engine.recovery", "tools.engine.runs", "tools.engine.optim",
            "tools.engine.checkpoint", "tools.engine.builders"} <= set(floors["tools.engine"])
    assert {"tools.tasks.pretrain", "tools.tasks.finetune", "tools.tasks.fewshot", "tools.tasks.segment",
            "tools.tasks.svm", "tools.tasks.common"} <= set(floors["tools.tasks"])
    assert floor("tools.eval_svm") == "tools" and floor("main_pretrain") is None


def test_layers_only_import_downwards(graph):
    mods, edges = graph
    bad = []
    for src, dsts in edges.items():
        top = floor(src)
        if top is None:
            continue
        for dst in dsts:
            dtop = floor(dst)
            if dst.startswith("main_") or (dtop is not None and RANK[dtop] > RANK[top]):
                bad.append(f"{src} imports {dst}")
            elif dtop is not None and dtop != top and RANK[dtop] == RANK[top]:
                bad.append(f"{src} imports {dst} ({top} and {dtop} are peers)")
    assert not bad, "\n".join(sorted(bad))


def test_the_engine_imports_no_task_and_the_tasks_no_launcher(graph):
    """Spelled out, the two rules of the split: ``tools.engine`` imports nothing of ``tools.tasks``,
    ``tools.vis`` or ``tools.launch``; ``tools.tasks`` nothing of ``tools.launch``."""
    _, edges = graph
    above = {"tools.engine": ("tools.tasks", "tools.vis", "tools.launch"), "tools.tasks": ("tools.launch",)}
    bad = [f"{src} imports {dst}" for src, dsts in edges.items() for dst in dsts
           if floor(src) in above and any(dst == f or dst.startswith(f + ".") for f in above[floor(src)])]
    assert not bad, "\n".join(sorted(bad))


def test_no_library_module_imports_a_script(graph):
    mods, edges = graph
    scripts = {m for m, p in mods.items() if is_script(p)}
    assert "tools.eval_svm" in scripts and "main_pretrain" in scripts  # the rule sees the scripts
    bad = [f"{src} imports the script {dst}" for src, dsts in edges.items() if src not in scripts
           for dst in dsts if dst in scripts]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle(graph):
    _, edges = graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own sub-modules in __init__ is not a cycle
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)
