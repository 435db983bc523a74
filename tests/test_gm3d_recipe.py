"""The GM3D fine-tuning recipe configs (what they set, and each one run end to end at tiny size) and
finetune.vote_repeats (repeat r seeded by seed + r; repeat 0 = the single vote; mean / std / max)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.point_mae import PointMAE
from tests.helpers import TINY_TC, child_env
from tests.test_finetune import ListData, fake_official_pretrain, tiny_classifier
from tests.test_own_data import write_modelnet_folder
from tools.tasks.finetune import accuracy_metrics, repeat_stats, vote_logits, vote_repeats
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAPER = {"gm3d_recipe_scan_objbg.yaml": "scan_objbg.yaml", "gm3d_recipe_scan_objonly.yaml": "scan_objonly.yaml",
         "gm3d_recipe_scan_hardest.yaml": "scan_hardest.yaml", "gm3d_recipe_modelnet40.yaml": "modelnet40.yaml"}
QUICK = {"quickstart_cls_gm3d_recipe.yaml": "quickstart_cls.yaml",
         "quickstart_m2ae_cls_gm3d_recipe.yaml": "quickstart_m2ae_cls.yaml"}


def cfg_of(name: str) -> dict:
    return load_config(REPO / "cfgs/finetune" / name).to_dict()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_configs_set_the_published_recipe_over_the_point_mae_rows(name):
    cfg, ref = cfg_of(name), cfg_of(PAPER[name])
    assert cfg["model"]["NAME"] == "PointTransformer"
    assert cfg["model"]["label_smoothing"] == 0.1 and cfg["model"]["drop_path_rate"] == 0.1
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["layer_decay"] == 0.75
    assert cfg["total_bs"] == 40 and cfg["max_epoch"] == 500
    assert cfg["optimizer"]["kwargs"]["lr"] == pytest.approx(5e-4 * cfg["total_bs"] / 256, rel=1e-12)
    assert cfg["scheduler"] == {"type": "CosLR", "kwargs": {"epochs": 500, "initial_epochs": 5, "min_lr": 1e-6,
                                                            "warmup_lr_init": 0.0, "curve": "mae"}}
    assert cfg["dataset"] == ref["dataset"] and cfg["augment"] == ["ScaleAndTranslate"]
    scan = "scan" in name
    assert (cfg["npoints"], cfg["model"]["num_group"], cfg["model"]["cls_dim"]) == ((2048, 128, 15) if scan else
                                                                                    (1024, 64, 40))
    assert cfg["finetune"]["vote"] is (not scan)
    assert cfg["finetune"]["vote_repeats"] == (1 if scan else 299)
    # the Point-MAE recipe of the same row stays as it was
    assert ref["optimizer"]["layer_decay"] == 1.0 and ref["max_epoch"] == 300 and ref["model"]["label_smoothing"] == 0.0


@pytest.mark.parametrize("name", sorted(QUICK))
def test_quickstart_recipes_differ_from_their_quick_start_only_in_the_recipe_switches(name):
    cfg, ref = cfg_of(name), cfg_of(QUICK[name])
    smooth = "smooth" if "m2ae" in name else "label_smoothing"
    assert cfg["model"].pop(smooth) == 0.1 and ref["model"].pop(smooth) != 0.1
    assert cfg["optimizer"].pop("layer_decay") == 0.75 and ref["optimizer"].pop("layer_decay") == 1.0
    assert cfg["scheduler"]["kwargs"].pop("warmup_lr_init") == 0.0 and cfg["scheduler"]["kwargs"]["curve"] == "mae"
    ref["scheduler"]["kwargs"].pop("warmup_lr_init")
    assert cfg == ref


# ------------------------------------------------------------------------------------------ vote repeats
def test_vote_repeats_are_votes_seeded_seed_plus_r():
    model = tiny_classifier(cls_dim=4)
    data = ListData(n=24, points=160)
    cfg = {"seed": 3, "npoints": 128, "augment": ["ScaleAndTranslate"],
           "finetune": {"votes": 2, "vote_repeats": 3, "point_all": 140, "eval_bs": 8}}
    reps = vote_repeats(model, data, cfg, torch.device("cpu"))
    assert len(reps) == 3
    from tools.engine.builders import build_transform
    logits = []
    for r in range(3):
        lg, y = vote_logits(model, data, 128, votes=2, seed=3 + r, point_all=140, augment=build_transform(cfg),
                            batch_size=5)
        assert reps[r] == pytest.approx(accuracy_metrics(lg, y, "vote"), abs=1e-9)
        logits.append(lg)
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
    single = vote_repeats(model, data, {**cfg, "finetune": {**cfg["finetune"], "vote_repeats": 1}}, torch.device("cpu"))
    assert single == reps[:1]                              # N = 1 is repeat 0


def test_repeat_stats_mean_sample_std_and_max():
    s = repeat_stats([90.0, 92.5, 91.0], "vote_acc")
    assert s["vote_acc_repeats"] == [90.0, 92.5, 91.0] and s["vote_acc_max"] == 92.5
    assert s["vote_acc_mean"] == pytest.approx(91.1666666667)
    assert s["vote_acc_std"] == pytest.approx(float(np.std([90.0, 92.5, 91.0], ddof=1)))
    assert repeat_stats([88.0], "vote_last")["vote_last_std"] == 0.0


# ------------------------------------------------------------------------------------------ end to end
LOG = ["threads=1", "log.progress_bar=false", "log.tensorboard=false"]


def cli(*args, timeout=300):
    env = child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "main_finetune.py", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_modelnet_folder(tmp_path_factory.mktemp("recipe") / "data")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_runs_end_to_end_at_tiny_size(name, folder, tmp_path):
    tiny = ["model.trans_dim=32", "model.encoder_dims=32", "model.depth=2", "model.num_heads=2", "model.num_group=8",
            "model.group_size=8", "npoints=64", "total_bs=11", "max_epoch=1", "scheduler.kwargs.epochs=1",
            "scheduler.kwargs.initial_epochs=0", "finetune.eval_bs=16", "finetune.votes=1", "finetune.vote_repeats=2"]
    out = cli("--config", f"cfgs/finetune/{name}", "--scratch", "--data", folder, "--data-points", "128",
              "--run_dir", tmp_path / "run", *tiny, *LOG)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_epoch"] == 0 and "test_acc" in summary["last"]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "layer_decay: 0.75" in saved and "label_smoothing: 0.1" in saved
    if "modelnet" in name:                                # votes after training, 2 repeats
        assert len(summary["vote_last_repeats"]) == 2 and summary["vote_repeats"] == 2
        assert "mean ± std of 2 repeats; max of 2" in out


@pytest.mark.slow
def test_point_mae_quickstart_recipe_with_vote_repeats_and_test(tmp_path):
    mae = PointMAE(group_size=8, num_group=16, transformer_config={**TINY_TC, "depth": 2})
    fake_official_pretrain(tmp_path / "pretrain.pth", mae)
    tiny = ["model.trans_dim=48", "model.encoder_dims=48", "model.depth=2", "model.num_group=16", "model.group_size=8",
            "model.cls_dim=3", "npoints=128", "total_bs=4", "max_epoch=2", "scheduler.kwargs.epochs=2",
            "finetune.eval_bs=8", "finetune.votes=2", *LOG]
    data = []
    for split, key, n in (("train", "samples_per_class", 4), ("test", "test_per_class", 8)):
        data += [f"dataset.{split}.num_classes=3", f"dataset.{split}.{key}={n}", f"dataset.{split}.base_points=256",
                 f"dataset.{split}.npoints=256"]
    cfg = "cfgs/finetune/quickstart_cls_gm3d_recipe.yaml"
    out = cli("--config", cfg, "--finetune", tmp_path / "pretrain.pth", "--run_dir", tmp_path / "ft", "--vote",
              *tiny, *data, "finetune.vote_repeats=3")
    assert "2 votes, seeded, 3 repeats (seed + r)), last epoch (1):" in out and "max of 3, the official statistic" in out
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    reps = s["vote_last_repeats"]
    assert s["vote_repeats"] == 3 and len(reps) == 3 and s["vote_last"] == reps[0]
    assert s["vote_last_mean"] == pytest.approx(np.mean(reps)) and s["vote_last_max"] == max(reps)
    assert s["vote_last_std"] == pytest.approx(float(np.std(reps, ddof=1)))
    assert len(s["vote_best_repeats"]) == 3 and s["vote_best"] == s["vote_best_repeats"][0]
    test = []
    for n in (1, 3):
        cli("--config", cfg, "--test", tmp_path / "ft" / "ckpt-last.pth", "--vote", "--run_dir", tmp_path / f"t{n}",
            *tiny, *data, f"finetune.vote_repeats={n}")
        test.append(json.loads((tmp_path / f"t{n}" / "summary-test.json").read_text()))
    one, three = test
    assert one["vote_acc_repeats"] == [one["vote_acc"]] and one["vote_repeats"] == 1
    assert three["vote_acc"] == one["vote_acc"]               # repeat 0 of N = the single vote
    assert three["vote_acc_repeats"] == pytest.approx(reps)   # the same model (last epoch), the same seeds
    assert three["vote_acc_max"] == max(three["vote_acc_repeats"])


@pytest.mark.slow
def test_point_m2ae_quickstart_recipe_runs_from_a_quickstart_checkpoint(tmp_path):
    from tests.test_m2ae_quickstarts import DATA, _data, _pretrain_ckpt

    ckpt = _pretrain_ckpt(tmp_path / "m2ae.pth", "cfgs/pretrain/quickstart_m2ae.yaml")
    cli("--config", "cfgs/finetune/quickstart_m2ae_cls_gm3d_recipe.yaml", "--finetune", ckpt, "--run_dir",
        tmp_path / "run", *DATA, *_data(3), "model.cls_dim=3")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["init"].endswith("m2ae.pth") and "test_acc" in s["last"]
    ckpt_opt = torch.load(tmp_path / "run" / "ckpt-last.pth", map_location="cpu", weights_only=False)["optimizer"]
    scales = sorted({g["lr_scale"] for g in ckpt_opt["param_groups"]})
    assert scales == pytest.approx([0.75 ** k for k in range(6, -1, -1)])   # 6 blocks over 3 stages: 7 layers
