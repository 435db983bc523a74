"""Mistakes a new user makes, each reported in one line with exit code 2 before anything is written, and
run folders that a failed first try leaves reusable (docs/RELIABILITY.md, "Refusal rules").

The entry scripts run in-process (``main(argv)``), so each case costs the config load, not a Python start."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import main_finetune
import main_pretrain
from segmentation import main as seg_main
from tests.conftest import REPO, run_cli
from tests.test_datasets_official import write_shapenetpart
from tools import eval_svm
from tools.engine import runs
from tools.tasks import pretrain
from tools.engine.cli import data_overrides
from tools.tasks.svm import repeated_svm, select_C
from utils.config import load_config
from utils.errors import ConfigError, DataError

QUICK = str(REPO / "cfgs/pretrain/quickstart.yaml")
M2AE = str(REPO / "cfgs/pretrain/quickstart_m2ae.yaml")
FEWSHOT = str(REPO / "cfgs/finetune/quickstart_fewshot.yaml")
CLS = str(REPO / "cfgs/finetune/quickstart_cls.yaml")
SEG = str(REPO / "cfgs/segmentation/quickstart_seg.yaml")


@pytest.fixture(autouse=True)
def _release(tmp_path):
    """Drop the logging handlers and run-folder locks an in-process run leaves behind."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if not type(h).__name__.startswith("LogCaptureHandler"):
            root.removeHandler(h)
            h.close()
    for key in list(runs._HELD_LOCKS):
        runs._HELD_LOCKS.pop(key).close()


