"""Library modules never import a command-line script (docs/ARCHITECTURE.md: library vs scripts), and
requirements.txt pins only packages something imports."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# modules that are command-line scripts only (argparse + calls into the library)
SCRIPTS = {"main_pretrain", "main_finetune", "tools.visualize", "tools.gc_probe", "tools.prepare_data",
           "tools.compare_masking"}
LIBRARY_DIRS = ("models", "datasets", "utils", "tools", "extensions", "segmentation")


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _library_modules():
    for top in LIBRARY_DIRS:
        for path in sorted((REPO / top).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            if module not in SCRIPTS:
                yield module, path


def test_no_library_module_imports_a_script():
    assert any(m == "tools.runs" for m, _ in _library_modules())  # the walk sees the library
    bad = {m: sorted(_imported(ast.parse(p.read_text())) & SCRIPTS) for m, p in _library_modules()}
    assert {m: s for m, s in bad.items() if s} == {}


def test_the_check_catches_a_script_import():
    assert _imported(ast.parse("from tools.visualize import GCPanelEvaluator")) & SCRIPTS
    assert _imported(ast.parse("from tools import gc_probe")) & SCRIPTS
    assert _imported(ast.parse("import tools.prepare_data as p")) & SCRIPTS


# requirements.txt name -> the module whose import needs it
IMPORT_NAME = {"scikit-learn": "sklearn", "PyYAML": "yaml", "tensorboard": "torch.utils.tensorboard"}


def test_every_pinned_package_is_imported():
    pins = [line.split("#")[0].split("==")[0].strip()
            for line in (REPO / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()]
    assert "torch" in pins and "pytest" in pins
    imported = set()
    for top in (*LIBRARY_DIRS, "tests", "bench"):
        for path in (REPO / top).rglob("*.py"):
            imported |= _imported(ast.parse(path.read_text()))
    for path in REPO.glob("*.py"):
        imported |= _imported(ast.parse(path.read_text()))
    tops = imported | {name.split(".")[0] for name in imported}
    missing = [p for p in pins if IMPORT_NAME.get(p, p) not in tops]
    assert missing == [], f"requirements.txt pins packages nothing imports: {missing}"
