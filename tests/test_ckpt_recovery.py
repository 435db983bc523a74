"""ckpt-prev.pth, the fall-back beside ckpt-last.pth (docs/RELIABILITY.md, promises 1, 2 and 5).

A kill between the hard link ckpt-prev.pth := ckpt-last.pth and the next write of ckpt-last.pth leaves both
names on one file; the next commit must still leave no temp file and a correct ckpt-prev.pth. A damaged
ckpt-last.pth is reported in one line that names the intact ckpt-prev.pth and how to use it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.test_reliability import temps, train
from tools.engine import checkpoint as ckpt_io
from utils.errors import CheckpointError


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


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "zeroed_tensor_bytes":  # torch.load alone accepts this file, with wrong weights
        mid = len(data) // 2
        data = data[:mid] + bytes(64) + data[mid + 64:]
    else:
        data = b""
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["truncated", "zeroed_tensor_bytes", "empty"])
def test_a_damaged_ckpt_last_names_the_intact_ckpt_prev_and_its_advice_works(tmp_path, how):
    run = tmp_path / "run"
    train(run, max_epoch=3, values=(3, 1, 2), stop_after_epoch=1)  # best: epoch 0, as ckpt-prev.pth
    _damage(run / "ckpt-last.pth", how)
    prev = run / "ckpt-prev.pth"
    with pytest.raises(CheckpointError) as info:
        train(run, max_epoch=3, values=(3, 1, 2), resume=True)
    message = str(info.value)
    assert "\n" not in message and str(run / "ckpt-last.pth") in message
    assert f"{prev} (epoch 0) is intact: to resume from it, cp {prev} {run / 'ckpt-last.pth'}" in message
    assert "it repeats epoch 1" in message
    if how == "zeroed_tensor_bytes":
        assert "fails the zip CRC check" in message
    shutil.copy(prev, run / "ckpt-last.pth")  # the advice
    _, summary = train(run, max_epoch=3, values=(3, 1, 2), resume=True)
    assert summary["last_epoch"] == 2 and temps(run) == []


def test_a_damaged_ckpt_last_without_a_fallback_says_so(tmp_path):
    run = tmp_path / "run"
    train(run, max_epoch=3, stop_after_epoch=0)  # one epoch: no ckpt-prev.pth yet
    (run / "ckpt-best.pth").unlink(missing_ok=True)
    _damage(run / "ckpt-last.pth", "truncated")
    with pytest.raises(CheckpointError, match=r"No intact checkpoint is left beside it .*start again"):
        ckpt_io.load_file(run / "ckpt-last.pth")
    other = tmp_path / "x.pth"  # any other name: no fall-back search
    torch.save({"epoch": 1}, other)
    _damage(other, "zeroed_tensor_bytes")
    with pytest.raises(CheckpointError) as info:
        ckpt_io.load_file(other)
    assert "intact" not in str(info.value) and str(other) in str(info.value)


def test_the_ln_f_recipe_on_the_cli_leaves_no_temp_file(tiny_config, tmp_path):
    """The reported recipe with a tiny model: stop after epoch 1 of 3, ``ln -f ckpt-last.pth ckpt-prev.pth``,
    resume with the same overrides, list the folder. Before it, a damaged ckpt-last.pth on ``--resume``:
    exit 2 and one line naming ckpt-prev.pth."""
    cfg = tiny_config(eval={"svm_every": 0}, max_epoch=3)
    run = tmp_path / "D"
    args = ["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run)]
    env = {"PYTHONPATH": str(REPO)}
    r = run_cli([*args, "--stop_after_epoch", "1"], env_extra=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run / "ckpt-prev.pth").exists()
    good = (run / "ckpt-last.pth").read_bytes()
    _damage(run / "ckpt-last.pth", "truncated")
    r = run_cli([*args, "--resume"], env_extra=env)
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if "Error" in ln]
    assert r.returncode == 2 and len(errors) == 1, r.stdout + r.stderr
    assert f"{run / 'ckpt-prev.pth'} (epoch 0) is intact" in errors[0] and "Traceback" not in r.stderr
    (run / "ckpt-last.pth").write_bytes(good)
    os.link(run / "ckpt-last.pth", run / ".link")
    os.replace(run / ".link", run / "ckpt-prev.pth")
    r = run_cli([*args, "--resume"], env_extra=env)
    assert r.returncode == 0, r.stdout + r.stderr
    names = sorted(p.name for p in run.iterdir())
    assert [n for n in names if n.endswith(".tmp")] == [], names
    assert {"ckpt-last.pth", "metrics.jsonl", "summary.json"} <= set(names) and "ckpt-prev.pth" not in names
    assert _epoch(run / "ckpt-last.pth") == 2
