"""Layer-wise lr decay (optimizer.layer_decay): the parameter -> layer -> scale map of both backbones'
classifiers against hand-written expectations, its groups, the schedule and a resume keeping the scales,
off = today's groups, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.base import Classifier
from models.classifier import PointTransformer
from models.point_m2ae_cls import PointM2AEModelNet40
from tools.engine.optim import build_optimizer, layer_scales, lr_at, param_groups, set_lr
from utils.errors import ConfigError

D = 0.75


def point_mae():
    torch.manual_seed(0)
    return PointTransformer(trans_dim=48, depth=2, num_heads=3, encoder_dims=48, group_size=8, num_group=16, cls_dim=4)


def point_m2ae():
    torch.manual_seed(0)
    return PointM2AEModelNet40(group_sizes=[8, 8, 8], num_groups=[32, 16, 8], encoder_depths=[1, 2, 1],
                               encoder_dims=[24, 48, 48], local_radius=[0.32, 0.64, 1.28], num_heads=3, cls_dim=4)


def expected(name: str, table: list[tuple[str, int]]) -> int:
    for prefix, layer in table:            # written by hand, first match wins
        if name == prefix or name.startswith(prefix + "."):
            return layer
    raise AssertionError(f"no expectation for {name}")


# depth 2: L = 2
MAE_TABLE = [("cls_token", 0), ("cls_pos", 0), ("encoder", 0), ("pos_embed", 0), ("blocks.blocks.0", 1),
             ("blocks.blocks.1", 2), ("norm", 2), ("cls_head_finetune", 2)]
# stages of 1, 2, 1 blocks: L = 4; a stage's merging / positional MLP sit at the layer of the block before it
M2AE_TABLE = [("h_encoder.token_embed.0", 0), ("h_encoder.encoder_pos_embeds.0", 0),
              ("h_encoder.encoder_blocks.0.blocks.0", 1),
              ("h_encoder.token_embed.1", 1), ("h_encoder.encoder_pos_embeds.1", 1),
              ("h_encoder.encoder_blocks.1.blocks.0", 2), ("h_encoder.encoder_blocks.1.blocks.1", 3),
              ("h_encoder.token_embed.2", 3), ("h_encoder.encoder_pos_embeds.2", 3),
              ("h_encoder.encoder_blocks.2.blocks.0", 4), ("norm", 4), ("cls_head_finetune", 4)]


@pytest.mark.parametrize("build, table, L", [(point_mae, MAE_TABLE, 2), (point_m2ae, M2AE_TABLE, 4)],
                         ids=["point_mae", "point_m2ae"])
def test_scale_map_matches_the_hand_written_layers(build, table, L):
    model = build()
    assert model.lr_layers()[0] == L
    scales = layer_scales(model, D)
    names = [n for n, _ in model.named_parameters()]
    assert set(scales) == set(names)
    for name in names:
        layer = expected(name, table)
        assert scales[name] == (layer, pytest.approx(D ** (L - layer), rel=1e-15)), name
    assert scales[names[-1]][1] == 1.0                      # the head's last layer trains at the schedule's lr
    assert {layer for layer, _ in scales.values()} == set(range(L + 1))


def _cfg(decay=None, lr=1e-3, wd=0.05):
    cfg = {"type": "AdamW", "kwargs": {"lr": lr, "weight_decay": wd, "implementation": "for-loop"}}
    if decay is not None:
        cfg["layer_decay"] = decay
    return cfg


def test_groups_keep_the_no_decay_rule_and_hold_every_parameter_once():
    model = point_m2ae()
    opt = build_optimizer(model, _cfg(D))
    no_decay_ref = {id(p) for p in param_groups(model, 0.05)[0]["params"]}
    seen = []
    for g in opt.param_groups:
        seen += [id(p) for p in g["params"]]
        assert g["lr_scale"] == pytest.approx(D ** (4 - g["layer"]))
        assert all((id(p) in no_decay_ref) == (g["weight_decay"] == 0.0) for p in g["params"])
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert [(g["layer"], g["weight_decay"] > 0) for g in opt.param_groups] == sorted(
        (g["layer"], g["weight_decay"] > 0) for g in opt.param_groups)


def test_off_gives_todays_groups():
    model = point_mae()
    ref = param_groups(model, 0.05)
    for decay in (None, 1.0, 1):
        opt = build_optimizer(model, _cfg(decay))
        assert len(opt.param_groups) == 2
        for g, r in zip(opt.param_groups, ref):
            assert [id(p) for p in g["params"]] == [id(p) for p in r["params"]]
            assert g["weight_decay"] == r["weight_decay"] and "lr_scale" not in g and g["lr"] == 1e-3
        set_lr(opt, 3e-4)
        assert all(g["lr"] == 3e-4 for g in opt.param_groups)


def _ratios(opt):
    return [(g["lr"], g["lr_scale"]) for g in opt.param_groups]


def test_schedule_steps_keep_the_ratios_and_a_resume_keeps_the_configs_scales():
    model = point_mae()
    sched = {"type": "CosLR", "kwargs": {"epochs": 10, "initial_epochs": 1, "min_lr": 1e-6, "warmup_lr_init": 0.0}}
    opt = build_optimizer(model, _cfg(D))
    x = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(0))
    model.eval()
    for t in (0.25, 1.0, 3.5, 9.9):
        lr = lr_at(t, 1e-3, sched)
        set_lr(opt, lr)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(lr * D ** (2 - g["layer"]), rel=1e-12)
        model.logits(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    again = build_optimizer(model, _cfg(D))
    again.load_state_dict(state)
    set_lr(again, 5e-4)
    assert [g["lr"] for g in again.param_groups] == pytest.approx([5e-4 * D ** (2 - g["layer"]) for g in again.param_groups])
    other = build_optimizer(model, _cfg(0.5))          # same groups, another decay: the running config wins
    other.load_state_dict(state)
    set_lr(other, 5e-4)
    assert [g["lr"] for g in other.param_groups] == pytest.approx([5e-4 * 0.5 ** (2 - g["layer"]) for g in other.param_groups])
    assert other.state_dict()["state"].keys() == state["state"].keys()   # the moments came with it


def test_first_adam_step_moves_each_layer_by_its_scaled_lr():
    """Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): the embeddings move D^L of the head's step."""
    model = point_mae()
    opt = build_optimizer(model, _cfg(D, lr=1e-3, wd=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    x = torch.randn(4, 64, 3, generator=torch.Generator().manual_seed(0))
    out = model({"points": x, "label": torch.tensor([0, 1, 2, 3])})
    out["loss"].backward()
    opt.step()
    for name, p in model.named_parameters():
        if p.grad is None or p.grad.abs().max() < 1e-6:
            continue
        step = (p.detach() - before[name]).abs().max().item()
        assert step == pytest.approx(1e-3 * D ** (2 - expected(name, MAE_TABLE)), rel=1e-2), name


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, True, "0.75"])
def test_bad_value_names_the_key(bad):
    with pytest.raises(ConfigError, match=r"optimizer\.layer_decay"):
        build_optimizer(point_mae(), _cfg(bad))


@pytest.mark.parametrize("bad", ["0", "-0.1", "1.01"])
def test_bad_value_is_refused_at_config_load(bad):
    from utils.config import load_config

    with pytest.raises(ConfigError, match=r"optimizer\.layer_decay"):
        load_config("cfgs/finetune/quickstart_cls.yaml", [f"optimizer.layer_decay={bad}"])


class NoLayers(Classifier):
    cls_dim = 2

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)


@pytest.mark.parametrize("model", [NoLayers(), Plain()], ids=["contract_model_without_layers", "plain_module"])
def test_a_model_that_cannot_place_its_parameters_is_a_config_error(model):
    with pytest.raises(ConfigError, match=rf"optimizer\.layer_decay = 0\.75: model {type(model).__name__} does not"):
        build_optimizer(model, _cfg(D))
    build_optimizer(model, _cfg(1.0))                  # off: any model


def test_an_unplaced_parameter_is_named():
    model = point_mae()
    model.extra = nn.Linear(3, 3)                      # a module the layer rules do not know
    with pytest.raises(ConfigError, match=r"PointTransformer.*extra\.weight"):
        build_optimizer(model, _cfg(D))
