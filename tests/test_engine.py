"""End-to-end runs of the real CLI on tiny data, exact resume, DDP, and the engine's error paths."""

import json
import shutil

import pytest
import torch
from torch import nn

from tests.conftest import REPO, run_cli, tiny_pretrain_cfg
from tools.engine.trainer import NonFiniteLossError, Trainer
from utils.config import load_config

pytestmark = pytest.mark.slow


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_cli_end_to_end(tiny_config, tmp_path):
    cfg = tiny_config()
    run = tmp_path / "run"
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run)])
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("ckpt-last.pth", "ckpt-best.pth", "config.yaml", "metrics.jsonl", "pretrain.log", "summary.json"):
        assert (run / name).exists(), name
    rows = read_metrics(run)
    assert [r_["epoch"] for r_ in rows] == [-1, 0, 1]
    assert "init/svm_acc" in rows[0] and all("svm_acc" in r_ for r_ in rows[1:])
    assert rows[2]["train/loss"] < rows[1]["train/loss"]  # the reconstruction loss goes down
    assert "linear SVM, randomly initialised encoder" in r.stdout
    assert "linear SVM, last epoch (1)" in r.stdout and "best epoch" in r.stdout
    saved = load_config(run / "config.yaml", defaults=None)
    assert saved.model.num_group == 16 and saved.max_epoch == 2
    ckpt = torch.load(run / "ckpt-last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["model_name"] == "PointMAE"
    assert any(k.startswith("MAE_encoder.blocks.blocks.0.") for k in ckpt["base_model"])


@pytest.mark.parametrize("model_name,ema", [("Point_MAE", False), ("Point_MAE_GM3D", False), ("Point_MAE_GM3D", True)])
def test_resume_reproduces_uninterrupted_run(tiny_config, tmp_path, model_name, ema):
    extra = {"eval": {"svm_every": 0}, "max_epoch": 3}
    if ema:  # weight averaging with a ramp, warm-up and every 3rd step: its counter and ramp resume too
        extra["model_ema"] = {"enabled": True, "decay_start": 0.6, "decay_end": 0.9, "ramp_epochs": 2,
                              "warmup": True, "every": 3}
    if model_name == "Point_MAE_GM3D":
        extra["model"] = {**tiny_pretrain_cfg()["model"], "NAME": model_name,
                          "gm3d": {"gc_decoder_depth": 1}, "mask": {"alpha_max": 1.0}}
    cfg = tiny_config(**extra)
    full, part = tmp_path / "full", tmp_path / "part"
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(full)])
    assert r.returncode == 0, r.stderr
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(part), "--stop_after_epoch", "0"])
    assert r.returncode == 0, r.stderr
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(part), "--resume"])
    assert r.returncode == 0, r.stderr
    a, b = read_metrics(full), read_metrics(part)
    assert [x["epoch"] for x in b] == [0, 1, 2]
    for x, y in zip(a, b):
        for k in x:
            if k.startswith("train/"):
                assert x[k] == y[k], (k, x[k], y[k])
    ca, cb = (torch.load(p / "ckpt-last.pth", weights_only=True) for p in (full, part))
    for key in ("base_model", "model_ema") if ema else ("base_model",):
        sa, sb = ca[key], cb[key]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (key, k)
    if ema:
        assert ca["model_ema_updates"] == cb["model_ema_updates"] == 4  # 3 epochs x 4 steps, every 3rd
        assert not torch.equal(ca["model_ema"]["MAE_encoder.norm.weight"], ca["base_model"]["MAE_encoder.norm.weight"])


def test_refuses_to_overwrite_a_run_without_resume(tiny_config, tmp_path):
    cfg = tiny_config(eval={"svm_every": 0}, max_epoch=1)
    run = tmp_path / "run"
    assert run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run)]).returncode == 0
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run)])
    assert r.returncode == 2 and "pass --resume" in r.stdout + r.stderr


