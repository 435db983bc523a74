"""tools/visualize.py and its library tools/vis/: each sub-command writes a PNG of the expected size
from a tiny run; GC colours are monotone in the scores; a plain Point-MAE checkpoint is refused by `gc`
and accepted by `recon`; the periodic GCPanelEvaluator writes its file and returns {}; the masked
forward agrees with the training path; gc_probe's correlations and CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.image import imread

from datasets import build_dataset
from models.gm3d import PointMAEGM3D
from models.point_mae import PointMAE
from tests.helpers import TINY_TC
from tools import visualize
from tools.vis import curves, evaluator, forward, loading, panels
from tools.vis.probe import QUANTITIES
from tools.engine.checkpoint import CheckpointError, atomic_save

GROUP = {"group_size": 8, "num_group": 16}
DATA = {"NAME": "SyntheticShapes", "npoints": 128, "num_classes": 2, "samples_per_class": 2,
        "test_per_class": 2, "base_points": 256}
DATASET_CFG = {"train": {**DATA, "subset": "train"}, "svm_test": {**DATA, "subset": "test"}}
MAX_EPOCH = 4


def _config(model_cfg):
    return {"model": model_cfg, "dataset": DATASET_CFG, "max_epoch": MAX_EPOCH, "data_root": None}


def _save(model, model_cfg, epoch, path):
    atomic_save({"base_model": model.state_dict(), "epoch": epoch, "config": _config(model_cfg),
                 "model_name": type(model).__name__, "format": "geomask3d-1"}, path)


def _pixels(path):
    img = imread(path)
    return img.shape[1], img.shape[0], img


def _nonblank(img):
    rgb = img[..., :3].reshape(-1, 3)
    return (rgb.min(axis=1) < 0.9).mean() > 0.005 and len(np.unique(rgb.round(2), axis=0)) > 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny GM3D run (variant C trained with a knowledge teacher whose file is then deleted) with
    ckpt-epoch-000/001 + ckpt-last (epoch 3) + metrics.jsonl, and a plain Point-MAE checkpoint."""
    root = tmp_path_factory.mktemp("vis")
    torch.manual_seed(0)
    mae_cfg = {"NAME": "Point_MAE", **GROUP, "transformer_config": TINY_TC}
    mae = PointMAE(**GROUP, transformer_config=TINY_TC)
    mae_path = root / "mae" / "ckpt-last.pth"
    _save(mae, mae_cfg, 2, mae_path)
    (root / "mae" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"epoch": -1, "init/svm_acc": 50.0},
        {"epoch": 0, "train/loss": 0.2, "train/chamfer_l2": 0.2, "lr": 1e-4},
        {"epoch": 1, "train/loss": 0.1, "train/chamfer_l2": 0.1, "lr": 1e-3, "svm_acc": 60.0}]) + "\n")

    teacher = root / "teacher.pth"
    _save(mae, mae_cfg, 9, teacher)
    gm_cfg = {"NAME": "Point_MAE_GM3D", **GROUP, "transformer_config": TINY_TC,
              "gm3d": {"variant": "C", "gc_decoder_depth": 1, "teacher_ckpt": str(teacher)}}
    gm = PointMAEGM3D(**GROUP, transformer_config=TINY_TC, gm3d=gm_cfg["gm3d"])
    run = root / "gm3d"
    for epoch, name in ((0, "ckpt-epoch-000.pth"), (1, "ckpt-epoch-001.pth"), (3, "ckpt-last.pth")):
        with torch.no_grad():
            for p in gm.ema.parameters():
                p.add_(0.05 * torch.randn_like(p))
        _save(gm, gm_cfg, epoch, run / name)
    teacher.unlink()  # the knowledge teacher is gone: visualisation must not need it
    records = [{"epoch": -1, "init/svm_acc": 55.0}]
    for e in range(MAX_EPOCH):
        records.append({"epoch": e, "train/loss": 1.0 / (e + 1), "train/loss_point": 0.1 / (e + 1),
                        "train/loss_feat": 0.5 / (e + 1), "train/loss_gc": 0.69 - 0.01 * e,
                        "train/n_sel": float(e), "train/gc_rank_corr": 0.1 * e, "train/ema_decay": 0.99,
                        "lr": 1e-3, **({"svm_acc": 60.0 + e} if e % 2 else {})})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return {"root": root, "run": run, "mae": mae_path}


