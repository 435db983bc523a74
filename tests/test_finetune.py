"""Fine-tuning: official key names, checkpoint mapping, sampling, voting, SVM tool, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.classifier import PointTransformer
from models.adapters import PointMAEAdapter
from tools.tasks.pretrained import load_finetuned, load_pretrained_encoder
from models.point_mae import PointMAE
from tests.helpers import TINY_TC, child_env, official_point_mae_keys
from tools.engine.checkpoint import CheckpointError, atomic_save
from tools.tasks.finetune import (AccuracyEvaluator, TrainSampling, accuracy_metrics, default_point_all, fps_to,
                            predict_logits, vote_logits)

REPO = Path(__file__).resolve().parents[1]
HEAD = {f"cls_head_finetune.{i}.{n}" for i in (0, 4, 8) for n in ("weight", "bias")} | {
    f"cls_head_finetune.{i}.{n}" for i in (1, 5)
    for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def tiny_classifier(cls_dim=4, **kw):
    torch.manual_seed(0)
    args = dict(trans_dim=48, depth=2, num_heads=3, encoder_dims=48, group_size=8, num_group=16, cls_dim=cls_dim)
    args.update(kw)
    return PointTransformer(**args)


def tiny_mae(**tc):
    torch.manual_seed(1)
    return PointMAE(group_size=8, num_group=16, transformer_config={**TINY_TC, **tc})


class ListData(torch.utils.data.Dataset):
    def __init__(self, n=10, points=160, classes=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.pts = torch.randn(n, points, 3, generator=g)
        self.labels = torch.arange(n) % classes
        self.num_classes = classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"points": self.pts[i], "label": self.labels[i]}


# ------------------------------------------------------------------------------------------ keys
def test_official_finetune_key_names():
    model = PointTransformer(cls_dim=40)          # the official 12 x 384 model
    encoder = {k[len("MAE_encoder."):] for k in official_point_mae_keys() if k.startswith("MAE_encoder.")}
    assert set(model.state_dict()) == {"cls_token", "cls_pos"} | encoder | HEAD
    sd = model.state_dict()
    assert sd["cls_token"].shape == (1, 1, 384) and sd["cls_pos"].shape == (1, 1, 384)
    assert sd["cls_head_finetune.0.weight"].shape == (256, 768)
    assert sd["cls_head_finetune.4.weight"].shape == (256, 256)
    assert sd["cls_head_finetune.8.weight"].shape == (40, 256)
    assert "blocks.blocks.11.attn.qkv.weight" in sd and "blocks.blocks.11.attn.qkv.bias" not in sd
    head = model.cls_head_finetune
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d",
                                                "ReLU", "Dropout", "Linear"]
    assert head[3].p == 0.5 and head[7].p == 0.5


def test_forward_contract_feature_and_label_smoothing():
    model = tiny_classifier()
    pts = torch.randn(3, 128, 3)
    out = model({"points": pts, "label": torch.tensor([0, 1, 3])}, epoch=0, generator=None)
    assert set(out) == {"loss", "acc"} and out["loss"].requires_grad and not out["acc"].requires_grad
    model.eval()
    feats = model.features(pts)
    tokens = model.tokens(pts)
    torch.testing.assert_close(feats, torch.cat([tokens[:, 0], tokens[:, 1:].max(1).values], -1))
    assert model.logits(pts).shape == (3, 4)
    torch.testing.assert_close(model(pts), model.logits(pts))
    smooth = tiny_classifier(label_smoothing=0.3).eval()
    smooth.load_state_dict(model.state_dict())
    logits = model.logits(pts)
    y = torch.tensor([0, 1, 3])
    ref = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.3)
    torch.testing.assert_close(smooth.loss_acc(logits, y)[0], ref)


# ------------------------------------------------------------------------------------------ mapping
def fake_official_pretrain(path: Path, mae: PointMAE) -> dict:
    """The official pretrain.pth layout: base_model with module.MAE_encoder.* (and the decoder) keys."""
    sd = {f"module.{k}": v.clone() for k, v in mae.state_dict().items()}
    assert any(k.startswith("module.MAE_encoder.") for k in sd)
    atomic_save({"base_model": sd, "optimizer": {}, "epoch": 300, "metrics": {"acc": 0.0}}, path)
    return sd


def test_official_pretrain_checkpoint_loads_with_exactly_the_head_missing(tmp_path):
    mae = tiny_mae()
    sd = fake_official_pretrain(tmp_path / "pretrain.pth", mae)
    model = tiny_classifier()
    info = load_pretrained_encoder(model, tmp_path / "pretrain.pth")
    assert set(info["missing"]) == {"cls_token", "cls_pos"} | HEAD == PointMAEAdapter().finetune_new_keys(model)
    mine = model.state_dict()
    for k, v in sd.items():
        if k.startswith("module.MAE_encoder."):
            torch.testing.assert_close(mine[k[len("module.MAE_encoder."):]], v)
    assert info["n_encoder"] == sum(1 for k in sd if k.startswith("module.MAE_encoder."))


@pytest.mark.parametrize("layout", ["no_module", "base_model_prefix", "model_key", "gm3d_project", "ema"])
def test_other_pretrain_layouts_map_to_the_same_keys(tmp_path, layout):
    mae = tiny_mae()
    sd = dict(mae.state_dict())
    if layout == "no_module":
        ckpt = {"base_model": sd}
    elif layout == "base_model_prefix":
        ckpt = {"base_model": {f"base_model.{k}": v for k, v in sd.items()}}
    elif layout == "model_key":
        ckpt = {"model": {f"module.{k}": v for k, v in sd.items()}}
    else:
        from models.gm3d import PointMAEGM3D

        torch.manual_seed(2)
        gm = PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC, gm3d={"gc_decoder_depth": 1})
        sd = dict(gm.state_dict())
        assert any(k.startswith("ema.") for k in sd) and any(k.startswith("MAE_decoder_loss_pred.") for k in sd)
        ckpt = {"base_model": sd, "model_name": "PointMAEGM3D", "epoch": 3}
    model = tiny_classifier()
    mapped, info = PointMAEAdapter().finetune_state(model, ckpt, source="ema" if layout == "ema" else "student")
    assert set(model.state_dict()) - set(mapped) == PointMAEAdapter().finetune_new_keys(model)
    prefix = "ema.MAE_encoder." if layout == "ema" else "MAE_encoder."
    key = "blocks.blocks.1.mlp.fc1.weight"
    torch.testing.assert_close(mapped[key], sd.get(prefix + key, sd.get("base_model." + prefix + key)))


def _expect_failure(tmp_path, ckpt, *needles):
    atomic_save(ckpt, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as err:
        load_pretrained_encoder(tiny_classifier(), tmp_path / "other.pth")
    for n in needles:
        assert n in str(err.value), str(err.value)
    return str(err.value)


def test_point_m2ae_like_checkpoint_fails_naming_its_keys(tmp_path):
    m2ae = {"module.h_encoder.token_embed.0.first_conv.0.weight": torch.zeros(128, 3, 1),
            "module.h_encoder.encoder_blocks.0.blocks.0.attn.qkv.weight": torch.zeros(288, 96),
            "module.h_decoder.decoder_blocks.0.blocks.0.norm1.weight": torch.zeros(192)}
    _expect_failure(tmp_path, {"base_model": m2ae}, "h_encoder.token_embed.0.first_conv.0.weight", "Point-M2AE")


def test_wrong_width_or_depth_fails_naming_the_keys(tmp_path):
    wide = tiny_mae(trans_dim=96, encoder_dims=96)
    msg = _expect_failure(tmp_path, {"base_model": {f"module.{k}": v for k, v in wide.state_dict().items()}},
                          "wrong shape", "encoder.second_conv.3.weight: checkpoint (96, 512, 1) vs model (48, 512, 1)")
    assert "pos_embed.2.weight: checkpoint (96, 128) vs model (48, 128)" in msg
    deep = tiny_mae(depth=3)
    _expect_failure(tmp_path, {"base_model": deep.state_dict()}, "unexpected keys", "blocks.blocks.2.")
    shallow = {k: v for k, v in tiny_mae().state_dict().items() if not k.startswith("MAE_encoder.blocks.blocks.1.")}
    _expect_failure(tmp_path, {"base_model": shallow}, "missing keys", "blocks.blocks.1.attn.proj.weight")
    odd = dict(tiny_mae().state_dict(), **{"some_new_module.weight": torch.zeros(2)})
    _expect_failure(tmp_path, {"base_model": odd}, "unknown kind", "some_new_module.weight")
    _expect_failure(tmp_path, {"base_model": {"fc.weight": torch.zeros(2, 2)}}, "no Point-MAE encoder", "fc.weight")


def test_finetuned_checkpoint_loads_strictly_for_test(tmp_path):
    src = tiny_classifier()
    official = {"base_model": {f"module.{k}": v for k, v in src.state_dict().items()},
                "metrics": {"acc": torch.tensor(93.2)}, "epoch": 250}
    atomic_save(official, tmp_path / "modelnet_1k.pth")
    dst = tiny_classifier()
    torch.nn.init.zeros_(dst.cls_head_finetune[8].weight)
    meta = load_finetuned(dst, tmp_path / "modelnet_1k.pth")
    assert meta["epoch"] == 250
    torch.testing.assert_close(dst.cls_head_finetune[8].weight, src.cls_head_finetune[8].weight)
    broken = dict(official["base_model"])
    del broken["module.cls_head_finetune.8.bias"]
    atomic_save({"base_model": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="cls_head_finetune.8.bias"):
        load_finetuned(tiny_classifier(), tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="cls_head_finetune.8.weight: checkpoint"):
        load_finetuned(tiny_classifier(cls_dim=7), tmp_path / "modelnet_1k.pth")
    fake_official_pretrain(tmp_path / "pretrain.pth", tiny_mae())
    with pytest.raises(CheckpointError, match="pre-training checkpoint"):
        load_finetuned(tiny_classifier(), tmp_path / "pretrain.pth")
    # a fine-tuned classifier can also initialise a new fine-tuning (its head is dropped)
    info = load_pretrained_encoder(tiny_classifier(cls_dim=7), tmp_path / "modelnet_1k.pth")
    assert set(info["missing"]) == HEAD


# ------------------------------------------------------------------------------------------ sampling
def test_point_all_follows_the_official_table():
    assert [default_point_all(n) for n in (1024, 2048, 4096)] == [1200, 2400, 4800]
    assert default_point_all(8192) >= 8192 and default_point_all(512, 700) == 700


def test_train_sampling_takes_a_shared_subset_of_the_fps_pool():
    from extensions import fps, gather

    pts = torch.randn(3, 400, 3)
    t = TrainSampling(128, point_all=200)
    out = t(pts, torch.Generator().manual_seed(0))
    assert out.shape == (3, 128, 3)
    pool = gather(pts, fps(pts, 200))
    for b in range(3):   # every sampled point is in the FPS pool
        assert (out[b][:, None, :] == pool[b][None]).all(-1).any(1).all()
    again = t(pts, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    assert not torch.equal(out, t(pts, torch.Generator().manual_seed(1)))
    small = torch.randn(2, 150, 3)      # pool capped at the cloud size: a random permutation subset
    assert t(small, torch.Generator().manual_seed(0)).shape == (2, 128, 3)
    torch.testing.assert_close(fps_to(small, 150), small)


# ------------------------------------------------------------------------------------------ evaluation
def test_voting_is_deterministic_under_a_seed_and_independent_of_batch_size():
    from datasets.transforms import build_transforms

    model = tiny_classifier()
    data = ListData()
    aug = build_transforms(["ScaleAndTranslate"])
    kw = dict(votes=3, point_all=140, augment=aug)
    a, y = vote_logits(model, data, 128, seed=5, batch_size=4, **kw)
    b, _ = vote_logits(model, data, 128, seed=5, batch_size=3, **kw)
    c, _ = vote_logits(model, data, 128, seed=6, batch_size=4, **kw)
    assert a.shape == (10, 4) and torch.equal(y, data.labels)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c)
    assert model.training  # evaluation restores the mode
    # one vote without augmentation over the whole cloud = plain logits of a permutation of it
    one, _ = vote_logits(model, data, 160, votes=1, seed=0, point_all=160, batch_size=4)
    plain, _ = predict_logits(model, data, 160, batch_size=4)
    assert one.shape == plain.shape


def test_accuracy_metrics_and_evaluator():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 0.0]])
    m = accuracy_metrics(logits, torch.tensor([0, 1, 1, 1]))
    assert m["test_acc"] == 50.0 and abs(m["test_macc"] - 100 * (1 + 1 / 3) / 2) < 1e-4
    ev = AccuracyEvaluator(ListData(), 128, name="val", batch_size=4)
    model = tiny_classifier()
    out = ev(model, 0)
    assert set(out) == {"val_acc", "val_macc"} and 0 <= out["val_acc"] <= 100
    ref = accuracy_metrics(*predict_logits(model, ListData(), 128, batch_size=3), "val")
    assert ev(model, 1) == out and abs(ref["val_acc"] - out["val_acc"]) < 1e-9


# ------------------------------------------------------------------------------------------ linear SVM
def test_svm_tool_takes_an_official_checkpoint_and_any_dataset_section(tmp_path, capsys):
    from tools.eval_svm import main
    from tools.tasks.svm import EncoderFeatures

    mae = tiny_mae(depth=1)
    fake_official_pretrain(tmp_path / "pretrain.pth", mae)
    data = "{NAME: SyntheticShapes, num_classes: 3, samples_per_class: 6, test_per_class: 3, base_points: 256, npoints: 256}"
    args = ["--config", str(REPO / "cfgs/finetune/quickstart_cls.yaml"), "--ckpt", str(tmp_path / "pretrain.pth"),
            "model.trans_dim=48", "model.encoder_dims=48", "model.depth=1", "model.num_group=16",
            "model.group_size=8", "npoints=128", "eval.svm_bs=8",
            f"dataset.train={data}", f"dataset.test={data}"]
    assert main(args) == 0
    assert "linear SVM accuracy:" in capsys.readouterr().out
    feats = EncoderFeatures.from_model_cfg({"transformer_config": {**TINY_TC, "depth": 1}, "group_size": 8,
                                            "num_group": 16}, 128)
    feats.load_checkpoint(str(tmp_path / "pretrain.pth"))
    mae.eval()
    pts = torch.randn(2, 128, 3)
    torch.testing.assert_close(feats.eval().extract_features(pts), mae.extract_features(pts))
    assert main(args[:4] + ["model.trans_dim=96", "model.encoder_dims=96"] + args[6:]) == 2  # wrong width


def test_svm_features_do_not_depend_on_the_global_rng():
    """The SVM train split draws its point subsets from (seed, epoch, index): the in-run evaluator and
    the standalone tool see the same features whatever the global RNG did before."""
    from datasets.synthetic import SyntheticShapes
    from tools.tasks.svm import SVMEvaluator, extract_features

    kw = dict(num_classes=3, samples_per_class=6, test_per_class=3, base_points=256, npoints=128)
    train, test = SyntheticShapes("train", **kw), SyntheticShapes("test", **kw)
    mae = tiny_mae(depth=1).eval()
    torch.manual_seed(0)
    f0, y0 = extract_features(mae.extract_features, train, 8, torch.device("cpu"))
    torch.manual_seed(1)
    f1, y1 = extract_features(mae.extract_features, train, 8, torch.device("cpu"))
    np.testing.assert_array_equal(f0, f1)
    np.testing.assert_array_equal(y0, y1)
    ev = SVMEvaluator(train, test, C=1.0, batch_size=8)
    torch.manual_seed(2)
    a = ev(mae, 0)
    torch.manual_seed(3)
    assert ev(mae, 1) == a


# ------------------------------------------------------------------------------------------ CLI
TINY = ["model.trans_dim=48", "model.encoder_dims=48", "model.depth=1", "model.num_group=16", "model.group_size=8",
        "model.cls_dim=3", "npoints=128", "total_bs=4", "max_epoch=2", "threads=1",
        "scheduler.kwargs.epochs=2", "scheduler.kwargs.initial_epochs=1", "log.progress_bar=false",
        "log.tensorboard=false", "finetune.eval_bs=8"]
TINY_DATA = ["dataset.train.num_classes=3", "dataset.train.samples_per_class=4", "dataset.train.base_points=256",
             "dataset.train.npoints=256", "dataset.test.num_classes=3", "dataset.test.test_per_class=3",
             "dataset.test.base_points=256", "dataset.test.npoints=256"]


def cli(*args, timeout=300):
    env = child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "main_finetune.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.mark.slow
def test_cli_finetune_then_test_only_with_voting(tmp_path):
    mae = PointMAE(group_size=8, num_group=16, transformer_config={**TINY_TC, "depth": 1})
    fake_official_pretrain(tmp_path / "pretrain.pth", mae)
    run = tmp_path / "ft"
    p = cli("--config", "cfgs/finetune/quickstart_cls.yaml", "--finetune", tmp_path / "pretrain.pth",
            "--run_dir", run, "--vote", *TINY, *TINY_DATA, "finetune.votes=2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test accuracy, last epoch (1):" in p.stdout
    assert "best epoch (" in p.stdout and "selected on the test split" in p.stdout
    assert "voting (2 votes, seeded), last epoch (1)" in p.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"].endswith("pretrain.pth") and set(summary["left_at_init"]) == {"cls_token", "cls_pos"} | HEAD
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and all("test_acc" in r and "train/acc" in r for r in lines)

    t = cli("--config", "cfgs/finetune/quickstart_cls.yaml", "--test", run / "ckpt-last.pth", "--vote",
            "--run_dir", tmp_path / "test", *TINY, *TINY_DATA, "finetune.votes=2")
    assert t.returncode == 0, t.stdout + t.stderr
    assert "test accuracy (FPS, no voting):" in t.stdout and "voting (2 votes" in t.stdout
    tested = json.loads((tmp_path / "test" / "summary-test.json").read_text())
    assert abs(tested["test_acc"] - summary["last"]["test_acc"]) < 1e-6   # same model, same deterministic test

    val = "{NAME: SyntheticShapes, subset: test, num_classes: 3, test_per_class: 2, base_points: 256, npoints: 256, seed: 1}"
    s = cli("--config", "cfgs/finetune/quickstart_cls.yaml", "--scratch", "--run_dir", tmp_path / "scratch",
            *TINY, *TINY_DATA, "max_epoch=1", f"dataset.val={val}", "eval.best_metric=val_acc")
    assert s.returncode == 0, s.stdout + s.stderr
    assert "selected on dataset.val" in s.stdout and "test accuracy at that epoch (0)" in s.stdout
    scratch = json.loads((tmp_path / "scratch" / "summary.json").read_text())
    assert scratch["init"] == "scratch" and "val_acc" in scratch["last"] and "test_acc" in scratch["last"]

    bad = cli("--config", "cfgs/finetune/quickstart_cls.yaml", "--run_dir", tmp_path / "none", *TINY)
    assert bad.returncode != 0 and "--finetune CKPT, --scratch" in bad.stderr
    wide = cli("--config", "cfgs/finetune/quickstart_cls.yaml", "--finetune", tmp_path / "pretrain.pth",
               "--run_dir", tmp_path / "wide", *TINY, *TINY_DATA, "model.trans_dim=96", "model.encoder_dims=96")
    assert wide.returncode == 2 and "wrong shape" in wide.stdout


@pytest.mark.slow
def test_cli_fewshot_runs_folds_and_writes_the_table(tmp_path):
    run = tmp_path / "fs"
    args = ["--config", "cfgs/finetune/quickstart_fewshot.yaml", "--fewshot", "--scratch", "--run_dir", run,
            *TINY, *TINY_DATA, "finetune.fewshot.ways=[2]", "finetune.fewshot.shots=[2]",
            "finetune.fewshot.folds=2", "finetune.fewshot.query=2", "max_epoch=1"]
    p = cli(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2-way 2-shot over 2 folds: last epoch (0)" in p.stdout and "±" in p.stdout
    table = (run / "fewshot.md").read_text()
    assert "| 2-way 2-shot | 2 |" in table
    assert not list(run.rglob("ckpt-*.pth"))          # few-shot keeps no checkpoints by default
    again = cli(*args)                                # finished folds are reused
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already done") == 2
