"""tools/vis/diagnostics.py: the content-blindness statistics on scorers whose answer is known (position-
only, content-only, rotation-invariant), linearity, the BatchNorm comparison, the position baseline, the
mask-averaged target against a loop, the multi-scale refusal, and the per-epoch evaluator in a tiny run."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from extensions import Patches
from tests.conftest import tiny_pretrain_cfg
from tests.test_gm3d import gm3d
from tools.vis import diagnostics as D
from tools.vis.evaluator import ProbeEvaluator
from tools.vis.forward import mask_generator, random_masker
from tools.vis.probe import patch_quantities


def patches(B=4, G=24, K=8, seed=0) -> Patches:
    """Random patches whose sizes differ (so a spread score has a ranking to lose)."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(B, G, 3, generator=g)
    scale = torch.rand(B, G, 1, 1, generator=g) + 0.1
    nb = torch.randn(B, G, K, 3, generator=g) * scale
    return Patches(nb, center, torch.randint(0, 100, (B, G, K), generator=g))


def position_score(p):
    return p.center[..., 0] + 0.5 * p.center[..., 1] ** 2 - p.center[..., 2]


def spread_score(p):
    return (p.neighborhood ** 2).sum((-1, -2))


def x_score(p):
    return p.center[..., 0]


# ------------------------------------------------------------------------------------ content shuffle
def test_shuffle_is_one_for_a_position_scorer_and_low_for_a_content_scorer():
    p = patches()
    torch.testing.assert_close(D.content_shuffle_rho(position_score, p), torch.ones(4), rtol=0, atol=1e-6)
    assert D.content_shuffle_rho(spread_score, p).mean() < 0.5


def test_shuffle_contents_moves_neighbourhoods_and_keeps_centres():
    p = patches(B=2, G=5)
    perm = torch.stack([torch.tensor([4, 3, 2, 1, 0]), torch.tensor([1, 2, 3, 4, 0])])
    s = D.shuffle_contents(p, perm)
    assert torch.equal(s.center, p.center)
    for b in range(2):
        for g in range(5):
            assert torch.equal(s.neighborhood[b, g], p.neighborhood[b, perm[b, g]])
            assert torch.equal(s.idx[b, g], p.idx[b, perm[b, g]])


def test_shuffle_refuses_a_multiscale_grouping():
    p = patches()
    with pytest.raises(D.MultiScaleError, match="multi-scale grouping"):
        D.content_shuffle_rho(lambda g: g[-1].center[..., 0], [p, p])


# ------------------------------------------------------------------------------------ rotation
def test_rotation_keeps_a_rotation_invariant_content_score_and_breaks_an_x_score():
    p = patches()
    torch.testing.assert_close(D.rotation_rho(spread_score, p), torch.ones(4), rtol=0, atol=1e-6)
    # x -> z, -x, -z at 90, 180, 270 degrees: rho(x, z) + rho(x, -z) = 0, so the mean is exactly -1/3
    torch.testing.assert_close(D.rotation_rho(x_score, p), torch.full((4,), -1 / 3), rtol=0, atol=1e-6)


