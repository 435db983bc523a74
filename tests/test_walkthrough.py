"""Follow the documentation as a new user would: every shell command, in reading order, on a fresh copy.

The commands are the lines of the ```bash blocks of README.md and then of the docs/ pages, in the order
README.md links them (pages it does not link follow in name order). Each command runs in a temporary
copy of the tracked files (a git repository of its own), one after the other, so later commands find
the run folders that earlier ones made, exactly as they would for a user:

* a command of an entry point listed in ``ENTRY_POINTS`` whose data are the generated ``SyntheticShapes``
  runs for real, with tiny overrides appended (one epoch, a few shapes per class: see
  ``tiny_overrides``) and some flag values shrunk (``--repeats 2``, ``--limit 4``, ...);
* a command that names a placeholder (``CKPT``, ``RUN/...``, ``<dir>``, ``[--option]``), a file the
  user downloads (an official ``.pth`` outside ``experiments/``), a data folder, or a config whose data
  are the official data sets, runs as ``--help`` of its entry point (once per entry point and
  sub-command), and every ``--option`` it names must be in that help text;
* ``pip`` and ``pytest`` lines are not run (the suite is what runs this test).

It asserts that no command fails (in particular none is refused because its run folder already holds a
run), and that afterwards ``git status`` of the copy is clean: no documented command writes over a
tracked file or leaves an untracked one outside the ignored folders.

Adding an entry point: one line in ``ENTRY_POINTS``. Its commands then get ``tiny_overrides`` (derived
from the command's resolved config, so a new config needs nothing) plus the entry's flag rewrites.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# entry point -> flag values replaced in its commands (a flag absent from the command is not added),
# plus arguments appended. Entry points not listed here (bench/, tools/prepare_data.py, ...) run as --help.
ENTRY_POINTS: dict[str, dict] = {
    "main_pretrain.py": {"config": True},
    "main_finetune.py": {"config": True, "downstream": True, "flags": {"--way": "2", "--shot": "2"}},
    "segmentation/main.py": {"config": True, "downstream": True},
    "tools/eval_svm.py": {"config": True, "flags": {"--repeats": "2", "--kfold": "2"}},
    "tools/gc_probe.py": {"append": ["--limit", "4"]},
    "tools/visualize.py": {},
}
# entry points that are run as --help even on the generated data (hours of runs)
HELP_ONLY = {"tools/compare_masking.py"}

TINY_TRAIN, TINY_TEST = 3, 3     # shapes per class (3: the SVM's 3-fold cross-validation of C; 48 test shapes)
REFUSAL = re.compile(r"already (holds|contains|has) a run|already exists", re.I)


# ------------------------------------------------------------------------------------------ extraction

@dataclass
class Command:
    page: str
    line: int
    text: str                      # as written (continuations joined, variables expanded)
    argv: list[str]
    mode: str = "run"              # run | help | skip
    why: str = ""
    entry: str = ""                # the entry point (script path) for run / help
    extra: list[str] = field(default_factory=list)


_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(/.*)?$|[<>\[\]]|\.\.\.|\*")


def doc_pages(root: Path) -> list[str]:
    """README.md, then the docs/ pages in the order README.md links them, then the others by name."""
    readme = (root / "README.md").read_text(encoding="utf-8")
    readme = re.sub(r"<!--.*?-->", "", readme, flags=re.S)
    linked = []
    for m in re.finditer(r"\]\((docs/[^)#\s]+\.md)", readme):
        if m.group(1) not in linked and (root / m.group(1)).is_file():
            linked.append(m.group(1))
    rest = sorted(p.relative_to(root).as_posix() for p in (root / "docs").glob("*.md"))
    return ["README.md", *linked, *[p for p in rest if p not in linked]]


def shell_lines(page: str, text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every ```bash / ```sh block, continuations joined, comments kept."""
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) not in ("bash", "sh", "shell"):
            continue
        first = text.count("\n", 0, m.start(2)) + 1
        buf, start = "", None
        for i, raw in enumerate(m.group(2).splitlines()):
            if start is None:
                start = first + i
            if raw.rstrip().endswith("\\"):
                buf += raw.rstrip()[:-1] + " "
                continue
            buf += raw
            if buf.strip():
                out.append((start, buf.strip()))
            buf, start = "", None
    return out


