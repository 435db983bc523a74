"""The package around the code: pyproject's package list matches the folders that hold Python modules, no
script edits ``sys.path``, the pins come from requirements.txt, CI installs the project, LICENSE exists."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env

NOT_INSTALLED = {"tests"}  # folders with Python files that stay out of the package on purpose


def _tracked_py() -> list[Path]:
    """The repository's tracked .py files (every .py outside hidden and ignored folders without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.py"],
                             cwd=REPO, capture_output=True, check=True, timeout=60).stdout
        files = [REPO / f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {"build", "dist", "experiments", "data", "__pycache__"}
        files = [p for p in REPO.rglob("*.py")
                 if not any(part.startswith(".") or part in skip or part.endswith(".egg-info")
                            for part in p.relative_to(REPO).parts)]
    return [f for f in files if f.exists()]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_package_list_is_every_folder_that_holds_python_modules():
    listed = _pyproject()["tool"]["setuptools"]["packages"]
    folders = {".".join(f.relative_to(REPO).parent.parts) for f in _tracked_py()} - {""}
    wanted = {d for d in folders if d.split(".")[0] not in NOT_INSTALLED}
    assert sorted(listed) == sorted(wanted)
    assert {d.split(".")[0] for d in wanted} >= {"models", "datasets", "tools", "utils", "extensions", "segmentation"}
    for package in listed:
        assert (REPO / package.replace(".", "/") / "__init__.py").is_file(), package


def _sys_path_edits(tree: ast.AST) -> list[int]:
    """Lines that call a method of ``sys.path`` or assign to it (or to an item of it)."""
    lines = []
    for node in ast.walk(tree):
        target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else \
            node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Subscript):
            target = target.value
        if isinstance(target, ast.Attribute) and target.attr == "path" and \
                isinstance(target.value, ast.Name) and target.value.id == "sys":
            lines.append(node.lineno)
    return sorted(lines)


def test_no_script_edits_sys_path():
    offenders = [f"{f.relative_to(REPO)}:{line}" for f in _tracked_py()
                 if f.relative_to(REPO).parts[0] not in NOT_INSTALLED
                 for line in _sys_path_edits(ast.parse(f.read_text(), str(f)))]
    assert offenders == []


def test_the_check_sees_a_sys_path_edit():
    code = "import sys\nsys.path.insert(0, '.')\nsys.path = ['x']\nsys.path[0] = 'y'\nprint(sys.path[0])\n"
    assert _sys_path_edits(ast.parse(code)) == [2, 3, 4]


def test_dependencies_are_the_pins_of_requirements_txt_and_ci_installs_the_project():
    project = _pyproject()
    assert project["project"]["dynamic"] == ["dependencies"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        assert not line or "==" in line, f"requirements.txt: {line!r} is not pinned"
    ci = (REPO / ".ci/run").read_text()
    assert "python -m pip install --quiet --disable-pip-version-check -r requirements.txt -e ." in ci


def test_license_is_mit():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the GeoMask3D authors" in text


@pytest.mark.slow
def test_a_script_runs_from_another_folder(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools/eval_svm.py"), "--help"], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: eval_svm.py")
