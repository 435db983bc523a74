"""requirements.txt pins only packages that something in the repository imports."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# requirements.txt name -> the module whose import needs it
IMPORT_NAME = {"scikit-learn": "sklearn", "PyYAML": "yaml", "tensorboard": "torch.utils.tensorboard"}


def _imported(tree: ast.AST) -> set[str]:
    """Every module an import statement names (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _pins(text: str) -> list[str]:
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [line.split("==")[0].strip() for line in lines if line]


def _unimported(pins: list[str], imported: set[str]) -> list[str]:
    tops = imported | {name.split(".")[0] for name in imported}
    return [p for p in pins if IMPORT_NAME.get(p, p) not in tops]


def test_every_pinned_package_is_imported():
    pins = _pins((REPO / "requirements.txt").read_text())
    assert "torch" in pins and "pytest" in pins
    imported: set[str] = set()
    for path in REPO.rglob("*.py"):
        if not any(part.startswith(".") for part in path.relative_to(REPO).parts):
            imported |= _imported(ast.parse(path.read_text()))
    assert _unimported(pins, imported) == [], "requirements.txt pins packages nothing imports"


def test_the_check_sees_an_unused_pin():
    imported = _imported(ast.parse("import torch\nfrom sklearn.svm import LinearSVC\n"
                                   "from torch.utils.tensorboard import SummaryWriter"))
    pins = _pins("torch==1  # comment\nscikit-learn==2\ntensorboard==3\ntimm==4\n\n# only a comment\n")
    assert pins == ["torch", "scikit-learn", "tensorboard", "timm"]
    assert _unimported(pins, imported) == ["timm"]
