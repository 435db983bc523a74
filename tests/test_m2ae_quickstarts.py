"""The Point-M2AE downstream quick starts (classification with voting, few-shot, part segmentation) load the
Point-M2AE and Point-M2AE + GM3D quick-start checkpoints at their real size, and run end to end on tiny data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_model
from tools.engine.checkpoint import atomic_save
from tools.tasks.pretrained import load_pretrained_encoder
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOWNSTREAM = ["cfgs/finetune/quickstart_m2ae_cls.yaml", "cfgs/finetune/quickstart_m2ae_fewshot.yaml",
              "cfgs/segmentation/quickstart_m2ae_seg.yaml"]


def _pretrain_ckpt(path: Path, config: str, **model_over) -> Path:
    """A checkpoint as the trainer writes it, of the model that ``config`` builds (real size)."""
    cfg = load_config(REPO / config).to_dict()
    m = {**cfg["model"], **model_over}
    torch.manual_seed(0)
    model = build_model(m)
    atomic_save({"base_model": model.state_dict(), "epoch": 11, "config": {**cfg, "model": m},
                 "model_name": type(model).__name__, "format": "geomask3d-1"}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2ae_qs")
    m2 = _pretrain_ckpt(root / "m2ae.pth", "cfgs/pretrain/quickstart_m2ae.yaml")
    # variant A: the knowledge teacher's file is not needed to write the run's student / EMA keys
    gm = _pretrain_ckpt(root / "gm3d.pth", "cfgs/pretrain/gm3d_m2ae_quickstart.yaml",
                        gm3d={**load_config(REPO / "cfgs/pretrain/gm3d_m2ae_quickstart.yaml")["model"]["gm3d"],
                              "variant": "A", "teacher_ckpt": None})
    return {"m2ae": m2, "gm3d": gm}


@pytest.mark.parametrize("config", DOWNSTREAM)
@pytest.mark.parametrize("which", ["m2ae", "gm3d"])
def test_quickstart_configs_load_the_quickstart_checkpoints(ckpts, config, which):
    model = build_model(load_config(REPO / config).to_dict()["model"])
    sd = torch.load(ckpts[which], map_location="cpu", weights_only=False)["base_model"]
    info = load_pretrained_encoder(model, ckpts[which])
    enc = {k: v for k, v in model.state_dict().items() if k.startswith("h_encoder.")}
    assert enc and info["n_encoder"] >= len([k for k in enc if "num_batches_tracked" not in k]) - 1
    for k, v in enc.items():                           # every encoder tensor is the checkpoint's
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    if which == "gm3d":
        for src in ("student", "ema"):
            load_pretrained_encoder(model, ckpts[which], source=src)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
DATA = ["npoints=128", "total_bs=4", "max_epoch=1", "threads=1", "scheduler.kwargs.epochs=1",
        "scheduler.kwargs.initial_epochs=0", "log.progress_bar=false", "log.tensorboard=false",
        "finetune.eval_bs=8"]


def _data(n_cls, npoints=256):
    out = []
    for split, key in (("train", "samples_per_class"), ("test", "test_per_class")):
        out += [f"dataset.{split}.num_classes={n_cls}", f"dataset.{split}.{key}=3",
                f"dataset.{split}.base_points=256", f"dataset.{split}.npoints={npoints}"]
    return out


def _run(script, *args):
    p = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_cls_quickstart_end_to_end_with_voting(ckpts, tmp_path):
    run = tmp_path / "cls"
    out = _run("main_finetune.py", "--config", DOWNSTREAM[0], "--finetune", ckpts["gm3d"], "--run_dir", run,
               "--vote", *DATA, *_data(3), "model.cls_dim=3", "finetune.votes=2")
    assert "test accuracy, last epoch (0):" in out and "voting (2 votes, seeded), last epoch (0)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"].endswith("gm3d.pth")
    assert all(k.startswith(("norm.", "cls_head_finetune.")) for k in summary["left_at_init"])


def test_fewshot_quickstart_end_to_end(ckpts, tmp_path):
    run = tmp_path / "fs"
    out = _run("main_finetune.py", "--config", DOWNSTREAM[1], "--fewshot", "--finetune", ckpts["m2ae"],
               "--run_dir", run, *DATA, *_data(3), "finetune.fewshot.ways=[2]", "finetune.fewshot.shots=[2]",
               "finetune.fewshot.folds=1", "finetune.fewshot.query=2")
    assert "2-way 2-shot over 1 folds: last epoch (0)" in out
    assert "| 2-way 2-shot | 1 |" in (run / "fewshot.md").read_text()


def test_seg_quickstart_end_to_end(ckpts, tmp_path):
    run = tmp_path / "seg"
    out = _run("segmentation/main.py", "--config", DOWNSTREAM[2], "--finetune", ckpts["m2ae"], "--run_dir", run,
               *DATA, *_data(2, npoints=128), "finetune.votes=1")
    assert "miou" in out.lower()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"].endswith("m2ae.pth")
