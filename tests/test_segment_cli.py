"""Part segmentation end to end: CLI on a ShapeNetPart fixture (official layout) and on the default data,
test-only with voting, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from models.point_mae import PointMAE
from tests.conftest import REPO, run_cli
from tests.helpers import TINY_TC
from tests.test_datasets_official import write_shapenetpart
from tools.engine.checkpoint import atomic_save

TINY_MODEL = {"NAME": "PointMAE_Seg", "trans_dim": 48, "encoder_dims": 48, "depth": 2, "num_heads": 3,
              "num_group": 16, "group_size": 8, "fetch_layers": [0, 1], "fp_mlp": [32, 32], "head_dims": [32, 16]}


def write_cfg(tmp_path: Path, base: str, **extra) -> Path:
    cfg = {"_base_": str(REPO / base), "model": TINY_MODEL, "npoints": 64, "total_bs": 4, "max_epoch": 2,
           "threads": 1, "scheduler": {"kwargs": {"epochs": 2, "initial_epochs": 1}},
           "log": {"progress_bar": False, "tensorboard": False}, "finetune": {"eval_bs": 8, "votes": 2}}
    cfg.update(extra)
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def seg(*args, timeout=300):
    return run_cli(["segmentation/main.py", *map(str, args)], timeout=timeout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_shapenetpart_fixture_finetune_then_test_with_voting(tmp_path):
    root = write_shapenetpart(tmp_path / "shapenetcore_partanno_segmentation_benchmark_v0_normal", n=80)
    torch.manual_seed(1)
    mae = PointMAE(group_size=8, num_group=16, transformer_config={**TINY_TC, "depth": 2})
    atomic_save({"base_model": {f"module.{k}": v for k, v in mae.state_dict().items()}, "epoch": 300},
                tmp_path / "pretrain.pth")
    data = {"train": {"_base_": "cfgs/dataset_configs/ShapeNetPart.yaml",
                      "others": {"subset": "trainval", "root": str(root), "npoints": 64}},
            "test": {"_base_": "cfgs/dataset_configs/ShapeNetPart.yaml",
                     "others": {"subset": "test", "root": str(root), "npoints": 64}}}
    cfg = write_cfg(tmp_path, "cfgs/segmentation/point_mae_gm3d_shapenetpart.yaml", dataset=data)
    run = tmp_path / "run"
    r = seg("--config", cfg, "--finetune", tmp_path / "pretrain.pth", "--run_dir", run, "--vote")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "left at init: bns1." in (run / "segment.log").read_text()
    rows = metrics(run)
    assert [x["epoch"] for x in rows] == [0, 1]
    assert all(0 <= x["test_miou_i"] <= 100 and 0 <= x["test_miou_c"] <= 100 for x in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["votes"] == 2 and set(summary["vote_last"]) == {"vote_miou_c", "vote_miou_i", "vote_acc"}
    assert "test, last epoch (1): class mIoU" in r.stdout
    assert "test, best epoch (" in r.stdout and "selected on the test split" in r.stdout
    assert "with voting (2 votes, seeded), last epoch (1)" in r.stdout
    # --test on ckpt-best scores exactly the best epoch (fixed, seeded test sampling)
    r = seg("--config", cfg, "--test", run / "ckpt-best.pth", "--run_dir", tmp_path / "t", "--vote")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    test = json.loads((tmp_path / "t" / "summary-test.json").read_text())
    best = next(x for x in rows if x["epoch"] == summary["best_epoch"])
    assert test["test_miou_i"] == pytest.approx(best["test_miou_i"], abs=1e-9)
    assert test["test_miou_c"] == pytest.approx(best["test_miou_c"], abs=1e-9)
    assert test["votes"] == 2 and "vote_miou_i" in test


def test_default_data_scratch_and_exact_resume(tmp_path):
    data = {"train": {"NAME": "SyntheticShapes", "subset": "train", "npoints": 64, "base_points": 128,
                      "num_classes": 3, "samples_per_class": 4},
            "test": {"NAME": "SyntheticShapes", "subset": "test", "npoints": 64, "base_points": 128,
                     "num_classes": 3, "test_per_class": 2}}
    cfg = write_cfg(tmp_path, "cfgs/segmentation/quickstart_seg.yaml", dataset=data, max_epoch=3,
                    augment=[{"NAME": "Scale", "lo": 0.8, "hi": 1.25}, "PermutePoints", {"NAME": "Translate", "range": 0.1}])
    full, part = tmp_path / "full", tmp_path / "part"
    r = seg("--config", cfg, "--scratch", "--run_dir", full)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = seg("--config", cfg, "--scratch", "--run_dir", part, "--stop_after_epoch", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = seg("--config", cfg, "--run_dir", part, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = metrics(full), metrics(part)
    assert [x["epoch"] for x in b] == [0, 1, 2]
    for x, y in zip(a, b):
        for k in x:
            if k.startswith(("train/", "test_")):
                assert x[k] == y[k], (k, x[k], y[k])
    sa = torch.load(full / "ckpt-last.pth", weights_only=True)["base_model"]
    sb = torch.load(part / "ckpt-last.pth", weights_only=True)["base_model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_bad_config_is_a_clear_error(tmp_path):
    cfg = write_cfg(tmp_path, "cfgs/segmentation/quickstart_seg.yaml")
    r = seg("--config", cfg, "--scratch", "--run_dir", tmp_path / "x", "eval.best_metric=test_acc1")
    assert r.returncode == 2 and "eval.best_metric is 'test_acc1'; segmentation produces test_miou_i" in r.stdout + r.stderr
    r = seg("--config", cfg, "--scratch", "--run_dir", tmp_path / "y", "model.num_parts=10")
    assert r.returncode == 2 and "model.num_parts is 10" in r.stdout + r.stderr


def test_point_m2ae_segmentation_finetunes_from_a_pretraining_file_on_the_default_data(tmp_path):
    """The Point-M2AE head through the same runner: a tiny official-layout Point-M2AE file in, mIoU out."""
    from models.point_m2ae import PointM2AE

    enc = {"group_sizes": [8, 4, 4], "num_groups": [32, 16, 8], "encoder_depths": [1, 1, 1],
           "encoder_dims": [16, 32, 64], "num_heads": 2}
    torch.manual_seed(0)
    pre = PointM2AE(**enc, decoder_depths=[1, 1], decoder_dims=[64, 32])
    atomic_save({"base_model": {f"module.{k}": v for k, v in pre.state_dict().items()}}, tmp_path / "m2ae.pth")
    data = {"train": {"NAME": "SyntheticShapes", "subset": "train", "npoints": 64, "base_points": 128,
                      "num_classes": 3, "samples_per_class": 4},
            "test": {"NAME": "SyntheticShapes", "subset": "test", "npoints": 64, "base_points": 128,
                     "num_classes": 3, "test_per_class": 2}}
    paper = yaml.safe_load((REPO / "cfgs/segmentation/point_m2ae_gm3d_shapenetpart.yaml").read_text())
    cfg = write_cfg(tmp_path, "cfgs/segmentation/quickstart_seg.yaml", dataset=data, max_epoch=1)
    own = yaml.safe_load(cfg.read_text())
    del own["_base_"]   # the Point-M2AE model and the paper config's protocol, on the default data
    own.update(model={**paper["model"], **enc, "num_parts": 52, "fp_mlp": [32, 32], "head_dims": [32, 16, 16]},
               eval=paper["eval"], augment=paper["augment"])
    cfg.write_text(yaml.safe_dump(own, sort_keys=False))
    run = tmp_path / "run"
    r = seg("--config", cfg, "--finetune", tmp_path / "m2ae.pth", "--run_dir", run)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"].endswith("m2ae.pth")
    assert not any(k.startswith("h_encoder.") for k in summary["left_at_init"])   # the whole encoder loaded
    assert "test_miou_c" in metrics(run)[-1] and "test_miou_i" in metrics(run)[-1]
