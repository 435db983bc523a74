"""Optimizer construction (no-decay rule, implementations) and the per-iteration schedule."""

import copy
import math

import pytest
import torch
from torch import nn

from tools.engine.optim import build_optimizer, lr_at, param_groups
from utils.errors import ConfigError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.norm(self.fc(x + self.cls_token)).square().mean()


def test_param_groups_follow_the_official_no_decay_rule():
    m = Tiny()
    no_decay, decay = param_groups(m, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m.cls_token), id(m.fc.bias), id(m.norm.weight),
                                                    id(m.norm.bias)}


def _train(impl: str, steps: int = 4) -> tuple[torch.optim.Optimizer, nn.Module]:
    torch.manual_seed(0)
    m = Tiny()
    opt = build_optimizer(m, {"type": "AdamW", "kwargs": {"lr": 1e-2, "weight_decay": 0.05,
                                                         "implementation": impl}})
    x = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        m(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt, m


def test_auto_picks_the_fused_kernel_on_cpu():
    opt, _ = _train("auto", steps=0)
    assert opt.defaults["fused"] is True
    assert _train("for-loop", steps=0)[0].defaults["foreach"] is False


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_implementations_agree_with_the_for_loop_update(impl):
    _, ref = _train("for-loop")
    _, got = _train(impl)
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ref.fc.weight, Tiny().fc.weight)  # it did train


def test_fused_optimizer_state_round_trips_through_a_checkpoint():
    opt, m = _train("fused", steps=2)
    m2 = copy.deepcopy(m)
    opt2 = build_optimizer(m2, {"type": "AdamW", "kwargs": {"lr": 1e-2, "weight_decay": 0.05}})
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    x = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(2))
    for model, o in ((m, opt), (m2, opt2)):
        model(x).backward()
        o.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_unknown_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optimizer\.kwargs\.implementation: unknown value 'fast'"):
        build_optimizer(Tiny(), {"type": "AdamW", "kwargs": {"lr": 1e-3, "implementation": "fast"}})


def test_schedule_warms_up_linearly_then_follows_the_half_cosine():
    sched = {"type": "CosLR", "kwargs": {"epochs": 10, "initial_epochs": 2, "min_lr": 1e-6,
                                         "warmup_lr_init": 1e-6}}
    assert lr_at(0.0, 1e-3, sched) == pytest.approx(1e-6)
    assert lr_at(1.0, 1e-3, sched) == pytest.approx((1e-6 + 1e-3) / 2)
    assert lr_at(2.0, 1e-3, sched) == pytest.approx(1e-3)
    assert lr_at(6.0, 1e-3, sched) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(10.0, 1e-3, sched) == pytest.approx(1e-6)
    assert lr_at(12.0, 1e-3, sched) == pytest.approx(1e-6)
    assert lr_at(5.0, 1e-3, {"type": "constant"}) == 1e-3
