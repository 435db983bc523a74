"""main_pretrain.py --start_ckpts: a pre-training checkpoint initialises a new run, strictly."""

from __future__ import annotations

import pytest
import torch

from models.gm3d import PointMAEGM3D
from models.point_mae import PointMAE
from tests.conftest import run_cli
from tests.helpers import TINY_TC
from tools.engine.checkpoint import atomic_save
from tools.engine.builders import load_knowledge_teacher
from tools.tasks.pretrained import load_start_checkpoint
from utils.errors import CheckpointError


def mae(seed=0):
    torch.manual_seed(seed)
    return PointMAE(group_size=8, num_group=16, transformer_config=TINY_TC)


def fake_official(path, model):
    """The official pretrain.pth layout: {'base_model': {'module.' + key: ...}, 'optimizer': ..., 'epoch': ...}."""
    atomic_save({"base_model": {f"module.{k}": v.clone() for k, v in model.state_dict().items()},
                 "optimizer": {}, "epoch": 299}, path)
    return str(path)


def test_official_file_initialises_point_mae_exactly(tmp_path):
    src = mae(0)
    path = fake_official(tmp_path / "pretrain.pth", src)
    dst = mae(1)
    info = load_start_checkpoint(dst, path)
    assert info["new"] == [] and info["loaded"] == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_official_point_mae_file_initialises_the_gm3d_student_and_its_ema_teacher(tmp_path):
    src = mae(0)
    path = fake_official(tmp_path / "pretrain.pth", src)
    teacher_path = fake_official(tmp_path / "teacher.pth", mae(5))
    torch.manual_seed(1)
    gm = PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC,
                      gm3d={"variant": "C", "gc_decoder_depth": 1, "teacher_ckpt": teacher_path})
    load_knowledge_teacher(gm.knowledge_teacher, teacher_path)
    kt_before = {k: v.clone() for k, v in gm.knowledge_teacher.state_dict().items()}
    gc_before = {k: v.clone() for k, v in gm.state_dict().items() if k.startswith("MAE_decoder_loss_pred.")}
    info = load_start_checkpoint(gm, path)
    sd = gm.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(sd[k], v) and torch.equal(sd[f"ema.{k}"], v), k   # student and EMA copy
    assert {k.split(".")[0] for k in info["new"]} == {"mask_token_loss_pred", "MAE_decoder_loss_pred",
                                                      "increase_dim_2"}
    for k, v in gc_before.items():
        assert torch.equal(sd[k], v) and torch.equal(sd[f"ema.{k}"], v), k   # the GC branch stays new, EMA synced
    for k, v in kt_before.items():
        assert torch.equal(sd[f"knowledge_teacher.{k}"], v), k                # the configured teacher stays


def test_a_file_missing_a_key_is_refused_naming_it(tmp_path):
    sd = {k: v for k, v in mae().state_dict().items() if not k.startswith("MAE_encoder.norm.")}
    atomic_save({"base_model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"--start_ckpts .*missing keys: MAE_encoder\.norm\.bias"):
        load_start_checkpoint(mae(), tmp_path / "bad.pth")


@pytest.mark.slow
def test_cli_start_ckpts_trains_from_the_file_and_refuses_resume(tiny_config, tmp_path):
    cfg = tiny_config(max_epoch=1, eval={"svm_every": 1, "at_start": True})
    torch.manual_seed(0)
    src = PointMAE(group_size=8, num_group=16, transformer_config={
        "trans_dim": 48, "encoder_dims": 48, "depth": 1, "num_heads": 3, "decoder_depth": 1, "decoder_num_heads": 3})
    path = fake_official(tmp_path / "pretrain.pth", src)
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(tmp_path / "run"), "--start_ckpts", path])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--start_ckpts" in r.stdout and "tensors loaded" in r.stdout
    assert f"linear SVM, starting encoder (--start_ckpts {path}): " in r.stdout  # epoch -1 is not a random init
    assert "randomly initialised" not in r.stdout
    r = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(tmp_path / "run"), "--resume",
                 "--start_ckpts", path])
    assert r.returncode == 2 and "--start_ckpts initialises a new run" in r.stdout + r.stderr
