"""The import graph: layers only import downwards, no library module imports a command-line script, no circle.

Layers, bottom to top: ``utils`` < ``extensions`` < ``models`` / ``datasets`` < ``tools`` (library) <
command-line scripts (``main_*.py``, ``segmentation/main.py``, the ``tools/*.py`` files with a ``__main__``
guard, ``bench/``). Every import statement counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "extensions", "models", "datasets", "tools", "segmentation")
RANK = {"utils": 0, "extensions": 1, "models": 2, "datasets": 2, "tools": 3, "segmentation": 4}


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


def test_layers_only_import_downwards(graph):
    mods, edges = graph
    bad = []
    for src, dsts in edges.items():
        top = src.split(".")[0]
        if top not in RANK:
            continue
        for dst in dsts:
            dtop = dst.split(".")[0]
            if dtop.startswith("main_") or (dtop in RANK and RANK[dtop] > RANK[top]):
                bad.append(f"{src} imports {dst}")
            if {top, dtop} == {"models", "datasets"} and top != dtop:
                bad.append(f"{src} imports {dst} (models and datasets are peers)")
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