# --------------------------------------------------------------------------------------- pure pieces
def test_gc_colours_are_monotone_and_top_patch_gets_top_colour():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, generator=g).numpy() * 3 + 1
    point_patch = torch.randint(0, 16, (400,), generator=g).numpy()
    point_patch[:16] = np.arange(16)  # every patch owns a point
    cmap = colormaps[panels.GC_CMAP]
    for mode in ("panel", "rank", "global"):
        rgba, value = panels.gc_colors(scores, point_patch, mode=mode, vmin=scores.min(), vmax=scores.max())
        order = np.argsort(scores[point_patch], kind="stable")
        assert np.all(np.diff(value[order]) >= 0), mode                      # monotone in the score
        top = point_patch == scores.argmax()
        np.testing.assert_allclose(rgba[top], np.broadcast_to(cmap(1.0), rgba[top].shape))
        bottom = point_patch == scores.argmin()
        np.testing.assert_allclose(rgba[bottom], np.broadcast_to(cmap(0.0), rgba[bottom].shape))
    # the colours themselves follow the colormap's order: larger score -> later colormap entry
    lut = cmap(np.linspace(0, 1, 256))
    rgba, _ = panels.gc_colors(scores, np.arange(16))
    pos = [np.abs(lut - c).sum(1).argmin() for c in rgba]
    assert np.all(np.diff(np.array(pos)[np.argsort(scores)]) >= 0)