def test_resume_with_another_model_fails_clearly(tiny_config, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(eval={"svm_every": 0}, max_epoch=1)
    assert run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run)]).returncode == 0
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run), "--resume",
                 "--accept-config-change", "max_epoch=2", "model.transformer_config.depth=2"])
    assert r.returncode == 2
    assert "missing keys: MAE_encoder.blocks.blocks.1." in r.stdout + r.stderr


def test_torchrun_two_processes_on_cpu(tiny_config, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    cfg = tiny_config(max_epoch=1)
    run = tmp_path / "ddp"
    r = run_cli(["--standalone", "--nproc_per_node", "2", "main_pretrain.py", "--config", str(cfg),
                 "--run_dir", str(run), "device=cpu"], prefix=[torchrun], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_metrics(run)
    assert rows[-1]["epoch"] == 0 and "svm_acc" in rows[-1] and rows[-1]["train/loss"] > 0
    assert "world 2" in (run / "pretrain.log").read_text()


@pytest.mark.parametrize("override,message", [
    (["optimizer.kwargs.lrr=1"], "unknown key 'optimizer.kwargs.lrr'"),
    (["max_epoch=ten"], "max_epoch"),
    (["model.num_groups=3"], "unknown key 'num_groups'"),
    (["dataset.train.npoints=4", "dataset.train.base_points=4"], "fewer points than num_group|N < num_group|num_group"),
])
def test_bad_input_gives_a_clear_error(tiny_config, tmp_path, override, message):
    r = run_cli(["main_pretrain.py", "--config", str(tiny_config()), "--run_dir", str(tmp_path / "x"), *override])
    assert r.returncode == 2, r.stdout + r.stderr
    import re
    assert re.search(message, r.stdout + r.stderr), r.stdout + r.stderr


def test_missing_config_file(tmp_path):
    r = run_cli(["main_pretrain.py", "--config", str(tmp_path / "nope.yaml")])
    assert r.returncode == 2 and "nope.yaml" in r.stdout + r.stderr


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, batch, epoch=0, generator=None):
        return {"loss": self.w * float("nan")}


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    cfg = load_config(REPO / "cfgs/pretrain/quickstart.yaml", ["max_epoch=1", "total_bs=2", "log.progress_bar=false"])
    data = [{"points": torch.randn(8, 3), "label": torch.tensor(0)} for _ in range(4)]
    trainer = Trainer(cfg, _NaNModel(), data, tmp_path)
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at epoch 0, iteration 0"):
        trainer.fit()


def test_gm3d_cli_with_periodic_gc_panel(tiny_config, tmp_path):
    model = {**tiny_pretrain_cfg()["model"], "NAME": "Point_MAE_GM3D", "gm3d": {"gc_decoder_depth": 1}}
    cfg = tiny_config(model=model, max_epoch=1, vis={"gc_every": 1, "num_shapes": 1},
                      eval={"svm_every": 1, "at_start": False})
    run = tmp_path / "gm3d"
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (run / "vis" / "gc_epoch_000.png").stat().st_size > 0
    row = read_metrics(run)[-1]
    assert {"train/loss_point", "train/loss_gc", "train/n_sel", "train/gc_rank_corr", "svm_acc"} <= set(row)
    assert "train/loss_feat" not in row  # no teacher checkpoint: variant A, KD off


@pytest.mark.parametrize("native", [False, True])
def test_bf16_without_native_support_warns(tiny_config, tmp_path, monkeypatch, native):
    import logging

    from tools.engine import runs

    monkeypatch.setattr(runs, "native_bf16", lambda device: native)
    try:
        _, device, out = runs.prepare_run(str(tiny_config(precision="bf16", device="cpu")), [],
                                          run_dir=str(tmp_path / "run"))
        text = (out / "pretrain.log").read_text()
    finally:
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)
            h.close()
    assert device.type == "cpu"
    assert ("precision bf16 on cpu without native bf16 matmuls" in text) is (not native)