def parse_commands(pages: list[tuple[str, str]]) -> list[Command]:
    """Commands of ``[(page name, markdown text), ...]`` in order; ``VAR=value`` lines set variables."""
    env: dict[str, str] = {}
    cmds = []
    for page, text in pages:
        for line, logical in shell_lines(page, text):
            argv = shlex.split(logical, comments=True)
            if not argv:
                continue
            if len(argv) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
                key, _, value = argv[0].partition("=")
                env[key] = value
                continue
            expanded = [re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda mm: env.get(mm.group(1), mm.group(0)), a)
                        for a in argv]
            cmds.append(Command(page, line, shlex.join(expanded), expanded))
    return cmds


def inline_commands(pages: list[tuple[str, str]]) -> list[Command]:
    """```python ...``` commands written as inline code (tables, prose) outside fenced blocks: they are
    summaries (placeholders, ``...``), so they are only checked, as --help, never run."""
    cmds = []
    for page, text in pages:
        bare = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), re.sub(r"<!--.*?-->", "", text, flags=re.S))
        for m in re.finditer(r"`(python3? [^`\n]+\.py[^`\n]*)`", bare):
            try:
                argv = shlex.split(m.group(1))
            except ValueError:
                continue
            cmds.append(Command(page, bare.count("\n", 0, m.start()) + 1, m.group(1), argv, mode="help",
                                why="inline code"))
    return cmds


# ------------------------------------------------------------------------------------------ planning