def test_normalize_scores_edge_cases():
    np.testing.assert_allclose(panels.normalize_scores([2.0, 2.0, 2.0]), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(panels.normalize_scores([1.0, 3.0, 2.0]), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(panels.normalize_scores([1.0, 1.0, 5.0], "rank"), [0.25, 0.25, 1.0])
    np.testing.assert_allclose(panels.normalize_scores([0.0, 10.0], "global", vmin=0.0, vmax=5.0), [0.0, 1.0])
    with pytest.raises(ValueError):
        panels.normalize_scores([1.0], "sideways")


def test_patch_of_point_is_nearest_centre():
    center = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    pts = torch.tensor([[0.1, 0, 0], [0.9, 0.1, 0], [0, 0.8, 0.1], [0.4, 0, 0]])
    assert forward.patch_of_point(pts, center).tolist() == [0, 1, 2, 0]


def test_thin_keeps_first_and_last():
    assert loading.thin(list(range(10)), 4) == [0, 3, 6, 9]
    assert loading.thin([1, 2], 5) == [1, 2]


# --------------------------------------------------------------------------------------- checkpoints
def test_run_checkpoints_ordered_by_epoch(runs):
    names = [p.name for p in loading.run_checkpoints(runs["run"])]
    assert names == ["ckpt-epoch-000.pth", "ckpt-epoch-001.pth", "ckpt-last.pth"]


def test_load_checkpoint_without_teacher_file_is_exact_elsewhere(runs, tmp_path):
    ck = loading.load_checkpoint(runs["run"] / "ckpt-last.pth")
    assert ck.is_gm3d and ck.kd_dropped and ck.epoch == 3 and not ck.model.training
    assert ck.model.masker.total_epochs == MAX_EPOCH
    # any other stray key is still an error
    state = torch.load(runs["run"] / "ckpt-last.pth", weights_only=True)
    state["base_model"]["MAE_encoder.bogus"] = torch.zeros(1)
    atomic_save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bogus"):
        loading.load_checkpoint(tmp_path / "bad.pth")


# --------------------------------------------------------------------------------------- sub-commands
def test_gc_writes_png_of_expected_size(runs, tmp_path, capsys):
    out = tmp_path / "gc.png"
    rc = visualize.main(["gc", "--run", str(runs["run"]), "--shapes", "0", "2", "--panel", "2", "--dpi", "50",
                   "-o", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    w, h, img = _pixels(out)
    # 3 checkpoints x (GC, mask) panels of 2 in + 2 gaps of 0.1 in + 1 in colour bar; 2 rows of 2 + 0.4 in
    assert (w, h) == (660, 260)
    assert panels.gc_figsize(2, 3, 2.0) == pytest.approx((13.2, 5.2))
    assert _nonblank(img)


def test_gc_with_explicit_ckpts_and_train_split(runs, tmp_path):
    out = tmp_path / "gc2.png"
    ckpts = [str(runs["run"] / "ckpt-epoch-001.pth"), str(runs["run"] / "ckpt-epoch-000.pth")]
    rc = visualize.main(["gc", "--ckpts", *ckpts,
                   "--split", "train", "--shapes", "1", "--panel", "2", "--dpi", "50", "-o", str(out)])
    assert rc == 0
    w, h, _ = _pixels(out)
    assert (w, h) == (round((2 * 2 * 2 + 0.1 + 1.0) * 50), round((0.4 + 2.4) * 50))


def test_gc_refuses_plain_point_mae_with_clear_error(runs, tmp_path, capsys):
    rc = visualize.main(["gc", "--ckpts", str(runs["mae"]), "-o", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(runs["mae"]) in err and "no GC decoder" in err
    assert not (tmp_path / "x.png").exists()
    ck = loading.load_checkpoint(runs["mae"])
    with pytest.raises(loading.NoGCDecoderError):
        forward.gc_state(ck.model, torch.randn(128, 3), 0)


@pytest.mark.parametrize("which", ["mae", "gm3d"])
def test_recon_writes_png_for_point_mae_and_gm3d(runs, tmp_path, capsys, which):
    ckpt = runs["mae"] if which == "mae" else runs["run"] / "ckpt-last.pth"
    out = tmp_path / f"recon_{which}.png"
    rc = visualize.main(["recon", "--ckpt", str(ckpt), "--shapes", "0", "3", "--panel", "2", "--dpi", "50",
                   "-o", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    w, h, img = _pixels(out)
    assert (w, h) == (300, 260)  # 3 panels x 2 in; 0.4 in title + 2 rows x (2 + 0.4) in
    assert _nonblank(img)


def test_recon_state_shapes_and_mask_count(runs):
    ck = loading.load_checkpoint(runs["run"] / "ckpt-last.pth")
    shape = loading.load_shapes(ck.config, [0])[0]
    st = forward.recon_state(ck, shape.points, seed=0)
    M = int(st["mask"].sum())
    assert M == ck.model.masker.num_masked(16) == 10
    assert st["pred"].shape == st["target"].shape == (M, 8, 3)
    assert st["visible"].shape == ((16 - M) * 8, 3)
    assert np.isfinite(st["chamfer"])
    gc = forward.gc_state(ck.model, shape.points, ck.epoch, seed=0)
    # at epoch 3 of 4, N_sel = int(10 * 4/4 * 0.5) = 5 top-scored patches are all masked
    assert gc["n_sel"] == 5 and gc["selected"].sum() == 5 and gc["mask"][gc["selected"]].all()
    assert shape.class_name == "chair"


@pytest.mark.parametrize("which,n_panels", [("gm3d", 8), ("mae", 4)])
def test_curves_only_present_metrics(runs, tmp_path, capsys, which, n_panels):
    run = runs["run"] if which == "gm3d" else runs["mae"].parent
    panels = curves.curve_panels(curves.read_metrics(run))
    assert len(panels) == n_panels
    out = tmp_path / f"curves_{which}.png"
    rc = visualize.main(["curves", "--run", str(run), "--dpi", "50", "-o", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    w, h, img = _pixels(out)
    rows = -(-n_panels // 3)
    assert (w, h) == (round(3 * 3.6 * 50), round((rows * 2.7 + 0.4) * 50))
    assert _nonblank(img)


def test_curves_missing_file_is_clear(tmp_path, capsys):
    assert visualize.main(["curves", "--run", str(tmp_path)]) == 2
    assert "metrics file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- training hook
def test_gc_panel_evaluator_writes_file_and_returns_empty(runs, tmp_path):
    ck = loading.load_checkpoint(runs["run"] / "ckpt-epoch-001.pth")
    model = ck.model.train()
    dataset = build_dataset(DATASET_CFG["svm_test"])
    ev = evaluator.GCPanelEvaluator(dataset, every=2, out_dir=tmp_path / "vis", num_shapes=2)
    assert ev.name == "gc_vis" and ev.every == 2
    rng = torch.get_rng_state()
    assert ev(model, 1) == {}
    assert torch.equal(rng, torch.get_rng_state())  # the training RNG is untouched
    assert model.training and not model.ema.training  # mode restored
    path = tmp_path / "vis" / "gc_epoch_001.png"
    w, h, img = _pixels(path)
    assert path.stat().st_size > 0 and _nonblank(img)
    assert (w, h) == (round((2 * 2.2 + 1.0) * 100), round((0.4 + 2 * 2.6) * 100))


def test_gc_panel_evaluator_warns_once_for_point_mae(runs, tmp_path, caplog):
    ck = loading.load_checkpoint(runs["mae"])
    dataset = build_dataset(DATASET_CFG["svm_test"])
    ev = evaluator.GCPanelEvaluator(dataset, every=1, out_dir=tmp_path / "vis")
    with caplog.at_level(logging.WARNING, logger="tools.vis.evaluator"):
        assert ev(ck.model, 0) == {}
        assert ev(ck.model, 1) == {}
    assert sum("no GC decoder" in r.getMessage() for r in caplog.records) == 1
    assert not (tmp_path / "vis").exists() or not any((tmp_path / "vis").iterdir())


def test_gc_panel_evaluator_before_training_uses_a_random_mask(runs, tmp_path):
    ck = loading.load_checkpoint(runs["run"] / "ckpt-epoch-000.pth")
    dataset = build_dataset(DATASET_CFG["svm_test"])
    st = forward.gc_state(ck.model, loading.shapes_from_dataset(dataset, [0])[0].points, -1)
    assert st["n_sel"] == 0 and not st["selected"].any() and st["n_masked"] == 10
    ev = evaluator.GCPanelEvaluator(dataset, every=1, out_dir=tmp_path, num_shapes=1)
    assert ev(ck.model, -1) == {}
    assert (tmp_path / "gc_epoch_init.png").stat().st_size > 0


def test_recon_variant_b_uses_the_knowledge_teachers_point_head(tmp_path):
    torch.manual_seed(0)
    mae_cfg = {"NAME": "Point_MAE", **GROUP, "transformer_config": TINY_TC}
    teacher = tmp_path / "teacher.pth"
    _save(PointMAE(**GROUP, transformer_config=TINY_TC), mae_cfg, 9, teacher)
    g = {"variant": "B", "gc_decoder_depth": 1, "teacher_ckpt": str(teacher)}
    model = PointMAEGM3D(**GROUP, transformer_config=TINY_TC, gm3d=g)
    _save(model, {"NAME": "Point_MAE_GM3D", **GROUP, "transformer_config": TINY_TC, "gm3d": g}, 1,
          tmp_path / "b.pth")
    teacher.unlink()
    ck = loading.load_checkpoint(tmp_path / "b.pth")
    assert ck.variant == "B" and ck.kd_dropped and ck.point_head is not None
    torch.testing.assert_close(ck.point_head.weight, model.knowledge_teacher.increase_dim[0].weight)
    st = forward.recon_state(ck, loading.load_shapes(ck.config, [0])[0].points)
    assert st["pred"].shape == (10, 8, 3) and np.isfinite(st["pred"]).all()


# --------------------------------------------------------------------------------------- gc_probe
def test_gc_probe_correlations_recover_known_score_functions():
    from tools.vis.probe import patch_quantities, score_correlations

    g = torch.Generator().manual_seed(0)
    center = torch.randn(3, 10, 3, generator=g)
    nb = torch.randn(3, 10, 8, 3, generator=g)
    nb[:, :5, :, 2] = 0.0                                   # the first five patches are planar
    corr = score_correlations(-center[..., 0], center, nb)
    torch.testing.assert_close(corr["x"], -torch.ones(3))
    q = patch_quantities(center, nb)
    assert torch.all(q["flatness"][:, :5] < 1e-6) and torch.all(q["flatness"][:, 5:] > 1e-3)
    assert torch.all(q["flatness"] <= 1 / 3 + 1e-6)
    corr = score_correlations(q["flatness"], center, nb)
    torch.testing.assert_close(corr["flatness"], torch.ones(3))


def test_gc_probe_cli(runs, capsys):
    from tools import gc_probe
    from tools.vis import probe

    assert gc_probe.main([str(runs["run"] / "ckpt-last.pth"), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "| checkpoint | shapes | x | y | z | radius | flatness | linearity | spread |" in out
    assert f"| {runs['run'] / 'ckpt-last.pth'} | 3 |" in out
    assert gc_probe.main([str(runs["run"] / "ckpt-last.pth"), "--limit", "3", "--targets"]) == 0
    out = capsys.readouterr().out
    assert "| flatness | linearity | spread | random_mask | gm3d_mask |" in out
    corr = probe.probe(str(runs["run"] / "ckpt-last.pth"), limit=3, targets=True)
    assert set(corr) == {*probe.QUANTITIES, "random_mask", "gm3d_mask"}
    assert all(v.shape == (3,) and bool(((v >= -1) & (v <= 1)).all()) for v in corr.values())
    assert gc_probe.main([str(runs["mae"])]) == 2
    assert "has no GC decoder" in capsys.readouterr().err


def test_gc_probe_diagnostics_json(runs, tmp_path, capsys):
    from tools import gc_probe

    ckpts = [str(runs["run"] / "ckpt-epoch-000.pth"), str(runs["run"] / "ckpt-last.pth")]
    out = tmp_path / "diag.json"
    assert gc_probe.main([*ckpts, "--diagnostics", "--json", str(out), "--limit", "4"]) == 0
    text = capsys.readouterr().out
    assert "| checkpoint | shapes | shuffle_rho | rotation_rho |" in text and f"wrote {out}" in text
    doc = json.loads(out.read_text())
    assert doc["split"] is None and [r["path"] for r in doc["checkpoints"]] == ckpts
    rec = doc["checkpoints"][1]
    assert (rec["epoch"], rec["variant"], rec["kd_dropped"], rec["shapes"]) == (3, "A", True, 4)
    assert set(rec["correlations"]) == set(QUANTITIES)
    assert set(rec["correlations"]["x"]) == {"mean", "mean_abs"}
    d = rec["diagnostics"]
    assert d["shapes"] == 4 and d["indices"] == [0, 1, 2, 3] and d["skipped"] == {}
    for k in ("shuffle_rho", "rotation_rho", "position_rotation_rho", "target_rho", "target_rho_heldout",
              "position_baseline_rho", "position_linear_rho"):
        assert -1 <= d[k] <= 1
    assert 0 <= d["position_r2"] <= 1 and d["bn"]["layers"] and d["bn"]["worst_layer"]
    assert set(d["bn"]["layers"][0]) == {"name", "student_var", "teacher_var", "ratio"}
    with pytest.raises(SystemExit):
        gc_probe.main([ckpts[0], "--diagnostics", "--limit", "1"])      # no held-out half
    assert "--limit must be >= 2, got 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- masked forward
def test_masked_forward_reconstruction_matches_the_training_point_loss():
    """The views' reconstruction path (decode all tokens, keep the masked ones, model's point head) and
    the training path (model.per_patch_terms, through gc_target) give the same per-patch Chamfer."""
    from extensions import chamfer_l2

    torch.manual_seed(0)
    model = PointMAEGM3D(**GROUP, transformer_config=TINY_TC,
                         gm3d={"variant": "A", "gc_decoder_depth": 1}).eval()
    p = model.group(torch.randn(3, 128, 3))
    mask = forward.random_masker(model.masker)(p.center, generator=forward.mask_generator(0))
    out = forward.masked_forward(model, p, mask, gc_target=True)
    B, M, K = 3, int(mask[0].sum()), GROUP["group_size"]
    assert out.x_vis.shape[:2] == (B, GROUP["num_group"] - M)
    assert out.decoded.shape[:2] == (B, M) and out.pred.shape == (B, M, K, 3)
    target = p.neighborhood[mask].view(B * M, K, 3)
    cd = chamfer_l2(out.pred.reshape(B * M, K, 3), target, reduction="none").view(B, M)
    torch.testing.assert_close(cd, out.gc_target)           # variant A: the GC target is the point loss
    only = forward.masked_forward(model, p, mask, reconstruct=False)
    assert only.pred is None and only.gc_target is None and torch.equal(only.x_vis, out.x_vis)
