"""tools/compare_masking.py on the job runner: arms as jobs (the GM3D arm's knowledge teacher is the random
arm's run, the equal-time arm is sized from two finished wall-clocks), an evaluation reading a finished
run's config, reuse on a second call, and ``--report`` from the folders alone."""

from __future__ import annotations

import json

import pytest

from tools.compare_masking import main
from tools.launch.jobs import read_state

TINY = ["max_epoch=1", "scheduler.kwargs.epochs=1", "scheduler.kwargs.initial_epochs=0", "threads=1",
        "total_bs=8", "eval.svm_every=1", "dataset.train.samples_per_class=3", "dataset.svm_train.samples_per_class=3",
        "dataset.svm_test.test_per_class=3"]


@pytest.mark.slow
def test_arms_run_as_jobs_and_are_reused(tmp_path, capsys):
    args = ["--arms", "random", "gm3d_opts", "--equal-time", "--seeds", "0", "--jobs", "2", "--out", str(tmp_path),
            "--ema-svm", "--", *TINY]
    assert main(args) == 0
    table = (tmp_path / "compare.md").read_text()
    for arm in ("random", "gm3d_opts", "random_eqtime"):
        assert f"| {arm} | 1 |" in table
    res = json.loads((tmp_path / "compare.json").read_text())["results"]
    opts = read_state(tmp_path / "gm3d_opts_s0")["cmd"]
    assert f"model.gm3d.teacher_ckpt={tmp_path / 'random_s0'}/ckpt-last.pth" in opts
    eq = res["random_eqtime"][0]
    ratio = res["gm3d_opts"][0]["wall_s"] / res["random"][0]["wall_s"]
    assert eq["epochs"] == max(1, round(ratio))
    assert f"max_epoch={eq['epochs']}" in read_state(tmp_path / "random_eqtime_s0")["cmd"]
    assert 0 <= res["gm3d_opts"][0]["ema_svm"] <= 100
    attempts = {p.parent.name: json.loads(p.read_text())["attempts"] for p in tmp_path.rglob("job.json")}
    assert set(attempts) == {"random_s0", "gm3d_opts_s0", "random_eqtime_s0", "ema_svm"} and set(attempts.values()) == {1}
    capsys.readouterr()
    assert main(args) == 0  # everything is reused: no job starts again
    assert "start " not in capsys.readouterr().out
    assert {p.parent.name: json.loads(p.read_text())["attempts"] for p in tmp_path.rglob("job.json")} == attempts
    assert main([*args[:-len(TINY) - 1], "--report", "--", *TINY]) == 0
    assert (tmp_path / "compare.md").read_text() == table