def _entry_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script, its arguments) of a ``python script ...`` or ``torchrun ... script ...`` line."""
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        return argv[1], argv[2:]
    if argv[0] == "torchrun":
        for i, a in enumerate(argv[1:], 1):
            if a.endswith(".py"):
                return a, argv[i + 1:]
    return None


def _subcommand(args: list[str]) -> list[str]:
    return args[:1] if args and re.fullmatch(r"[a-z][a-z0-9_-]*", args[0]) else []


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _overrides_in(args: list[str]) -> list[str]:
    return [a for a in args if re.fullmatch(r"[A-Za-z_][\w.]*=.*", a)]


def tiny_overrides(cfg, downstream: bool = False) -> list[str]:
    """Overrides that shrink a run of ``cfg`` (a resolved config) to seconds, from the keys it has: one
    epoch, ``TINY_TRAIN`` / ``TINY_TEST`` shapes per class of every SyntheticShapes section, every
    periodic evaluation at that epoch; for a ``downstream`` entry point (fine-tuning, segmentation) also
    one 2-way 2-shot few-shot fold with one query shape and two votes."""
    out = ["max_epoch=1", "threads=1", "log.progress_bar=false"]
    if cfg.get("scheduler") and "epochs" in (cfg["scheduler"].get("kwargs") or {}):
        out += ["scheduler.kwargs.epochs=1", "scheduler.kwargs.initial_epochs=0"]
    for name, section in (cfg.get("dataset") or {}).items():
        if isinstance(section, dict) and section.get("NAME") == "SyntheticShapes":
            if section.get("subset", "train") == "train":
                out.append(f"dataset.{name}.samples_per_class={TINY_TRAIN}")
            else:
                out.append(f"dataset.{name}.test_per_class={TINY_TEST}")
    # a few-shot fold trains on way x shot = 4 shapes: no batch may be larger
    out.append(f"total_bs={min(int(cfg['total_bs']), 4 if downstream else 8)}")
    for key in ("eval.svm_every", "vis.gc_every", "vis.probe_every", "save_every", "finetune.eval_every"):
        head, _, leaf = key.partition(".")
        node = cfg.get(head) if leaf else cfg
        value = (node or {}).get(leaf or head) if isinstance(node, dict) else None
        if isinstance(value, int) and value > 1:
            out.append(f"{key}=1")
    if downstream:
        out += ["finetune.votes=2", "finetune.fewshot.folds=1", "finetune.fewshot.query=1",
                "finetune.fewshot.ways=[2]", "finetune.fewshot.shots=[2]"]
    if isinstance(cfg.get("vis"), dict) and cfg["vis"].get("probe_every"):
        out.append("vis.probe_shapes=4")
    return out


def synthetic_only(cfg) -> bool:
    sections = [s for s in (cfg.get("dataset") or {}).values() if isinstance(s, dict) and s.get("NAME")]
    return bool(sections) and all(s["NAME"] == "SyntheticShapes" for s in sections)


def plan(cmd: Command, root: Path) -> Command:
    """Decide how ``cmd`` runs in the copy at ``root`` (before the commands ahead of it have run: only
    facts of the tree and of the text are used, never files that earlier commands make)."""
    argv = cmd.argv
    if argv[0] == "pip" or argv[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        cmd.mode, cmd.why = "skip", "installs packages"
        return cmd
    if argv[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]) or argv[0] == "pytest":
        cmd.mode, cmd.why = "skip", "the test suite (this test is part of it)"
        return cmd
    if argv[0] == "bash" and len(argv) > 1:
        assert (root / argv[1]).is_file(), f"{cmd.page}:{cmd.line}: {argv[1]} does not exist"
        cmd.mode, cmd.why = "skip", "a shell script (checked to exist)"
        return cmd
    found = _entry_of(argv)
    assert found, (f"{cmd.page}:{cmd.line}: the walkthrough does not know how to run `{cmd.text}` "
                   f"(add its entry point to tests/test_walkthrough.py)")
    script, args = found
    assert (root / script).is_file(), f"{cmd.page}:{cmd.line}: {script} does not exist"
    cmd.entry = script
    config = _flag_value(args, "--config")
    if config is not None and not _PLACEHOLDER.search(config):
        assert (root / config).is_file(), f"{cmd.page}:{cmd.line}: config {config} does not exist"
    spec = ENTRY_POINTS.get(script)
    if argv[0] == "torchrun" or spec is None or script in HELP_ONLY:
        cmd.mode, cmd.why = "help", "long or not a training entry point"
        return cmd
    for a in args:
        if _PLACEHOLDER.search(a):
            cmd.mode, cmd.why = "help", f"placeholder {a!r}"
            return cmd
        if a.endswith(".pth") and not a.startswith("experiments/"):
            cmd.mode, cmd.why = "help", f"{a} is a downloaded checkpoint"
            return cmd
    if _flag_value(args, "--data") is not None:
        cmd.mode, cmd.why = "help", "needs the user's data folder"
        return cmd
    extra = list(spec.get("append", []))
    if spec.get("config"):
        from utils.config import load_config

        cfg = load_config(root / config, _overrides_in(args))
        if not synthetic_only(cfg):
            cmd.mode, cmd.why = "help", "needs the official data sets"
            return cmd
        extra = tiny_overrides(cfg, spec.get("downstream", False)) + extra
    new_args = list(args)
    for flag, value in spec.get("flags", {}).items():
        for i, a in enumerate(new_args[:-1]):
            if a == flag:
                new_args[i + 1] = value
    cmd.argv = [sys.executable, script, *new_args]
    cmd.extra = extra
    return cmd


# ------------------------------------------------------------------------------------------ running

def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                           timeout=60).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=walkthrough", "-c", "user.email=walkthrough@localhost", "-c",
           "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True, timeout=60)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True, timeout=60)
    subprocess.run(git + ["commit", "-q", "-m", "copy"], cwd=dest, check=True, timeout=60)


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root),
            "MPLBACKEND": "Agg"}


def run_help(root: Path, script: str, sub: list[str]) -> str:
    p = subprocess.run([sys.executable, script, *sub, "--help"], cwd=root, env=_env(root),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{script} {' '.join(sub)} --help failed:\n{p.stderr[-2000:]}"
    return p.stdout


def walk(root: Path, pages: list[tuple[str, str]], min_runs: int = 0) -> tuple[list[str], list]:
    """Run the commands of ``pages`` in the copy at ``root``: (problems found, [(seconds, command)])."""
    problems: list[str] = []
    sys.path.insert(0, str(root))
    try:
        cmds = [plan(c, root) for c in parse_commands(pages)]
        for c in inline_commands(pages):
            found = _entry_of(c.argv)
            if found and (root / found[0]).is_file():
                c.entry = found[0]
                cmds.append(c)
            elif found:
                problems.append(f"{c.page}:{c.line}: `{c.text}`: {found[0]} does not exist")
    finally:
        sys.path.remove(str(root))
    assert sum(c.mode == "run" for c in cmds) >= min_runs, [c.text for c in cmds if c.mode == "run"]

    helps = sorted({(c.entry, tuple(_subcommand(_entry_of(c.argv)[1]))) for c in cmds if c.mode == "help"})
    with ThreadPoolExecutor(max_workers=2) as pool:
        texts = dict(zip(helps, pool.map(lambda h: run_help(root, h[0], list(h[1])), helps)))
    for c in cmds:
        if c.mode != "help":
            continue
        for a in _entry_of(c.argv)[1]:
            path = a.split("=", 1)[-1]
            if path.startswith("cfgs/") and not _PLACEHOLDER.search(path) and not (root / path).is_file():
                problems.append(f"{c.page}:{c.line}: `{c.text}`: {path} does not exist")
        text = texts[(c.entry, tuple(_subcommand(_entry_of(c.argv)[1])))]
        for a in _entry_of(c.argv)[1]:
            flag = a.strip("[]").split("=")[0]
            if flag.startswith("--") and len(flag) > 2 and not re.search(re.escape(flag) + r"\b", text):
                problems.append(f"{c.page}:{c.line}: `{c.text}`: {flag} is not an option of {c.entry}")

    timings = []
    for c in cmds:
        if c.mode != "run":
            continue
        t0 = time.perf_counter()
        p = subprocess.run(c.argv + c.extra, cwd=root, env=_env(root), capture_output=True, text=True,
                           timeout=600)
        timings.append((round(time.perf_counter() - t0, 1), c.text))
        if p.returncode != 0:
            what = "refused: its run folder already holds a run" if REFUSAL.search(p.stderr) else "failed"
            problems.append(f"{c.page}:{c.line}: `{c.text}` {what} (exit {p.returncode}; run with "
                            f"{' '.join(c.extra)}):\n{(p.stdout + p.stderr)[-1500:]}")
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                            check=True, timeout=60).stdout
    if status.strip():
        problems.append("documented commands changed tracked files or left untracked ones:\n" + status)
    return problems, timings


@pytest.mark.slow
def test_every_documented_command_runs_in_order_without_collisions(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    copy_tree(root)
    pages = [(p, (root / p).read_text(encoding="utf-8")) for p in doc_pages(root)]
    problems, timings = walk(root, pages, min_runs=8)
    print("slowest commands (s):", sorted(timings, reverse=True)[:6])
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
def test_the_walk_reports_a_refused_repeat_and_an_overwritten_tracked_file(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    copy_tree(root)
    page = ("```bash\n"
            "python main_pretrain.py --config cfgs/pretrain/quickstart.yaml\n"
            "python main_pretrain.py --config cfgs/pretrain/quickstart.yaml\n"
            "python tools/visualize.py curves --run experiments/quickstart/default -o docs/figures/curves.png\n"
            "```\n")
    problems, _ = walk(root, [("BAD.md", page)])
    assert len(problems) == 2, problems
    assert problems[0].startswith("BAD.md:3:") and "refused: its run folder already holds a run" in problems[0]
    assert "changed tracked files" in problems[1] and "docs/figures/curves.png" in problems[1]


# ------------------------------------------------------------------------------------------ unit tests

_SAMPLE = """# Page

