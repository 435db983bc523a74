"""The OpenMP wait policy: passive unless the user chose, and set by every entry script before torch loads."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env
from utils.omp import CHOICE_VAR, apply_wait_policy

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = ("main_pretrain.py", "main_finetune.py", "segmentation/main.py", "tools/eval_svm.py",
                 "tools/gc_probe.py", "tools/prepare_data.py", "tools/visualize.py",
                 "tools/compare_masking.py")


def test_passive_by_default_and_user_choices_respected() -> None:
    env: dict[str, str] = {}
    assert apply_wait_policy(env) == "OMP_WAIT_POLICY=PASSIVE (project default)"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert "ACTIVE (set by the user)" in apply_wait_policy(env) and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {CHOICE_VAR: "default"}
    assert "runtime's default" in apply_wait_policy(env) and "OMP_WAIT_POLICY" not in env
    with pytest.raises(ValueError, match=r"GEOMASK3D_OMP_WAIT='spin': expected one of passive, default"):
        apply_wait_policy({CHOICE_VAR: "spin"})


def _first_torch_import_line(tree: ast.Module) -> int:
    """Line of the first top-level statement that (directly or through the project) imports torch."""
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] in ("torch", "numpy", "tools", "models", "datasets", "segmentation")
                   for n in names):
                return node.lineno
    return 10**9


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_scripts_apply_the_policy_before_torch(script: str) -> None:
    tree = ast.parse((REPO / script).read_text())
    calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "apply_wait_policy"]
    assert calls and min(calls) < _first_torch_import_line(tree), script


@pytest.mark.slow
def test_an_entry_script_runs_with_passive_unless_told() -> None:
    probe = "\n".join([
        "import os, runpy, sys",
        "sys.argv = ['prepare_data.py', 'layout', 'shapenet', '--root', '/nonexistent']",
        "try:",
        "    runpy.run_path('tools/prepare_data.py', run_name='__main__')",
        "except SystemExit:",
        "    pass",
        "print('policy', os.environ.get('OMP_WAIT_POLICY'))",
    ])
    env = child_env({k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", CHOICE_VAR)})

    def run(extra: dict[str, str]) -> str:
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**env, **extra},
                             capture_output=True, text=True, timeout=120)
        return out.stdout.splitlines()[-1]

    assert run({}) == "policy PASSIVE"
    assert run({"OMP_WAIT_POLICY": "ACTIVE"}) == "policy ACTIVE"
    assert run({CHOICE_VAR: "default"}) == "policy None"
