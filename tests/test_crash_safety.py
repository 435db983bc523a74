"""Crash safety: a tiny CPU pre-training is SIGKILLed at seeded random points (inside every kind of
checkpoint and log write, and between optimizer steps), resumed, and must end exactly like an
uninterrupted run: same weights, same metrics, a consistent summary and no temp file left
(docs/RELIABILITY.md).

Each run is a forked child of the test process (torch is already imported, so a run takes a second or
two). The fault injection lives only here: the child wraps ``tempfile.mkstemp`` (which tells it which
file an atomic write is for), ``os.fsync``, ``os.replace`` and ``AdamW.step`` and kills itself with
SIGKILL at the chosen call. Production code is not changed for the test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

import tools.engine.runs  # noqa: F401
from tests.conftest import tiny_pretrain_cfg

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")]

VOLATILE = ("time_s", "samples_per_s")


def _install_faults(fault: dict | None, trace: list | None) -> None:
    """In the child: kill -9 at ``fault`` = {"kind": partial|before|after|step, "name": file, "at": n}."""
    real_mkstemp, real_fsync, real_replace = tempfile.mkstemp, os.fsync, os.replace
    real_step = torch.optim.AdamW.step
    counts: dict[str, int] = {}
    armed = {"partial": False}

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def hit(kind: str, name: str) -> bool:
        key = f"{kind}:{name}"
        counts[key] = counts.get(key, 0) + 1
        return fault is not None and fault["kind"] == kind and fault["name"] == name and fault["at"] == counts[key]

    def mkstemp(*a, **kw):
        prefix = kw.get("prefix") or ""
        name = prefix[1:-1] if prefix.startswith(".") and prefix.endswith(".") else prefix
        if hit("partial", name):
            armed["partial"] = True
        return real_mkstemp(*a, **kw)

    def fsync(fd):
        if armed["partial"]:  # the temp file is complete here: cut it in half, then die
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            die()
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        name = Path(dst).name
        if trace is not None:
            trace.append(name)
        if hit("before", name):
            die()
        real_replace(src, dst, *a, **kw)
        counts_after = hit("after", name)
        if counts_after:
            die()

    def step(self, *a, **kw):
        if hit("step", "AdamW"):
            die()
        return real_step(self, *a, **kw)

    tempfile.mkstemp, os.fsync, os.replace = mkstemp, fsync, replace
    torch.optim.AdamW.step = step


def _run(cfg_path: Path, run: Path, fault: dict | None = None, trace_file: Path | None = None) -> int:
    """One forked run (resuming when the folder has a checkpoint); returns the raw wait status."""
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            trace: list | None = [] if trace_file is not None else None
            _install_faults(fault, trace)
            from tools.tasks.pretrain import run_pretrain
            run_pretrain(str(cfg_path), [], run_dir=str(run), resume=(run / "ckpt-last.pth").exists())
            if trace_file is not None:
                trace_file.write_text(json.dumps(trace))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _outcome(run: Path):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    summary["last"] = _stable([summary["last"]])[0]
    summary.get("init", {}).pop("time_s", None)
    last = torch.load(run / "ckpt-last.pth", weights_only=True)
    return _stable(rows), summary, last


def _warm_imports() -> None:
    """Import once in the test process what a run imports lazily, so that every forked run starts fast."""
    import sklearn.model_selection  # noqa: F401
    import sklearn.preprocessing  # noqa: F401
    import sklearn.svm  # noqa: F401

    import tools.engine.builders  # noqa: F401
    import tools.eval_svm  # noqa: F401
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # its first construction imports torch._dynamo


def test_kills_at_random_points_then_resume_match_an_uninterrupted_run(tmp_path):
    _warm_imports()
    cfg = tiny_pretrain_cfg(max_epoch=2, eval={"svm_every": 1, "at_start": True, "svm_C_grid": [0.1]},
                            log={"progress_bar": False, "tensorboard": False})
    cfg_path = tmp_path / "tiny.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    ref = tmp_path / "ref"
    trace_file = tmp_path / "trace.json"
    assert _run(cfg_path, ref, trace_file=trace_file) == 0
    ref_rows, ref_summary, ref_last = _outcome(ref)
    writes = json.loads(trace_file.read_text())  # destination of every rename, in order
    names = sorted(set(writes))
    assert {"ckpt-last.pth", "ckpt-best.pth", "ckpt-prev.pth", "metrics.jsonl", "summary.json", "config.yaml"} <= set(names)

    rng = random.Random(1234)
    faults = []
    for i, name in enumerate(names):  # one kill inside the write of every file, at a random occurrence
        kinds = ["before", "after"] if name == "ckpt-prev.pth" else ["partial", "before", "after"]
        faults.append({"kind": kinds[i % len(kinds)], "name": name, "at": rng.randint(1, writes.count(name))})
    steps = 2 * 4  # 2 epochs of 32 shapes / total_bs 8
    faults += [{"kind": "step", "name": "AdamW", "at": rng.randint(1, steps)} for _ in range(2)]

    for n, fault in enumerate(faults):
        run = tmp_path / f"run{n}"
        status = _run(cfg_path, run, fault)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (fault, status)
        assert _run(cfg_path, run) == 0, fault
        rows, summary, last = _outcome(run)
        assert rows == ref_rows, fault
        assert summary == ref_summary, fault
        assert last["epoch"] == ref_last["epoch"] == 1
        assert _stable(last["history"]) == _stable(ref_last["history"]), fault
        for k, v in ref_last["base_model"].items():
            assert torch.equal(v, last["base_model"][k]), (fault, k)
        assert sorted(p.name for p in run.rglob("*.tmp")) == [], fault
        best = torch.load(run / "ckpt-best.pth", weights_only=True)
        assert best["epoch"] == summary["best_epoch"], fault
        assert not (run / "ckpt-prev.pth").exists(), fault
