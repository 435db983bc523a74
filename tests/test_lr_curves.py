"""The two CosLR curves: MAE's per-iteration one and the official timm-0.4.5 per-epoch one."""

import math

import pytest

from tools.engine.optim import lr_at, timm_cosine_lr
from utils.errors import ConfigError


def _timm_045_reference(t, base, t_initial, warmup_t, lr_min, warmup_lr_init, t_mul=1.0, decay_rate=0.1,
                        cycle_limit=1):
    """timm 0.4.5 ``CosineLRScheduler._get_lr`` written out (t_mul == 1 branch, warmup_prefix False)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    i = t // t_initial
    t_i = t_initial
    t_curr = t - t_initial * i
    gamma = decay_rate ** i
    lo, hi = lr_min * gamma, base * gamma
    if cycle_limit == 0 or (cycle_limit > 0 and i < cycle_limit):
        return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t_curr / t_i))
    return lr_min


def _official_runner(base, sched, epochs_run):
    """The official Point-MAE runner: the scheduler sets ``warmup_lr_init`` when built and is stepped with
    the epoch index at the end of every epoch; returns the rate each epoch trains at."""
    kw = sched["kwargs"]
    lr, out = kw["warmup_lr_init"], []
    for epoch in range(epochs_run):
        out.append(lr)
        lr = _timm_045_reference(epoch, base, kw["epochs"], kw["initial_epochs"], kw["min_lr"], kw["warmup_lr_init"])
    return out


TIMM = {"type": "CosLR", "kwargs": {"epochs": 300, "initial_epochs": 10, "min_lr": 1e-6, "warmup_lr_init": 1e-6,
                                    "curve": "timm"}}
MAE = {"type": "CosLR", "kwargs": {**TIMM["kwargs"], "curve": "mae"}}


@pytest.mark.parametrize("t", [0, 1, 5, 9, 10, 11, 75, 150, 225, 299, 300, 301, 350])
def test_timm_curve_equals_timm_045_at_every_step(t):
    got = timm_cosine_lr(t, 1e-3, 300, 10, 1e-6, 1e-6)
    assert got == pytest.approx(_timm_045_reference(t, 1e-3, 300, 10, 1e-6, 1e-6), rel=1e-12, abs=1e-15)


def test_timm_curve_values_against_the_formula():
    # the cosine runs from step 0: half-way at 150 of 300, a quarter at 225 (no floor, no warm-up init)
    assert timm_cosine_lr(150, 1.0, 300, 10, 0.0, 0.0) == pytest.approx(0.5, abs=1e-12)
    assert timm_cosine_lr(75, 1.0, 300, 10, 0.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert timm_cosine_lr(225, 1.0, 300, 10, 0.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))
    # the warm-up replaces the start: step 5 of a 10-step warm-up is half-way from warmup_lr_init
    assert timm_cosine_lr(5, 1.0, 300, 10, 0.0, 0.2) == pytest.approx(0.6)
    # step 10 is already on the cosine from 0, slightly under the peak
    assert timm_cosine_lr(10, 1.0, 300, 10, 0.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 300)))
    assert timm_cosine_lr(300, 1.0, 300, 10, 1e-6, 0.0) == 1e-6
    # Point-M2AE: cosine over 400 while training stops at 300: the last trained step 299 is far from the floor
    assert timm_cosine_lr(299, 1.0, 400, 10, 0.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 299 / 400)))


def test_timm_curve_is_the_official_runner_epoch_by_epoch():
    ref = _official_runner(1e-3, TIMM, 300)
    for epoch, want in enumerate(ref):
        for frac in (0.0, 0.37, 0.999):  # constant within an epoch
            assert lr_at(epoch + frac, 1e-3, TIMM) == pytest.approx(want, rel=1e-12), (epoch, frac)
    # the one-epoch lag of the end-of-epoch step: epoch 151 trains at step 150's rate, 0.500 of the base
    assert lr_at(151.5, 1.0, {**TIMM, "kwargs": {**TIMM["kwargs"], "min_lr": 0.0}}) == pytest.approx(0.5)
    assert lr_at(0.5, 1e-3, TIMM) == lr_at(1.5, 1e-3, TIMM) == 1e-6


def test_mae_curve_stays_the_default_and_differs_from_timm():
    no_curve = {"type": "CosLR", "kwargs": {k: v for k, v in TIMM["kwargs"].items() if k != "curve"}}
    for e in (0.0, 0.5, 3.25, 10.0, 150.0, 200.7, 299.9):
        assert lr_at(e, 1e-3, no_curve) == lr_at(e, 1e-3, MAE)
    # MAE: cosine over the 290 epochs after the warm-up; at epoch 150 of 300 that is 0.527 of the base
    progress = (150 - 10) / 290
    assert lr_at(150.0, 1.0, MAE) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert round(lr_at(150.0, 1.0, MAE), 3) == 0.527
    assert lr_at(5.0, 1.0, MAE) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)  # per iteration, no lag


def test_unknown_curve_is_a_config_error():
    with pytest.raises(ConfigError, match=r"scheduler\.kwargs\.curve: unknown value 'linear'; expected one of mae, timm"):
        lr_at(1.0, 1e-3, {"type": "CosLR", "kwargs": {"curve": "linear"}})


def test_paper_configs_name_their_official_curve():
    from utils.config import load_config
    timm_cfgs = ["cfgs/pretrain/point_mae.yaml", "cfgs/pretrain/point_m2ae.yaml", "cfgs/finetune/modelnet40.yaml",
                 "cfgs/finetune/m2ae_modelnet40.yaml", "cfgs/finetune/m2ae_scan_objbg.yaml",
                 "cfgs/finetune/fewshot_modelnet40.yaml", "cfgs/finetune/m2ae_fewshot_modelnet40.yaml"]
    mae_cfgs = ["cfgs/pretrain/point_mae_gm3d.yaml", "cfgs/pretrain/point_m2ae_gm3d.yaml",
                "cfgs/pretrain/quickstart.yaml", "cfgs/pretrain/quickstart_m2ae.yaml"]
    for f in timm_cfgs:
        assert load_config(f)["scheduler"]["kwargs"]["curve"] == "timm", f
    for f in mae_cfgs:
        assert load_config(f)["scheduler"]["kwargs"]["curve"] == "mae", f