def test_rotate_patches_is_a_rotation_about_y_of_every_scale():
    p = patches(B=1, G=3)
    r = D.rotate_patches(p, 90.0)
    torch.testing.assert_close(r.center[..., 0], p.center[..., 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(r.center[..., 2], -p.center[..., 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(r.center[..., 1], p.center[..., 1])
    torch.testing.assert_close(r.neighborhood[..., 0], p.neighborhood[..., 2], rtol=0, atol=1e-6)
    assert torch.equal(r.idx, p.idx)
    two = D.rotate_patches([p, p], 90.0)
    assert len(two) == 2 and torch.equal(two[1].center, r.center)


def test_position_reference_rotation_and_r2():
    p = patches()
    x = x_score(p)
    torch.testing.assert_close(D.position_rotation_rho(x, p), torch.full((4,), -1 / 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(D.position_rotation_rho(p.center[..., 1], p), torch.ones(4), rtol=0, atol=1e-6)
    _, r2 = D.position_fit(2 * x - p.center[..., 1] + 3, p.center)
    torch.testing.assert_close(r2, torch.ones(4), rtol=0, atol=1e-6)
    _, r2 = D.position_fit(spread_score(p), p.center)
    assert r2.mean() < 0.5


# ------------------------------------------------------------------------------------ linearity
def test_linearity_is_one_on_a_line_and_about_zero_on_a_disc():
    t = torch.linspace(-1, 1, 32)
    line = torch.stack([t, 2 * t, -t], -1)
    ang = torch.linspace(0, 2 * math.pi, 33)[:-1]
    rad = torch.linspace(0.1, 1, 32)
    disc = torch.stack([rad * torch.cos(ang * 7), torch.zeros(32), rad * torch.sin(ang * 7)], -1)
    nb = torch.stack([line - line.mean(0), disc - disc.mean(0)])[None]             # (1, 2, 32, 3)
    q = patch_quantities(torch.zeros(1, 2, 3), nb)
    assert q["linearity"][0, 0] == pytest.approx(1.0, abs=1e-5)
    assert q["linearity"][0, 1] < 0.1
    assert q["flatness"][0, 1] < 1e-6                                                 # a plane


# ------------------------------------------------------------------------------------ BatchNorm
def test_bn_statistics_compare_matching_layers():
    m = gm3d(variant="A")
    stats = D.bn_statistics(m)
    names = [x["name"] for x in stats.layers]
    assert names and not any(n.startswith(("ema", "knowledge_teacher")) for n in names)
    assert stats.median_ratio == pytest.approx(1.0)
    name = names[0]
    with torch.no_grad():
        m.get_submodule(name).running_var.fill_(2.0)
        m.ema.get_submodule(name).running_var.fill_(8.0)
    stats = D.bn_statistics(m)
    row = next(x for x in stats.layers if x["name"] == name)
    assert (row["student_var"], row["teacher_var"], row["ratio"]) == pytest.approx((2.0, 8.0, 4.0))
    assert stats.summary()["worst_layer"] == name and stats.summary()["worst_ratio"] == pytest.approx(4.0)
    assert all(x["ratio"] == pytest.approx(1.0) for x in stats.layers if x["name"] != name)


# ------------------------------------------------------------------------------------ target, baseline
def test_position_baseline_beats_chance_on_a_function_of_position():
    g = torch.Generator().manual_seed(0)
    center = torch.rand(16, 32, 3, generator=g) * 2 - 1
    target = torch.sin(3 * center[..., 0]) + center[..., 1] ** 2
    valid = torch.ones(16, 32, dtype=torch.bool)
    train = torch.arange(16) < 8
    state = torch.random.get_rng_state()
    pred = D.position_baseline(center, target, valid, train)
    assert torch.equal(state, torch.random.get_rng_state())                          # caller's RNG untouched
    assert D.spearman_valid(pred[~train], target[~train]).mean() > 0.8
    noise = torch.randn(16, 32, generator=g)                                         # nothing to learn
    pred = D.position_baseline(center, noise, valid, train)
    assert D.spearman_valid(pred[~train], noise[~train]).mean().abs() < 0.3


def test_linear_position_baseline_nearly_recovers_an_affine_target():
    g = torch.Generator().manual_seed(1)
    center = torch.randn(6, 20, 3, generator=g)
    target = 2 * center[..., 0] - center[..., 2] + torch.arange(6.0)[:, None]       # offsets per cloud
    valid = torch.ones(6, 20, dtype=torch.bool)
    valid[3, :5] = False
    train = torch.arange(6) < 3
    pred = D.linear_position_baseline(center, target, valid, train)
    # not exactly 1: the per-cloud standardisation scales each cloud's slope a little differently
    assert bool((D.spearman_valid(pred[~train], target[~train]) > 0.98).all())


def test_spearman_valid_matches_the_subset():
    a, b = torch.randn(3, 10), torch.randn(3, 10)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, :4] = False
    valid[2, :8] = False                                                             # 2 left: NaN
    rho = D.spearman_valid(a, b, valid)
    ref = D.spearman_valid(a[1:2, 4:], b[1:2, 4:])
    torch.testing.assert_close(rho[1:2], ref)
    assert math.isnan(rho[2]) and not math.isnan(rho[0])


def test_mask_averaged_target_against_a_loop():
    m = gm3d(variant="A").eval()
    p = m.group(torch.randn(2, 128, 3, generator=torch.Generator().manual_seed(0)))
    seeds = (0, 1, 2)
    target, count = D.mask_averaged_target(m, p, seeds)
    sums, n = torch.zeros(2, 16), torch.zeros(2, 16)
    masker = random_masker(m.masker)
    with torch.no_grad():
        for seed in seeds:
            mask = masker(p.center, generator=mask_generator(seed))
            t = m.per_patch_terms(p, mask, m.encode(p, mask))[3]
            for b in range(2):
                for j, g in enumerate(mask[b].nonzero()[:, 0].tolist()):
                    sums[b, g] += t[b, j]
                    n[b, g] += 1
    assert torch.equal(count.float(), n) and int(mask[0].sum()) == m.masker.num_masked(16)
    torch.testing.assert_close(target, sums / n.clamp_min(1))


def test_batched_teacher_scores_equal_one_call_per_variant():
    m = gm3d(variant="A").eval()
    p = m.group(torch.randn(3, 128, 3, generator=torch.Generator().manual_seed(0)))
    base = m.teacher_scores(p)
    loop = []
    for seed in D.SHUFFLE_SEEDS:
        perm = torch.rand(3, 16, generator=mask_generator(seed)).argsort(1)
        loop.append(D.spearman_valid(base, m.teacher_scores(D.shuffle_contents(p, perm))))
    torch.testing.assert_close(D.content_shuffle_rho(m.teacher_scores, p), torch.stack(loop).mean(0))
    loop = [D.spearman_valid(base, m.teacher_scores(D.rotate_patches(p, a))) for a in D.ANGLES]
    torch.testing.assert_close(D.rotation_rho(m.teacher_scores, p), torch.stack(loop).mean(0))


def test_diagnose_on_a_tiny_gm3d_model_and_a_custom_scorer():
    m = gm3d(variant="A")
    m.train()
    pts = torch.randn(6, 128, 3, generator=torch.Generator().manual_seed(0))
    d = D.diagnose(m, pts)
    assert m.training                                                                # mode restored
    keys = {"shuffle_rho", "rotation_rho", "position_rotation_rho", "position_r2", "target_rho",
            "target_rho_heldout", "position_baseline_rho", "position_linear_rho"}
    assert keys <= set(d) and d["skipped"] == {} and d["shapes"] == 6
    assert all(-1 <= d[k] <= 1 for k in keys - {"position_r2"})
    assert d["bn"]["median_ratio"] == pytest.approx(1.0)
    d = D.diagnose(m, pts, position_score, targets=False)
    assert d["shuffle_rho"] == pytest.approx(1.0, abs=1e-6) and "target_rho" not in d


def test_diagnose_multiscale_skips_the_shuffle_only():
    from tests.test_point_m2ae import gm3d as m2ae_gm3d

    m = m2ae_gm3d(variant="A")
    d = D.diagnose(m, torch.randn(4, 256, 3, generator=torch.Generator().manual_seed(0)))
    assert set(d["skipped"]) == {"shuffle_rho"} and "multi-scale" in d["skipped"]["shuffle_rho"]
    assert math.isnan(d["shuffle_rho"]) and -1 <= d["rotation_rho"] <= 1 and -1 <= d["target_rho"] <= 1
    assert D.finite_or_none(d)["shuffle_rho"] is None


def test_probe_indices_spread_over_the_items():
    assert D.probe_indices(10, 4) == [0, 2, 5, 7]
    assert D.probe_indices(3, 16) == [0, 1, 2] and D.probe_indices(5, None) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------ evaluator
def test_probe_evaluator_metrics_and_multiscale_note(caplog):
    from tests.test_point_m2ae import gm3d as m2ae_gm3d

    data = [{"points": torch.randn(256, 3, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    ev = ProbeEvaluator(data, every=1, num_shapes=4)
    out = ev(gm3d(variant="A"), 0)
    assert set(out) == {f"probe/{k}" for k in ProbeEvaluator.KEYS} | {"probe/bn_var_ratio",
                                                                      "probe/bn_var_ratio_worst"}
    with caplog.at_level("WARNING"):
        out = ev(m2ae_gm3d(variant="A"), 0)
        ev(m2ae_gm3d(variant="A"), 1)
    assert "probe/shuffle_rho" not in out and "probe/rotation_rho" in out
    assert sum("probe/shuffle_rho is not logged" in r.message for r in caplog.records) == 1


def test_probe_evaluator_logs_its_keys_in_a_tiny_gm3d_run(tiny_config, tmp_path):
    from tools.engine.runs import release_run_folder
    from tools.tasks.pretrain import run_pretrain

    model = {**tiny_pretrain_cfg()["model"], "NAME": "Point_MAE_GM3D", "gm3d": {"gc_decoder_depth": 1}}
    cfg = tiny_config(model=model, max_epoch=1, vis={"probe_every": 1, "probe_shapes": 4},
                      eval={"svm_every": 0, "at_start": False})
    run = tmp_path / "gm3d"
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        run_pretrain(str(cfg), [], run_dir=str(run))
    finally:
        release_run_folder(run)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
    row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"probe/shuffle_rho", "probe/rotation_rho", "probe/target_rho", "probe/position_baseline_rho",
            "probe/bn_var_ratio"} <= set(row)
    assert all(math.isfinite(row[k]) for k in row if k.startswith("probe/"))


def test_probe_every_is_range_checked(tiny_config):
    from utils.config import load_config
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="probe_every"):
        load_config(tiny_config(vis={"probe_every": -1}))


def test_gc_probe_cli_on_a_multiscale_checkpoint(tmp_path, capsys):
    from tests.test_point_m2ae import TINY, gm3d as m2ae_gm3d
    from tools import gc_probe
    from tools.engine.checkpoint import atomic_save

    m = m2ae_gm3d(variant="A")
    data = {"NAME": "SyntheticShapes", "npoints": 256, "num_classes": 2, "samples_per_class": 2,
            "test_per_class": 2, "base_points": 256}
    config = {"model": {"NAME": "Point_M2AE_GM3D", **TINY, "mask": {"alpha_max": 0.5},
                        "gm3d": {"variant": "A", "gc_decoder_depth": 1}},
              "dataset": {"train": {**data, "subset": "train"}, "svm_test": {**data, "subset": "test"}},
              "max_epoch": 4, "data_root": None}
    ckpt = tmp_path / "ckpt-last.pth"
    atomic_save({"base_model": m.state_dict(), "epoch": 1, "config": config, "model_name": "PointM2AEGM3D",
                 "format": "geomask3d-1"}, ckpt)
    out = tmp_path / "m2ae.json"
    assert gc_probe.main([str(ckpt), "--targets", "--diagnostics", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shuffle_rho not computed: the content shuffle needs one scale of patches" in text
    rec = json.loads(out.read_text())["checkpoints"][0]
    assert rec["shapes"] == 4 and {"random_mask", "gm3d_mask", "linearity"} <= set(rec["correlations"])
    d = rec["diagnostics"]
    assert d["shuffle_rho"] is None and set(d["skipped"]) == {"shuffle_rho"}
    assert -1 <= d["rotation_rho"] <= 1 and -1 <= d["target_rho"] <= 1 and d["bn"]["layers"]