```bash
python main_pretrain.py --config cfgs/pretrain/quickstart.yaml   # stage 1
R=experiments/quickstart/default
python tools/eval_svm.py --config cfgs/pretrain/quickstart.yaml \\
    --ckpt $R/ckpt-last.pth --repeats 5
python main_finetune.py --config cfgs/finetune/modelnet40.yaml --finetune CKPT --vote
python tools/gc_probe.py RUN/ckpt-last.pth [--limit N]
pip install -r requirements.txt -e .
```

```text
python main_pretrain.py --config not/a/command.yaml
```
"""


def test_extraction_joins_continuations_expands_variables_and_ignores_other_blocks():
    cmds = parse_commands([("P.md", _SAMPLE)])
    assert [c.line for c in cmds] == [4, 6, 8, 9, 10]
    assert cmds[0].argv == ["python", "main_pretrain.py", "--config", "cfgs/pretrain/quickstart.yaml"]
    assert cmds[1].argv[-4:] == ["--ckpt", "experiments/quickstart/default/ckpt-last.pth", "--repeats", "5"]


def test_plan_runs_tiny_or_help_by_what_the_command_needs():
    cmds = [plan(c, ROOT) for c in parse_commands([("P.md", _SAMPLE)])]
    assert [c.mode for c in cmds] == ["run", "run", "help", "help", "skip"]
    pre, svm = cmds[0], cmds[1]
    assert pre.argv[1:] == ["main_pretrain.py", "--config", "cfgs/pretrain/quickstart.yaml"]
    assert {"max_epoch=1", "dataset.train.samples_per_class=3", "dataset.svm_test.test_per_class=3",
            "eval.svm_every=1"} <= set(pre.extra)
    assert svm.argv[-1] == "2"  # --repeats 5 -> 2
    assert "placeholder" in cmds[2].why and "placeholder" in cmds[3].why


def test_tiny_overrides_are_accepted_by_the_config_they_shrink():
    from utils.config import load_config

    for name in ("cfgs/pretrain/quickstart.yaml", "cfgs/pretrain/gm3d_quickstart.yaml",
                 "cfgs/finetune/quickstart_fewshot.yaml", "cfgs/segmentation/quickstart_seg.yaml"):
        cfg = load_config(ROOT / name)
        small = load_config(ROOT / name, tiny_overrides(cfg, downstream="pretrain" not in name))
        assert small["max_epoch"] == 1, name
        for section in small["dataset"].values():
            if isinstance(section, dict) and section.get("NAME") == "SyntheticShapes":
                key = "samples_per_class" if section.get("subset", "train") == "train" else "test_per_class"
                assert section[key] in (TINY_TRAIN, TINY_TEST), (name, section)


def test_unknown_commands_in_a_bash_block_are_an_error():
    with pytest.raises(AssertionError, match="does not know how to run"):
        plan(parse_commands([("P.md", "```bash\nmake everything\n```\n")])[0], ROOT)


def test_inline_commands_are_found_outside_fences_and_comments():
    text = ("| row | `python main_finetune.py --config cfgs/finetune/modelnet40.yaml --finetune CKPT` |\n"
            "```bash\npython main_pretrain.py --config x.yaml\n```\n"
            "<!-- `python tools/eval_svm.py --config y.yaml` -->\n`python -m pytest -q`\n")
    cmds = inline_commands([("P.md", text)])
    assert [(c.line, c.argv[1], c.mode) for c in cmds] == [(1, "main_finetune.py", "help")]
