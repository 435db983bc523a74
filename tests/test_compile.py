"""``compile.enabled``: the compiled training forward gives the eager loss and gradients (CPU), and the engine
trains through it with the plain module's checkpoint keys."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from models.point_mae import PointMAE
from tests.helpers import TINY_TC
from tests.test_gm3d import gm3d, official_teacher_ckpt  # noqa: F401  (fixture)
from tools.engine.trainer import Trainer, compile_forward
from utils.config import load_config
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Tracing a whole model takes dynamo minutes on a 2-core CPU, past CI's budget: the model-level tests run
# when GEOMASK3D_COMPILE_TESTS=1 (bench/gpu_session.sh sets it); the engine test below always runs.
model_level = pytest.mark.skipif(not os.environ.get("GEOMASK3D_COMPILE_TESTS"),
                                 reason="model-level torch.compile tests: set GEOMASK3D_COMPILE_TESTS=1")
# Compiled kernels reorder float sums; this is far above that rounding and far below any real difference.
RTOL, ATOL = 1e-4, 1e-5


def _mae() -> PointMAE:
    torch.manual_seed(0)
    return PointMAE(group_size=8, num_group=16, transformer_config={**TINY_TC, "drop_path_rate": 0.0})


def _loss_and_grads(model: torch.nn.Module, forward, epoch: int = 0) -> tuple[dict, dict]:
    torch.manual_seed(7)  # the same global stream for both runs (drop path, BatchNorm-free draws)
    points = torch.randn(4, 128, 3, generator=torch.Generator().manual_seed(0))
    out = forward({"points": points}, epoch=epoch, generator=torch.Generator().manual_seed(3))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}, grads


def assert_compiled_equals_eager(model: torch.nn.Module, backend: str, epoch: int = 0) -> None:
    twin = copy.deepcopy(model)
    eager_out, eager_grads = _loss_and_grads(model, model, epoch)
    compiled = compile_forward(twin, {"enabled": True, "backend": backend})
    assert compiled is not twin
    out, grads = _loss_and_grads(twin, compiled, epoch)
    assert out.keys() == eager_out.keys() and grads.keys() == eager_grads.keys()
    for k in out:
        torch.testing.assert_close(out[k], eager_out[k], rtol=RTOL, atol=ATOL)
    for n in grads:
        torch.testing.assert_close(grads[n], eager_grads[n], rtol=RTOL, atol=ATOL, msg=n)


# Tracing a whole model takes dynamo 30 s to minutes on a small shared CPU: the model-level equality
# tests are marked slow; the engine test below compiles a 3-parameter model in seconds.
@pytest.mark.slow
@model_level
def test_point_mae_compiled_aot_eager_equals_eager() -> None:
    assert_compiled_equals_eager(_mae().train(), "aot_eager")


@pytest.mark.slow
@model_level
def test_gm3d_compiled_aot_eager_equals_eager(official_teacher_ckpt) -> None:  # noqa: F811
    model = gm3d(teacher=official_teacher_ckpt).train()
    model.on_epoch_start(1, 2)  # the curriculum's second half: the teacher's scores choose part of the mask
    assert_compiled_equals_eager(model, "aot_eager", epoch=1)


@pytest.mark.slow
@model_level
def test_point_mae_compiled_inductor_equals_eager() -> None:
    """One real code-generating compile (C++ kernels with gcc); minutes on a small shared CPU."""
    assert_compiled_equals_eager(_mae().train(), "inductor")


def test_disabled_is_the_module_and_bad_specs_name_the_key() -> None:
    m = _mae()
    assert compile_forward(m, {"enabled": False}) is m and compile_forward(m, None) is m
    with pytest.raises(ConfigError, match=r"compile.backend = 'tvm'; expected one of inductor, aot_eager"):
        compile_forward(m, {"enabled": True, "backend": "tvm"})
    with pytest.raises(ConfigError, match=r"compile.mode = 'max-autotune' needs compile.backend = inductor"):
        compile_forward(m, {"enabled": True, "backend": "aot_eager", "mode": "max-autotune"})
    with pytest.raises(ConfigError, match=r"allowed: one of inductor, aot_eager, eager, cudagraphs"):
        load_config(REPO / "cfgs/pretrain/quickstart.yaml", ["compile.backend=tvm"])


class Tiny(torch.nn.Module):
    """A 3-parameter model with the engine's forward signature (compiles in seconds)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        torch.nn.init.constant_(self.lin.weight, 0.5)
        torch.nn.init.constant_(self.lin.bias, 0.1)

    def forward(self, batch, epoch=0, generator=None):
        return {"loss": self.lin(batch["points"]).square().mean()}


def test_engine_trains_through_the_compiled_forward(tmp_path: Path) -> None:
    overrides = ["max_epoch=2", "total_bs=4", "log.progress_bar=false", "log.tensorboard=false",
                 "eval.best_metric=null", "augment=[]"]
    data = [{"points": torch.randn(16, 3, generator=torch.Generator().manual_seed(i)),
             "label": torch.tensor(0)} for i in range(8)]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["compile.enabled=true", "compile.backend=aot_eager"])):
        cfg = load_config(REPO / "cfgs/pretrain/quickstart.yaml", overrides + extra)
        trainer = Trainer(cfg, Tiny(), data, tmp_path / name)
        assert (trainer.train_forward is trainer.model) == (name == "eager")
        runs[name] = trainer.fit()["last"]
    assert runs["compiled"]["train/loss"] == pytest.approx(runs["eager"]["train/loss"], rel=RTOL)
    saved = {n: torch.load(tmp_path / n / "ckpt-last.pth", weights_only=True)["base_model"] for n in runs}
    assert saved["compiled"].keys() == Tiny().state_dict().keys()  # no "_orig_mod." prefix
    for key, value in saved["eager"].items():
        torch.testing.assert_close(saved["compiled"][key], value, rtol=RTOL, atol=ATOL)
