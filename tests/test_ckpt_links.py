"""ckpt-prev.pth as a hard link to the previous ckpt-last.pth: a kill between the link and the next write of
ckpt-last.pth leaves both names on one file, and the next commit must still leave no temp file and a
correct ckpt-prev.pth (docs/RELIABILITY.md, promises 1 and 2)."""

from __future__ import annotations

import os

import torch

from tests.conftest import REPO, run_cli
from tests.test_reliability import temps, train
from tools import checkpoint as ckpt_io


def test_replace_with_link_onto_a_link_of_the_same_file_leaves_no_temp(tmp_path):
    src, dst = tmp_path / "ckpt-last.pth", tmp_path / "ckpt-prev.pth"
    src.write_bytes(b"epoch 4")
    os.link(src, dst)
    ckpt_io.replace_with_link(src, dst)  # rename() of one link onto the other is a no-op
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-last.pth", "ckpt-prev.pth"]
    assert dst.read_bytes() == b"epoch 4" and os.path.samefile(src, dst)
    other = tmp_path / "new"
    other.write_bytes(b"epoch 5")
    ckpt_io.replace_with_link(other, dst)  # the ordinary case: dst becomes the other file
    assert dst.read_bytes() == b"epoch 5" and os.path.samefile(other, dst) and not os.path.samefile(src, dst)
    assert temps(tmp_path) == []


def _epoch(path):
    return torch.load(path, weights_only=True)["epoch"]


def test_a_kill_after_the_prev_link_then_resume_in_process(tmp_path):
    """The state a kill between the link and the new ckpt-last leaves (both names on epoch 1's file), resumed
    twice: the next commit keeps epoch 1 as ckpt-prev, the finished run removes it, no temp survives."""
    run = tmp_path / "run"
    train(run, max_epoch=4, values=(1, 2, 3, 4), stop_after_epoch=1)
    os.link(run / "ckpt-last.pth", run / ".x")
    os.replace(run / ".x", run / "ckpt-prev.pth")  # ln -f ckpt-last.pth ckpt-prev.pth
    train(run, max_epoch=4, values=(1, 2, 3, 4), resume=True, stop_after_epoch=2)
    assert temps(run) == []
    assert _epoch(run / "ckpt-prev.pth") == 1 and _epoch(run / "ckpt-last.pth") == 2
    assert not os.path.samefile(run / "ckpt-prev.pth", run / "ckpt-last.pth")
    os.link(run / "ckpt-last.pth", run / ".x")
    os.replace(run / ".x", run / "ckpt-prev.pth")
    train(run, max_epoch=4, values=(1, 2, 3, 4), resume=True)  # the last epoch
    assert temps(run) == [] and not (run / "ckpt-prev.pth").exists() and _epoch(run / "ckpt-last.pth") == 3


def test_the_ln_f_recipe_on_the_cli_leaves_no_temp_file(tiny_config, tmp_path):
    """The reported recipe with a tiny model: stop after epoch 1 of 3, ``ln -f ckpt-last.pth ckpt-prev.pth``,
    resume with the same overrides, list the folder."""
    cfg = tiny_config(eval={"svm_every": 0}, max_epoch=3)
    run = tmp_path / "D"
    args = ["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run)]
    env = {"PYTHONPATH": str(REPO)}
    r = run_cli([*args, "--stop_after_epoch", "1"], env_extra=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run / "ckpt-prev.pth").exists()
    os.link(run / "ckpt-last.pth", run / ".link")
    os.replace(run / ".link", run / "ckpt-prev.pth")
    r = run_cli([*args, "--resume"], env_extra=env)
    assert r.returncode == 0, r.stdout + r.stderr
    names = sorted(p.name for p in run.iterdir())
    assert [n for n in names if n.endswith(".tmp")] == [], names
    assert {"ckpt-last.pth", "metrics.jsonl", "summary.json"} <= set(names) and "ckpt-prev.pth" not in names
    assert _epoch(run / "ckpt-last.pth") == 2
