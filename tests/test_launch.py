"""The job-graph runner (tools/launch): identities, reuse, failures, kill and resume, a second launcher,
and the submitit path, on a stand-in entry point (tests/launch_entry.py) that starts in a fraction of a
second. The real entry points run through it in tests/test_reproduce.py and tests/test_model_ema.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import child_env
from tools.launch.executors import LocalExecutor, SlurmExecutor
from tools.launch.graph import Graph
from tools.launch.jobs import Job, job_identity, read_state
from utils.errors import ConfigError

ENTRY = "tests/launch_entry.py"


def job(name, *opts, inp=None, **kw):
    args = ["--input", f"{{run:{inp}}}/summary.json"] if inp else []
    return Job(name=name, entry=ENTRY, args=args, opts=list(opts), **kw)


def chain(marker: Path, **kw):
    return [job("a", "value=1", f"marker={marker}"), job("b", "value=10", f"marker={marker}", inp="a", **kw),
            job("c", "value=100", f"marker={marker}")]


def starts(marker: Path) -> list[str]:
    return marker.read_text().splitlines() if marker.exists() else []


def test_identity_follows_what_runs_and_merges_equal_jobs(tmp_path):
    a, a2, a3 = job("a", "value=1"), job("a_again", "value=1"), job("a3", "value=2")
    assert job_identity(a, {}) == job_identity(a2, {}) != job_identity(a3, {})
    b = job("b", inp="a")
    assert job_identity(b, {"a": "x" * 64}) != job_identity(b, {"a": "y" * 64})  # the input's identity counts
    g = Graph([a, a2, a3, b], tmp_path)
    assert g.folder("a") == g.folder("a_again") != g.folder("a3")
    assert [r["name"] for r in g.plan()] == ["a", "a3", "b"] and g.plan()[0]["aliases"] == ["a_again"]
    # a resolved config is part of the identity: two spellings of one config are one job
    cfg = "cfgs/pretrain/quickstart.yaml"
    j1 = Job("p1", "main_pretrain.py", cfg, opts=["max_epoch=3"])
    j2 = Job("p2", "main_pretrain.py", cfg, opts=["max_epoch=3", "max_epoch=3"])
    j3 = Job("p3", "main_pretrain.py", cfg, opts=["max_epoch=4"])
    assert job_identity(j1, {}) == job_identity(j2, {}) != job_identity(j3, {})


def test_bad_graphs_are_refused_with_the_names(tmp_path):
    with pytest.raises(ConfigError, match="two jobs are named 'a'"):
        Graph([job("a"), job("a")], tmp_path)
    with pytest.raises(ConfigError, match="job b depends on 'zz', which is not a job of this graph"):
        Graph([job("b", inp="zz")], tmp_path)
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        Graph([job("a", inp="b"), job("b", inp="a")], tmp_path)


def test_run_in_dependency_order_then_reuse(tmp_path):
    marker = tmp_path / "starts.txt"
    g = Graph(chain(marker), tmp_path / "out")
    assert {n: s.state for n, s in g.status().items()} == {"a": "pending", "b": "pending", "c": "pending"}
    st = g.run(LocalExecutor(slots=2), poll_s=0.05)
    assert {n: s.state for n, s in st.items()} == {"a": "done", "b": "done", "c": "done"}
    assert st["b"].result["value"] == 11.0  # b read a's result through {run:a}
    assert len(starts(marker)) == 3 and all(s.attempts == 1 for s in st.values())
    again = Graph(chain(marker), tmp_path / "out").run(LocalExecutor(slots=2), poll_s=0.05)
    assert len(starts(marker)) == 3 and all(s.attempts == 1 for s in again.values())  # nothing ran twice
    # a changed upstream job changes its dependant's identity too: both run, in new folders
    jobs = chain(marker)
    jobs[0].opts[0] = "value=2"
    st = Graph(jobs, tmp_path / "out").run(LocalExecutor(slots=1), poll_s=0.05)
    assert st["b"].result["value"] == 12.0 and len(starts(marker)) == 5


def test_a_failing_job_blocks_its_dependants_only_and_names_the_error(tmp_path):
    marker = tmp_path / "starts.txt"
    jobs = [job("a", "fail=true", f"marker={marker}"), job("b", inp="a"), job("c", "value=3")]
    st = Graph(jobs, tmp_path / "out").run(LocalExecutor(slots=2), poll_s=0.05)
    assert (st["a"].state, st["b"].state, st["c"].state) == ("failed", "blocked", "done")
    assert st["a"].error == "exit 2: ERROR main: ConfigError: this job was told to fail"
    assert st["b"].error == "dependency a failed"
    assert "told to fail" in (st["a"].folder / "job.log").read_text()
    # a config that does not load fails that job alone, before anything runs
    bad = Job("p", "main_pretrain.py", "cfgs/pretrain/quickstart.yaml", opts=["max_epochz=3"])
    st = Graph([bad, job("c", "value=3")], tmp_path / "out").run(LocalExecutor(slots=1), poll_s=0.05)
    assert st["p"].state == "failed" and "job p:" in st["p"].error and "max_epochz" in st["p"].error
    assert st["c"].state == "done"
    # a later launch tries a failed job once more (here it fails again, and the run still ends)
    st = Graph(jobs, tmp_path / "out").run(LocalExecutor(slots=2), poll_s=0.05)
    assert st["a"].state == "failed" and st["a"].attempts == 2 and len(starts(marker)) == 2


LAUNCHER = """
import sys
from tools.launch.executors import LocalExecutor
from tools.launch.graph import Graph
from tools.launch.jobs import Job
marker = sys.argv[2]
jobs = [Job("slow", "tests/launch_entry.py", opts=["value=1", "hang=30", "marker=" + marker]),
        Job("after", "tests/launch_entry.py", args=["--input", "{run:slow}/summary.json"], opts=["value=1"])]
