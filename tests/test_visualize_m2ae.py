"""tools/visualize.py recon / gc and tools/gc_probe.py on tiny Point-M2AE and Point-M2AE + GM3D checkpoints,
at the mask scale (the coarsest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from models.point_m2ae import PointM2AE, PointM2AEGM3D
from tools import gc_probe, visualize
from tools.engine.checkpoint import atomic_save
from tools.vis import forward, loading

M2 = dict(group_sizes=[8, 4, 4], num_groups=[32, 16, 8], encoder_depths=[1, 1, 1], encoder_dims=[24, 48, 96],
          local_radius=[0.3, 0.6, 1.2], num_heads=3, decoder_depths=[1, 1], decoder_dims=[96, 48],
          decoder_up_blocks=[1, 1])
DATA = {"NAME": "SyntheticShapes", "npoints": 128, "num_classes": 2, "samples_per_class": 2,
        "test_per_class": 2, "base_points": 256}
CONFIG = {"dataset": {"train": {**DATA, "subset": "train"}, "svm_test": {**DATA, "subset": "test"}},
          "max_epoch": 4, "data_root": None}


def _save(model, model_cfg, epoch, path):
    atomic_save({"base_model": model.state_dict(), "epoch": epoch, "config": {**CONFIG, "model": model_cfg},
                 "model_name": type(model).__name__, "format": "geomask3d-1"}, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis_m2ae")
    torch.manual_seed(0)
    m2_cfg = {"NAME": "Point_M2AE", **M2}
    m2 = PointM2AE(**M2)
    _save(m2, m2_cfg, 2, root / "m2ae" / "ckpt-last.pth")
    teacher = root / "teacher.pth"
    _save(m2, m2_cfg, 9, teacher)
    g = {"variant": "C", "gc_decoder_depth": 1, "teacher_ckpt": str(teacher)}
    gm = PointM2AEGM3D(**M2, gm3d=g)
    gm_cfg = {"NAME": "Point_M2AE_GM3D", **M2, "gm3d": g}
    for epoch, name in ((0, "ckpt-epoch-000.pth"), (3, "ckpt-last.pth")):
        with torch.no_grad():
            for p in gm.ema.parameters():
                p.add_(0.05 * torch.randn_like(p))
        _save(gm, gm_cfg, epoch, root / "gm3d" / name)
    return {"m2ae": root / "m2ae" / "ckpt-last.pth", "run": root / "gm3d", "gm3d": root / "gm3d" / "ckpt-last.pth"}


@pytest.mark.parametrize("which", ["m2ae", "gm3d"])
def test_recon_state_is_the_training_reconstruction_at_the_mask_scale(ckpts, which):
    ck = loading.load_checkpoint(ckpts[which])
    shape = loading.load_shapes(ck.config, [0])[0]
    st = forward.recon_state(ck, shape.points, seed=0)
    model = ck.model
    student = model.student if which == "gm3d" else model
    G = M2["num_groups"][-1]
    assert st["center"].shape == (G, 3) and st["mask"].shape == (G,)
    assert int(st["mask"].sum()) == model.masker.num_masked(G)
    # the same forward pass as training, recomputed here: groups, mask, encoder, decoder, loss per token
    p = model.group(shape.points[None])
    torch.testing.assert_close(torch.from_numpy(st["center"]), p[-1].center[0])
    mask = torch.from_numpy(st["mask"])[None]
    with torch.no_grad():
        enc = student.encode(p, mask)
        _, x = student.decode(p, enc, mask)
        per_tok, fine = student.fine_token_loss(p, enc, x)
    L = int(fine.sum())
    assert L > 0 and st["pred"].shape == (L, 3 * M2["group_sizes"][0] // 3, 3)
    assert st["target"].shape == (L, M2["group_sizes"][1], 3)
    assert st["chamfer"] == pytest.approx(float(per_tok.mean()), rel=1e-5)
    torch.testing.assert_close(torch.from_numpy(st["pred_center"]), p[1].center[0][fine[0]])
    # the target points are finest-scale centres; the visible points are input points
    c0 = p[0].center[0].numpy()
    assert np.abs(st["target"].reshape(-1, 3)[:, None] - c0[None]).sum(-1).min(1).max() < 1e-5
    pts = shape.points.numpy()
    assert np.abs(st["visible"][:, None] - pts[None]).sum(-1).min(1).max() < 1e-5
    assert len(st["visible"]) == int((~enc.masks[0]).sum()) * M2["group_sizes"][0]


@pytest.mark.parametrize("which", ["m2ae", "gm3d"])
def test_recon_cli_writes_a_png(ckpts, tmp_path, capsys, which):
    out = tmp_path / f"recon_{which}.png"
    assert visualize.main(["recon", "--ckpt", str(ckpts[which]), "--shapes", "0", "1", "--panel", "2",
                           "--dpi", "50", "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    img = imread(out)
    assert (img.shape[1], img.shape[0]) == (300, 260)
    assert (img[..., :3].reshape(-1, 3).min(1) < 0.9).mean() > 0.005


def test_gc_state_scores_the_coarsest_scale(ckpts):
    ck = loading.load_checkpoint(ckpts["gm3d"])
    shape = loading.load_shapes(ck.config, [0])[0]
    st = forward.gc_state(ck.model, shape.points, ck.epoch, seed=0)
    G = M2["num_groups"][-1]
    p = ck.model.group(shape.points[None])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(st["scores"]), ck.model.teacher_scores(p)[0])
    assert st["center"].shape == (G, 3) and st["mask"].sum() == ck.model.masker.num_masked(G)
    assert st["selected"].sum() == st["n_sel"] and not (st["selected"] & ~st["mask"]).any()
    assert st["point_patch"].shape == (len(shape.points),) and st["point_patch"].max() < G


def test_gc_cli_on_a_m2ae_gm3d_run_and_refuses_plain_m2ae(ckpts, tmp_path, capsys):
    out = tmp_path / "gc.png"
    assert visualize.main(["gc", "--run", str(ckpts["run"]), "--shapes", "0", "--panel", "2", "--dpi", "50",
                           "-o", str(out)]) == 0
    img = imread(out)
    assert img.shape[1] == round((2 * 2 * 2 + 0.1 + 1.0) * 50)
    assert visualize.main(["gc", "--ckpts", str(ckpts["m2ae"]), "-o", str(tmp_path / "x.png")]) == 2
    assert "Point_M2AE_GM3D" in capsys.readouterr().err


def test_gc_probe_on_m2ae_gm3d(ckpts, capsys, tmp_path):
    import json

    assert gc_probe.main([str(ckpts["gm3d"]), "--limit", "3", "--targets"]) == 0
    out = capsys.readouterr().out
    assert "| flatness | linearity | spread | random_mask | gm3d_mask |" in out
    assert gc_probe.main([str(ckpts["m2ae"])]) == 2
    js = tmp_path / "d.json"
    assert gc_probe.main([str(ckpts["gm3d"]), "--diagnostics", "--limit", "4", "--json", str(js)]) == 0
    d = json.loads(js.read_text())["checkpoints"][0]["diagnostics"]
    assert d["shapes"] == 4 and -1 <= d["rotation_rho"] <= 1 and -1 <= d["target_rho"] <= 1
    assert d["shuffle_rho"] is None and "multi-scale" in d["skipped"]["shuffle_rho"]   # needs one scale
