"""Registry-wide model test: every registered model, built from its shipped config at a tiny size, runs
forward + backward on the CPU through the contract of ``models/base.py``; every mask strategy too.

A new backbone or head is picked up here by its registration and its config: nothing to add to this file
unless its config uses keys that :func:`shrink` does not know how to make small.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import MASKS, MODELS, build_model
from models.base import Classifier, MaskedAutoencoder, SegmentationModel
from models.gm3d import GM3D
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
N_POINTS = 256

# key -> tiny value (ints), applied at any depth of a model section
TINY_INT = {"trans_dim": 32, "encoder_dims": 32, "depth": 1, "num_heads": 2, "decoder_depth": 1,
            "decoder_num_heads": 2, "num_group": 16, "group_size": 8, "gc_decoder_depth": 1}
# list-valued keys of multi-scale backbones (three scales, two decoder stages)
TINY_LIST = {"num_groups": [64, 32, 16], "group_sizes": [8, 4, 4], "encoder_dims": [16, 32, 64],
             "encoder_depths": [1, 1, 1], "decoder_dims": [64, 32], "decoder_depths": [1, 1],
             "decoder_up_blocks": [1, 1]}


def shrink(node):
    """A copy of a model section with every size key made tiny."""
    if isinstance(node, dict) and "fetch_layers" in node:  # heads that read several encoder blocks
        return {**shrink({k: v for k, v in node.items() if k != "fetch_layers"}), "depth": 3,
                "fetch_layers": [0, 1, 2]}
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if isinstance(v, list) and k in TINY_LIST and len(v) == len(TINY_LIST[k]):
                out[k] = list(TINY_LIST[k])
            elif isinstance(v, int) and not isinstance(v, bool) and k in TINY_INT:
                out[k] = TINY_INT[k]
            else:
                out[k] = shrink(v)
        return out
    return node


def shipped_configs() -> dict[str, list[Path]]:
    """model NAME -> the shipped configs that build it."""
    out: dict[str, list[Path]] = {}
    for path in sorted((ROOT / "cfgs").rglob("*.yaml")):
        if "_base_" in path.parts or "dataset_configs" in path.parts or "reproduce" in path.parts:
            continue  # run configs only: the studies of cfgs/reproduce/ are checked by tests/test_reproduce.py
        cfg = load_config(path)
        name = (cfg.to_dict().get("model") or {}).get("NAME")
        if name:
            out.setdefault(name, []).append(path)
    return out


CONFIGS = shipped_configs()


def model_classes() -> set[type]:
    return {MODELS.get(n) for n in MODELS.list()}


def tiny_model(model_cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(shrink(model_cfg))
    teacher = getattr(model, "knowledge_teacher", None)
    if teacher is not None:  # a run checkpoint or the builder would load it; here: its own random weights
        teacher.load_state_dict(teacher.state_dict())
    return model


def batch_for(model: torch.nn.Module, B: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {"points": torch.randn(B, N_POINTS, 3, generator=g) * 0.5}
    if isinstance(model, Classifier):
        batch["label"] = torch.randint(0, model.cls_dim, (B,), generator=g)
    if isinstance(model, SegmentationModel):
        batch["category"] = torch.zeros(B, dtype=torch.long)
        batch["seg"] = torch.randint(0, model.num_parts, (B, N_POINTS), generator=g)
    return batch


def run_step(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.train()
    model.on_epoch_start(1, 2)
    out = model(batch_for(model), epoch=1, generator=torch.Generator().manual_seed(0))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]), out
    out["loss"].backward()
    model.after_step()
    return out


def test_every_registered_model_has_a_shipped_config():
    covered = {MODELS.get(n) for n in CONFIGS}
    missing = sorted(c.__name__ for c in model_classes() - covered if not c.__module__.startswith("tests."))
    assert not missing, f"registered models with no config under cfgs/: {missing}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_from_its_shipped_config_runs_forward_and_backward(name):
    path = CONFIGS[name][0]
    model = tiny_model(load_config(path).to_dict()["model"])
    assert isinstance(model, (MaskedAutoencoder, Classifier, SegmentationModel)), type(model)
    assert type(model).ARCH, f"{type(model).__name__} declares no checkpoint adapter (ARCH)"
    run_step(model)
    frozen = ("ema.", "knowledge_teacher.")
    unread = model.params_without_grad() if isinstance(model, MaskedAutoencoder) else ()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
               and not n.startswith(frozen + unread)]
    assert not no_grad, f"{path.name}: parameters without a gradient: {no_grad[:8]}"
    if isinstance(model, MaskedAutoencoder):
        feats = model.eval().extract_features(batch_for(model)["points"])
        assert feats.ndim == 2 and feats.shape[0] == 4 and torch.isfinite(feats).all()


def pretraining_models() -> list[tuple[str, dict]]:
    """(config name, model section) of every shipped plain (non-GM3D) pre-training config, one per NAME."""
    out = []
    for name, paths in sorted(CONFIGS.items()):
        cls = MODELS.get(name)
        if issubclass(cls, MaskedAutoencoder) and not issubclass(cls, GM3D):
            out.append((paths[0].name, load_config(paths[0]).to_dict()["model"]))
    return out


@pytest.mark.parametrize("strategy", [n for n in MASKS.list()])
def test_every_mask_strategy_runs_and_masks_its_count(strategy):
    cls = MASKS.get(strategy)
    if cls.needs_scores:  # scored strategies run inside GM3D models
        gm3d = [n for n in CONFIGS if issubclass(MODELS.get(n), GM3D)]
        assert gm3d, f"no GM3D config exercises the scored strategy {strategy}"
        for n in gm3d:
            model = tiny_model(load_config(CONFIGS[n][0]).to_dict()["model"])
            assert type(model.masker) is cls
            run_step(model)
        return
    for cfg_name, section in pretraining_models():
        section = {**section, "mask": {**section.get("mask", {}), "strategy": strategy}}
        section.get("transformer_config", {}).pop("mask_type", None)
        model = tiny_model(section)
        assert type(model.masker) is cls, cfg_name
        centers = model.mask_centers(model.group(batch_for(model)["points"]))
        mask = model.masker(centers, generator=torch.Generator().manual_seed(0))
        G = centers.shape[1]
        assert (mask.sum(1) == model.masker.num_masked(G)).all(), cfg_name
        run_step(model)


def test_a_masking_comparison_masks_the_same_count_in_every_arm():
    """tools/compare_masking.py sets model.mask.count for every arm; without it the two official rules differ.
    Every arm's model, built from the arm's own overrides, hides exactly that many patches."""
    from types import SimpleNamespace

    from tools.compare_masking import ARMS, arm_overrides

    base = "cfgs/pretrain/quickstart.yaml"
    gm3d = ["model.NAME=Point_MAE_GM3D", "model.transformer_config.mask_type=gm3d"]
    counts = {}
    for rule in (None, "gm3d", "point_mae"):
        extra = [f"model.mask.count={rule}"] if rule else []
        for arm, opts in {"random": [], "gm3d": gm3d}.items():
            model = tiny_model(load_config(ROOT / base, [*opts, *extra]).to_dict()["model"])
            counts[rule, arm] = model.masker.num_masked(32)
    assert counts[None, "random"] == 19 and counts[None, "gm3d"] == 20   # int(0.6*32) vs 32 - int(32*0.4)
    assert counts["gm3d", "random"] == counts["gm3d", "gm3d"] == 20
    assert counts["point_mae", "random"] == counts["point_mae", "gm3d"] == 19
    args = SimpleNamespace(gm3d=["model.gm3d.gc_decoder_depth=1"])
    for rule, want in (("gm3d", 20), ("point_mae", 19)):
        for arm in ARMS:
            if arm == "random_eqtime":
                continue
            opts = arm_overrides(arm, args, [f"model.mask.count={rule}"], ROOT / "unused.pth", 20)
            model = tiny_model(load_config(ROOT / base, opts).to_dict()["model"])
            centers = torch.rand(2, 32, 3)
            mask = model.masker(centers, generator=torch.Generator().manual_seed(0), epoch=19,
                                scores=torch.rand(2, 32))
            assert (mask.sum(1) == want).all(), (arm, rule)


def test_unknown_mask_strategy_is_a_config_error_at_build_time():
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown mask strategy 'gmm3d'"):
        build_model({"NAME": "Point_MAE", "mask": {"strategy": "gmm3d"}})
    with pytest.raises(ConfigError, match="needs GC scores"):
        build_model({"NAME": "Point_MAE", "transformer_config": {"mask_type": "gm3d"}})
    with pytest.raises(ConfigError, match="disagrees"):
        build_model({"NAME": "Point_MAE", "mask": {"ratio": 0.7}, "transformer_config": {"mask_ratio": 0.6}})


def test_paper_configs_have_the_official_state_dict_keys():
    """Where an official key list exists (built by hand in the tests), the paper config gives exactly it."""
    from tests.helpers import official_point_mae_keys
    from tests.test_point_m2ae import official_m2ae_keys

    official = {"point_mae.yaml": official_point_mae_keys(), "point_m2ae.yaml": official_m2ae_keys()}
    for name, keys in official.items():
        model = build_model(load_config(ROOT / "cfgs/pretrain" / name).to_dict()["model"])
        assert set(model.state_dict()) == keys, name


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_runs_forward_and_backward_in_float64(name, float64_default):
    """Every registered model, built while float64 is the default dtype and fed float64 points, trains and
    evaluates in float64 end to end (loss, every gradient and the SVM feature stay float64)."""
    model = tiny_model(load_config(CONFIGS[name][0]).to_dict()["model"]).double()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    batch = batch_for(model)
    assert batch["points"].dtype == torch.float64
    model.train()
    model.on_epoch_start(1, 2)
    out = model(batch, epoch=1, generator=torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float64 and torch.isfinite(out["loss"]), name
    out["loss"].backward()
    model.after_step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {torch.float64}
    if isinstance(model, MaskedAutoencoder):
        feats = model.eval().extract_features(batch["points"])
        assert feats.dtype == torch.float64 and torch.isfinite(feats).all()