Graph(jobs, sys.argv[1]).run(LocalExecutor(slots=1), poll_s=0.05)
"""


def _launch(out: Path, marker: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(LAUNCHER), str(out), str(marker)],
                            cwd=Path(__file__).resolve().parents[1], env=child_env(), start_new_session=True)


def _wait_for(path: Path, timeout: float = 30) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


def test_killed_launcher_resumes_and_a_second_launcher_waits(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "starts.txt"
    jobs = [Job("slow", ENTRY, opts=["value=1", "hang=30", f"marker={marker}"]),
            Job("after", ENTRY, args=["--input", "{run:slow}/summary.json"], opts=["value=1"])]
    g = Graph(jobs, out)
    first = _launch(out, marker)
    _wait_for(g.folder("slow") / "ckpt-last.pth")
    assert g.status()["slow"].state == "running"
    # a second launcher while the first runs: it waits, it does not start the job again
    second = _launch(out, marker)
    time.sleep(1.0)
    assert starts(marker) == ["start resume=False"]
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and its entry point, mid-run
    first.wait()
    second.wait(timeout=60)  # the lock is free now: the second launcher continues the run, with --resume
    assert second.returncode == 0
    st = Graph(jobs, out).status()
    assert starts(marker) == ["start resume=False", "start resume=True"]
    assert st["slow"].state == "done" and st["slow"].attempts == 2 and st["slow"].result == {"value": 1.0,
                                                                                            "resumed": True}
    assert st["after"].state == "done" and st["after"].result["value"] == 2.0
    assert read_state(st["slow"].folder)["cmd"][-1] != "--resume"  # resume goes before the overrides
    assert "--resume" in read_state(st["slow"].folder)["cmd"]


def test_killed_run_shows_partial_in_status(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "starts.txt"
    jobs = [Job("slow", ENTRY, opts=["value=1", "hang=30", f"marker={marker}"])]
    p = _launch(out, marker)
    g = Graph(jobs, out)
    _wait_for(g.folder("slow") / "ckpt-last.pth")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(0.2)
    assert g.status()["slow"].state == "partial"


def test_submitit_local_executor_runs_the_same_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # submitit's worker unpickles tools.launch
    marker = tmp_path / "starts.txt"
    ex = SlurmExecutor(tmp_path / "submitit", cluster="local", cpus=1, time_min=5)
    st = Graph(chain(marker), tmp_path / "out").run(ex, poll_s=0.1)
    assert {n: s.state for n, s in st.items()} == {"a": "done", "b": "done", "c": "done"}
    assert st["b"].result["value"] == 11.0
    # collected again: reused, with no second start
    Graph(chain(marker), tmp_path / "out").run(SlurmExecutor(tmp_path / "submitit", cluster="local"), poll_s=0.1)
    assert len(starts(marker)) == 3
    # failures come back through submitit as well
    st = Graph([job("x", "fail=true")], tmp_path / "out").run(ex, poll_s=0.1)
    assert st["x"].state == "failed" and "told to fail" in st["x"].error


def test_slurm_describe_prints_the_sbatch_parameters(tmp_path):
    ex = SlurmExecutor(tmp_path, partition="gpu", gpus_per_job=1, cpus=10, mem_gb=64, time_min=600,
                       account="lab", extra={"qos": "high"})
    text = ex.describe(Job("pt/s0", "main_pretrain.py", gpus=2))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=10",
                 "#SBATCH --mem=64GB", "#SBATCH --time=600", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --job-name=pt.s0"):
        assert line in text.splitlines(), (line, text)
    params = ex.parameters(Job("pt/s0", "main_pretrain.py"))
    assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 1 and params["timeout_min"] == 600


def test_local_executor_gives_each_job_its_gpus(tmp_path):
    ex = LocalExecutor(gpus=["0", "1", "2"])
    assert ex.slots == 3
    jobs = [Job("one", ENTRY, opts=["value=1"]), Job("two", ENTRY, opts=["value=2"], gpus=2)]
    g = Graph(jobs, tmp_path)
    for j in jobs:
        assert ex.capacity(j)
        ex.reserve(j)
    assert not ex.capacity(Job("three", ENTRY))  # all three GPUs are spoken for
    handles = ex.submit(g, ["one", "two"])
    for h in handles.values():
        h.result()
    one, two = (read_state(g.folder(n)) for n in ("one", "two"))
    assert one["env"] == {"CUDA_VISIBLE_DEVICES": "0"} and two["env"] == {"CUDA_VISIBLE_DEVICES": "1,2"}
    assert two["cmd"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert json.loads((g.folder("one") / "summary.json").read_text())["value"] == 1.0
