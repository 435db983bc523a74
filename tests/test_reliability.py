"""Run folders that survive kills and misuse, and configs whose out-of-range values fail at load time
(docs/RELIABILITY.md). Everything here runs in-process on a tiny model in a few seconds."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

from models.base import TrainHooks
from tests.conftest import REPO
from tools.engine import runs
from tools.tasks import pretrain
from tools.engine.trainer import NonFiniteLossError, Trainer
from utils.config import load_config
from utils.errors import CheckpointError, ConfigError

QUICK = REPO / "cfgs/pretrain/quickstart.yaml"
BASE = ["total_bs=2", "log.progress_bar=false", "log.tensorboard=false", "eval.svm_every=0",
        "scheduler.kwargs.epochs=3", "scheduler.kwargs.initial_epochs=1"]


def cfg_of(*opts):
    return load_config(QUICK, [*BASE, *opts])


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -0.5, 0.25]))

    def forward(self, batch, epoch=0, generator=None):
        return {"loss": ((batch["points"] * self.w).sum(-1) ** 2).mean()}


class FakeSVM:
    """An evaluator whose svm_acc per epoch is given, so the best epoch is known."""
    name, every = "svm", 1

    def __init__(self, values):
        self.values = values

    def __call__(self, model, epoch):
        return {"svm_acc": float(self.values[epoch])}


def data(n=4, scale=1.0):
    g = torch.Generator().manual_seed(0)
    return [{"points": torch.randn(8, 3, generator=g) * scale, "label": torch.tensor(0)} for _ in range(n)]


def train(run, max_epoch=3, values=(1, 3, 2), resume=False, model=None, **kw):
    t = Trainer(cfg_of(f"max_epoch={max_epoch}"), model or Lin(), data(), run, evaluators=[FakeSVM(values)],
                resume=resume, **kw)
    return t, t.fit()


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def temps(run):
    return sorted(p.name for p in run.rglob("*.tmp"))


# ------------------------------------------------------------------------------------ epoch commit
def test_stale_temps_are_removed_at_start_and_on_resume_and_none_is_left(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".ckpt-last.pth.k1ll3d.tmp").write_bytes(b"\0" * 1000)
    train(run, max_epoch=2)
    assert temps(run) == []
    (run / ".metrics.jsonl.k1ll3d.tmp").write_text('{"epoch"')
    train(run, max_epoch=3, resume=True)
    assert temps(run) == []


def test_checkpoint_metrics_and_summary_describe_the_same_epoch(tmp_path):
    run = tmp_path / "run"
    train(run)
    last = torch.load(run / "ckpt-last.pth", weights_only=True)
    best = torch.load(run / "ckpt-best.pth", weights_only=True)
    summary = json.loads((run / "summary.json").read_text())
    assert last["history"] == metrics(run)
    assert summary["last_epoch"] == last["epoch"] == metrics(run)[-1]["epoch"] == 2
    assert summary["best_epoch"] == best["epoch"] == 1 and summary["best_value"] == 3.0
    assert not (run / "ckpt-prev.pth").exists()  # the fall-back goes once the run has finished


@pytest.mark.parametrize("damage,reason", [
    (lambda t: t[: len(t) - 7], "damaged line 3"),
    (lambda t: t + "garbage{\n", "damaged line 4"),
    (lambda t: "", "is empty"),
    (None, "is missing"),
    (lambda t: t + json.dumps({"epoch": 2, "train/loss": 1.0}) + "\n", "lists epochs [-1, 0, 1, 2]"),
])
def test_a_damaged_metrics_log_is_repaired_from_the_checkpoint(tmp_path, caplog, damage, reason):
    run = tmp_path / "run"
    train(run, max_epoch=3, stop_after_epoch=1)
    good = (run / "metrics.jsonl").read_text()
    if damage is None:
        (run / "metrics.jsonl").unlink()
    else:
        (run / "metrics.jsonl").write_text(damage(good))
    with caplog.at_level(logging.WARNING):
        t = Trainer(cfg_of("max_epoch=3"), Lin(), data(), run, evaluators=[FakeSVM((1, 3, 2))], resume=True)
    assert (run / "metrics.jsonl").read_text() == good
    assert [r["epoch"] for r in t.history] == [-1, 0, 1]
    text = caplog.text
    assert str(run / "metrics.jsonl") in text and reason in text and "rewriting it from" in text
    t.fit()
    assert [r["epoch"] for r in metrics(run)] == [-1, 0, 1, 2]


def test_old_checkpoint_without_history_and_a_garbage_log_is_refused_naming_the_file(tmp_path):
    run = tmp_path / "run"
    train(run, max_epoch=3, stop_after_epoch=1)
    state = torch.load(run / "ckpt-last.pth", weights_only=True)
    del state["history"]
    torch.save(state, run / "ckpt-last.pth")
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1, "tr')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl, line 2, is not valid JSON .*carries no metric history"):
        Trainer(cfg_of("max_epoch=3"), Lin(), data(), run, evaluators=[FakeSVM((1, 3, 2))], resume=True)


@pytest.mark.parametrize("state_of_best", ["missing", "older"])
def test_a_kill_inside_the_best_write_is_repaired_on_resume(tmp_path, state_of_best):
    """Epoch 1 improves; the kill lands after the ckpt-last commit, inside the ckpt-best write."""
    run = tmp_path / "run"
    train(run, max_epoch=3, stop_after_epoch=0)
    older = (run / "ckpt-best.pth").read_bytes()
    train(run, max_epoch=3, resume=True, stop_after_epoch=1)
    epoch1 = torch.load(run / "ckpt-best.pth", weights_only=True)
    assert epoch1["epoch"] == 1
    if state_of_best == "missing":
        (run / "ckpt-best.pth").unlink()
    else:
        (run / "ckpt-best.pth").write_bytes(older)
    train(run, max_epoch=3, resume=True)
    summary = json.loads((run / "summary.json").read_text())
    best = torch.load(run / "ckpt-best.pth", weights_only=True)
    assert summary["best_epoch"] == best["epoch"] == 1
    assert torch.equal(best["base_model"]["w"], epoch1["base_model"]["w"])


# ------------------------------------------------------------------------------------ non-finite loss
class NaNAt(TrainHooks, nn.Module):
    """Finite loss until optimizer step ``blow_at``, where the weights jump to 1e9 (finite) and every
    later loss is NaN: the checkpoint saved after that step is broken although its weights are finite."""

    def __init__(self, blow_at):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, 0.5, 0.5]))
        self.blow_at, self.steps = blow_at, 0

    def forward(self, batch, epoch=0, generator=None):
        loss = ((batch["points"] * self.w).sum(-1) ** 2).mean()
        return {"loss": loss * float("nan") if float(self.w.detach().abs().max()) > 1e8 else loss}

    def after_step(self):
        if self.steps == self.blow_at:
            with torch.no_grad():
                self.w.fill_(1e9)
        self.steps += 1


def test_non_finite_loss_in_the_first_epoch_names_no_missing_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        train(tmp_path / "run", model=NaNAt(blow_at=0))
    msg = str(e.value)
    assert "epoch 0, iteration 1" in msg and "No checkpoint has been written yet" in msg
    assert "ckpt-last.pth" not in msg and not (tmp_path / "run" / "ckpt-last.pth").exists()


def test_non_finite_loss_names_the_checkpoint_that_is_really_good(tmp_path):
    run = tmp_path / "run"
    # 2 steps per epoch: the jump happens at the last step of epoch 1, so ckpt-last.pth (epoch 1) is broken
    with pytest.raises(NonFiniteLossError) as e:
        train(run, max_epoch=3, model=NaNAt(blow_at=3))
    msg = str(e.value)
    assert "epoch 2, iteration 0" in msg
    assert f"The last good checkpoint is {run / 'ckpt-prev.pth'} (epoch 0: finite weights and a finite loss" in msg
    assert torch.load(run / "ckpt-prev.pth", weights_only=True)["epoch"] == 0
    assert "lower optimizer.kwargs.lr" in msg


@pytest.mark.parametrize("bad", [float("nan"), 1e7])
def test_non_finite_loss_from_bad_data_blames_the_data(tmp_path, bad):
    items = data()
    items[1]["points"][3, 0] = bad
    t = Trainer(cfg_of("max_epoch=1", "total_bs=4"), Lin(), items, tmp_path / "run")
    if bad == 1e7:  # large enough for the float32 loss to overflow on the huge coordinate
        with torch.no_grad():
            t.model.w.fill_(1e30)
    with pytest.raises(NonFiniteLossError) as e:
        t.fit()
    msg = str(e.value)
    assert "The input batch is the cause" in msg and "lower optimizer.kwargs.lr" not in msg
    assert ("non-finite coordinate" in msg) if bad != 1e7 else ("coordinates up to 1e+07" in msg)


# ------------------------------------------------------------------------------------ config rules
@pytest.mark.parametrize("override,message", [
    ("max_epoch=0", "max_epoch = 0 (set in command line) is out of range; allowed: >= 1"),
    ("max_epoch=-1", "max_epoch = -1 (set in command line) is out of range; allowed: >= 1"),
    ("model.transformer_config.mask_ratio=1.0",
     "model.transformer_config.mask_ratio = 1.0 (set in command line) is out of range; allowed: in (0, 1)"),
    ("model.transformer_config.mask_ratio=0",
     "model.transformer_config.mask_ratio = 0 (set in command line) is out of range; allowed: in (0, 1)"),
    ("model.gm3d={teacher_model: {mask_ratio: 1.5}}",
     "model.gm3d.teacher_model.mask_ratio = 1.5 (set in command line) is out of range; allowed: in (0, 1)"),
    ("total_bs=0", "total_bs = 0 (set in command line) is out of range; allowed: >= 1"),
    ("step_per_update=0", "step_per_update = 0 (set in command line) is out of range; allowed: >= 1"),
    ("precision=fp64", "precision = 'fp64' (set in command line) is out of range; allowed: one of fp32, bf16, fp16"),
])
def test_out_of_range_values_fail_at_load_time(override, message):
    with pytest.raises(ConfigError) as e:
        cfg_of(override)
    assert str(e.value) == message


def test_rule_names_the_file_that_set_the_value(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(f"_base_: {QUICK}\nmax_epoch: 0\n")
    with pytest.raises(ConfigError, match=r"^max_epoch = 0 \(set in .*exp\.yaml\) is out of range; allowed: >= 1$"):
        load_config(f)


def test_null_is_allowed_only_where_the_rule_says_so():
    assert cfg_of("grad_norm_clip=null").grad_norm_clip is None
    with pytest.raises(ConfigError, match=r"^max_epoch = None .*allowed: >= 1$"):
        cfg_of("max_epoch=null")


def test_bad_rule_syntax_is_reported(tmp_path):
    from utils.config import parse_rule
    with pytest.raises(ConfigError, match="cannot read rule 'between 1 and 2'"):
        parse_rule("between 1 and 2", "x")
    check, null_ok = parse_rule("in [0, 1) | null")
    assert null_ok and check(0) and check(0.5) and not check(1) and not check("0.5")


@pytest.mark.parametrize("value,ok", [("svm_acc", True), (None, True), ("", True), ("test_acc", False),
                                      ("svm_accuracy", False)])
def test_pretrain_best_metric_must_be_one_pretraining_produces(value, ok):
    cfg = cfg_of(f"eval.best_metric={'null' if value is None else repr(value)}")
    if ok:
        pretrain.check_pretrain_best_metric(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"eval.best_metric = '{value}' is not a metric pre-training "
                                              r"produces; allowed: svm_acc or null"):
            pretrain.check_pretrain_best_metric(cfg)


@pytest.mark.parametrize("total_bs,message", [
    (5, r"total_bs = 5 is larger than the training set \(4 items\); allowed: 1 <= total_bs <= 4"),
])
def test_total_bs_larger_than_the_data_set_is_a_config_error(tmp_path, total_bs, message):
    with pytest.raises(ConfigError, match=r"command line: total_bs = 5 is larger"):
        Trainer(cfg_of(f"total_bs={total_bs}"), Lin(), data(4), tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg_of(f"total_bs={total_bs}"), Lin(), data(4), tmp_path / "run")


# ------------------------------------------------------------------------------------ run folders
@pytest.fixture
def prepare(tmp_path):
    """``runs.prepare_run`` in-process, with the logging handlers and the folder lock released afterwards."""
    made = []

    def call(run, *opts, resume=False, accept=False):
        made.append(run)
        return runs.prepare_run(str(QUICK), [*BASE, *opts], run_dir=str(run), resume=resume,
                                accept_config_change=accept)
    yield call
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for run in made:
        runs.release_run_folder(run)


def test_a_second_run_into_a_locked_folder_fails_at_once(tmp_path, prepare):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid 4242'); f.flush(); print('locked', flush=True); time.sleep(60)"), str(run / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"run folder {run} is in use by another run \(lock .*\.lock held "
                                              r"by pid 4242\)"):
            prepare(run)
    finally:
        holder.kill()
        holder.wait()
    prepare(run)  # free again once the holder is gone


def test_a_folder_whose_run_died_before_its_first_checkpoint_is_reused_with_a_warning(tmp_path, prepare):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("max_epoch: 1\n")
    (run / "pretrain.log").write_text("old\n")
    prepare(run)
    text = (run / "pretrain.log").read_text()
    assert "an earlier run there died before its first checkpoint (found config.yaml, pretrain.log" in text


def test_resume_with_a_changed_config_is_refused_then_accepted_and_recorded(tmp_path, prepare):
    run = tmp_path / "run"
    prepare(run, "seed=0", "max_epoch=3")
    (run / "ckpt-last.pth").write_bytes(b"placeholder: prepare_run only checks that it exists")
    runs.release_run_folder(run)
    with pytest.raises(ConfigError) as e:
        prepare(run, "seed=1", "max_epoch=5", "optimizer.kwargs.lr=0.002", resume=True)
    msg = str(e.value)
    assert msg.startswith(f"--resume with a config that differs from {run / 'config.yaml'}: ")
    assert "max_epoch: 3 -> 5; optimizer.kwargs.lr: 0.001 -> 0.002; seed: 0 -> 1." in msg
    assert "--accept-config-change" in msg
    assert load_config(run / "config.yaml", defaults=None).seed == 0  # untouched
    prepare(run, "seed=0", "max_epoch=3", resume=True)  # the same config resumes without a word
    cfg, _, _ = prepare(run, "seed=1", "max_epoch=3", resume=True, accept=True)
    assert load_config(run / "config.yaml", defaults=None).seed == 1
    rows = [json.loads(x) for x in (run / "config-changes.jsonl").read_text().splitlines()]
    assert rows[-1]["changes"] == {"seed": {"old": 0, "new": 1}}