def one_line_error(main, argv, caplog) -> str:
    """Run ``main(argv)``: exit code 2 and exactly one logged error of one line; returns it."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(a) for a in argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


# ------------------------------------------------------------------------ checks before the run folder
def test_config_and_data_errors_come_before_the_already_holds_a_run_check(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt-last.pth").write_bytes(b"an earlier run")
    args = ["--config", QUICK, "--run_dir", run]
    msg = one_line_error(main_pretrain.main, [*args, "model.num_group=0"], caplog)
    assert msg == "ConfigError: model.num_group = 0 (set in command line) is out of range; allowed: >= 1"
    modelnet = "dataset.train={_replace_: true, _base_: cfgs/dataset_configs/ModelNet40.yaml, others: {subset: train}}"
    msg = one_line_error(main_pretrain.main, [*args, modelnet, f"data_root={tmp_path / 'nodata'}"], caplog)
    assert msg.startswith("DataError: dataset.train.DATA_PATH = 'data/ModelNet/modelnet40_normal_resampled' "
                          f"(with data_root: {tmp_path / 'nodata' / 'ModelNet/modelnet40_normal_resampled'}) "
                          "(set in cfgs/dataset_configs/ModelNet40.yaml) does not exist: ")
    assert "--data PATH" in msg
    assert one_line_error(main_pretrain.main, args, caplog).startswith(f"ConfigError: {run} already holds a run")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "ckpt-last.pth"]  # nothing else was written


def test_a_config_error_leaves_no_run_folder(tmp_path, caplog):
    run = tmp_path / "new"
    one_line_error(main_pretrain.main, ["--config", QUICK, "--run_dir", run, "model.group_size=0"], caplog)
    assert not run.exists()


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_checkpoint_does_not_block_the_next_try(tiny_config, tmp_path):
    cfg = tiny_config(eval={"svm_every": 0}, max_epoch=1)
    run = tmp_path / "run"
    first = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run), "total_bs=1000"])
    assert first.returncode == 2 and "total_bs" in first.stdout + first.stderr, first.stderr[-2000:]
    assert (run / "config.yaml").exists() and not (run / "ckpt-last.pth").exists()
    second = run_cli(["main_pretrain.py", "--config", str(cfg), "--run_dir", str(run)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "an earlier run there died before its first checkpoint" in (run / "pretrain.log").read_text()
    assert (run / "ckpt-last.pth").exists()


def test_a_fewshot_folder_without_a_finished_fold_takes_a_new_config(tmp_path):
    run = tmp_path / "fs"
    opts = ["log.progress_bar=false", "log.tensorboard=false"]

    def prepare(*extra):
        out = runs.prepare_run(FEWSHOT, [*opts, *extra], run_dir=str(run), resume=True, kind="fewshot")
        runs.release_run_folder(run)
        return out

    prepare("seed=0")
    (run / "episodes").mkdir()  # drawn with seed 0
    (run / "5way_10shot" / "fold0").mkdir(parents=True)  # a fold that died before its summary
    cfg, _, _ = prepare("seed=1")  # no finished fold: the new config is taken, not refused
    assert cfg.seed == 1 and load_config(run / "config.yaml", defaults=None).seed == 1
    assert not (run / "episodes").exists()
    assert "died before its first checkpoint (found config.yaml, fewshot.log, no finished fold)" in \
        (run / "fewshot.log").read_text()
    (run / "5way_10shot" / "fold0" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^--resume with a config that differs .*seed: 1 -> 2"):
        prepare("seed=2")


# ------------------------------------------------------------------------------- one-line errors
def test_device_cuda_without_a_gpu(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    msg = one_line_error(main_pretrain.main, ["--config", QUICK, "--run_dir", run, "device=cuda"], caplog)
    assert msg == ("ConfigError: device='cuda', but this machine has no CUDA device (torch.cuda.is_available() "
                   "is False): use device=cpu, or device=auto (cuda when there is one)")
    assert not run.exists()  # before the model is built and before the folder


@pytest.mark.parametrize("key", ["num_group", "group_size"])
def test_zero_patches_or_points_per_patch(tmp_path, caplog, key):
    msg = one_line_error(main_pretrain.main, ["--config", QUICK, "--run_dir", tmp_path / "r", f"model.{key}=0"],
                         caplog)
    assert msg == f"ConfigError: model.{key} = 0 (set in command line) is out of range; allowed: >= 1"


def test_mask_ratio_that_masks_no_patch_names_the_users_key_and_count(tmp_path, caplog):
    msg = one_line_error(main_pretrain.main, ["--config", QUICK, "--run_dir", tmp_path / "r",
                                              "model.transformer_config.mask_ratio=0.01"], caplog)
    assert msg == ("ConfigError: model.transformer_config.mask_ratio=0.01 masks 0 of the 32 patches "
                   "(model.num_group=32; point_mae count rule, int(ratio * G) masked): at least one patch must "
                   "be masked and one visible; set model.transformer_config.mask_ratio between 0.032 and 0.999")
    gm3d = str(REPO / "cfgs/pretrain/gm3d_quickstart.yaml")  # GM3D keeps int(G * (1 - ratio)) visible
    msg = one_line_error(main_pretrain.main, ["--config", gm3d, "--run_dir", tmp_path / "r",
                                              "model.transformer_config.mask_ratio=0.99"], caplog)
    assert msg.startswith("ConfigError: model.transformer_config.mask_ratio=0.99 masks 32 of the 32 patches "
                          "(model.num_group=32; gm3d count rule, G - int(G * (1 - ratio)) masked)")
    assert msg.endswith("set model.transformer_config.mask_ratio between 0.001 and 0.968")


def test_mask_count_rule_follows_the_masker():
    from models.masking import check_masked_count, num_masked

    for g in (2, 8, 32, 64):
        for k in range(1, 1000):
            r = k / 1000
            for rule in ("point_mae", "gm3d"):
                n = num_masked(g, r, rule)
                if 1 <= n <= g - 1:
                    assert check_masked_count(g, r, rule) == n
                else:
                    with pytest.raises(ConfigError, match=f"masks {n} of the {g} patches"):
                        check_masked_count(g, r, rule)


def test_point_m2ae_mask_ratio_errors_name_its_own_key(tmp_path, caplog):
    from models.point_m2ae import PointM2AE

    args = ["--config", M2AE, "--run_dir", tmp_path / "r"]
    assert one_line_error(main_pretrain.main, [*args, "model.mask_ratio=1.5"], caplog) == \
        "ConfigError: model.mask_ratio = 1.5 (set in command line) is out of range; allowed: in (0, 1)"
    msg = one_line_error(main_pretrain.main, [*args, "model.mask_ratio=0.001"], caplog)
    assert msg.startswith("ConfigError: model.mask_ratio=0.001 masks 0 of the 16 patches (model.num_groups[-1]=16;")
    with pytest.raises(ConfigError) as e:
        PointM2AE(mask_ratio=1.5)
    assert str(e.value) == "model.mask_ratio=1.5 is out of range; allowed: in (0, 1)"


def test_run_dir_that_is_a_file(tmp_path, caplog):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    msg = one_line_error(main_pretrain.main, ["--config", QUICK, "--run_dir", f], caplog)
    assert msg == (f"ConfigError: --run_dir {f} is an existing file, not a folder: give a folder path (it is "
                   f"created if missing)")
    assert f.read_text() == "mine"


def test_fewshot_config_without_fewshot_is_refused(tmp_path, caplog):
    msg = one_line_error(main_finetune.main, ["--config", FEWSHOT, "--scratch", "--run_dir", tmp_path / "r"], caplog)
    assert msg.startswith(f"ConfigError: {FEWSHOT} is a few-shot config (")
    assert "add --fewshot" in msg
    assert not (tmp_path / "r").exists()


def test_pretraining_config_given_to_finetune_names_the_entry_point(tmp_path, caplog):
    msg = one_line_error(main_finetune.main, ["--config", QUICK, "--scratch", "--run_dir", tmp_path / "r"], caplog)
    assert msg.startswith(f"ConfigError: {QUICK} is a pre-training config (model.NAME: Point_MAE), not a "
                          f"classification fine-tuning one: run it with `python main_pretrain.py --config {QUICK}`")
    assert "best_metric" not in msg
    msg = one_line_error(main_pretrain.main, ["--config", CLS, "--run_dir", tmp_path / "r"], caplog)
    assert "is a classification fine-tuning config" in msg and "main_finetune.py" in msg
    msg = one_line_error(seg_main.main, ["--config", CLS, "--scratch", "--run_dir", tmp_path / "r"], caplog)
    assert "not a part-segmentation one" in msg


def test_svm_cross_validation_with_two_shapes_per_class_says_the_minimum():
    x = np.random.default_rng(0).normal(size=(8, 4))
    y = np.repeat(np.arange(4), 2)
    with pytest.raises(ConfigError) as e:
        select_C(x, y, [0.01, 0.1])
    assert str(e.value) == ("eval.svm_C_grid: choosing C by 3-fold cross-validation needs at least 3 training "
                            "shapes per class, and the smallest class of the SVM train split has 2: give it more "
                            "shapes, or set eval.svm_C_grid=[] to use eval.svm_C")
    assert select_C(np.concatenate([x, x + 0.01]), np.concatenate([y, y]), [0.01, 0.1]) in (0.01, 0.1)


def test_warm_start_is_not_labelled_randomly_initialised(tmp_path, capsys):
    summary = {"init": {"init/svm_acc": 50.0}}
    pretrain._report(summary, tmp_path, start_ckpts="a/pretrain.pth")
    out = capsys.readouterr().out
    assert "linear SVM, starting encoder (--start_ckpts a/pretrain.pth): 50.00 %" in out
    assert "random" not in out
    pretrain._report({"init": {"init/svm_acc": 50.0}}, tmp_path)
    assert "linear SVM, randomly initialised encoder: 50.00 %" in capsys.readouterr().out


def test_segmentation_takes_data(tmp_path, caplog):
    root = write_shapenetpart(tmp_path / "part")
    args = seg_main.parse_args(["--config", SEG, "--scratch", "--data", str(root), "max_epoch=1"])
    assert args.data == str(root) and args.opts == ["max_epoch=1"]
    opts = data_overrides(str(root), "segment", SEG, ["model.num_parts=50"], echo=lambda *a, **k: None)
    cfg = load_config(SEG, opts)
    from tools.engine.builders import build_split

    train, test = build_split(cfg, "train"), build_split(cfg, "test")
    assert type(train).__name__ == "ShapeNetPart" and len(train) == 8 and len(test) == 4  # trainval / test
    assert train[0]["points"].shape == (cfg.npoints, 3)
    with pytest.raises(DataError, match=r"^--data '.*' is not a ShapeNetPart layout \(missing: "):
        data_overrides(str(tmp_path), "segment", SEG, [])


def test_eval_svm_repeats_print_their_own_seeds(tiny_config, capsys):
    cfg = tiny_config(eval={"svm_every": 0})
    assert eval_svm.main(["--config", str(cfg), "--repeats", "3", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.strip().startswith("repeat ")]
    assert [x.split(":")[0].strip() for x in lines] == ["repeat 0 (seed 5)", "repeat 1 (seed 6)",
                                                       "repeat 2 (seed 7)"]


def test_repeat_r_is_reproduced_by_its_printed_seed():
    g = torch.Generator().manual_seed(0)
    data = [{"points": torch.randn(16, 3, generator=g), "label": torch.tensor(i % 2)} for i in range(12)]

    def features(points):  # depends on the point order, as the encoder's FPS does
        return points[:, :4].flatten(1)

    many = repeated_svm(features, data[:8], data[8:], repeats=3, seed=5, C=1.0)
    assert [r["seed"] for r in many] == [5, 6, 7]
    for r in many:
        assert repeated_svm(features, data[:8], data[8:], repeats=1, seed=r["seed"], C=1.0)[0]["acc"] == r["acc"]
    assert json.dumps(many)  # plain numbers, for --json
