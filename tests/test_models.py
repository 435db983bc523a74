import pytest
import torch

from models import MASKS, MODELS, build_model
from models.point_mae import PointMAE
from tests.helpers import TINY_TC, official_point_mae_keys
from utils.errors import ConfigError


def tiny_mae(**tc):
    return PointMAE(group_size=8, num_group=16, transformer_config={**TINY_TC, **tc})


def test_state_dict_keys_and_shapes_equal_official():
    model = PointMAE()  # paper size
    sd = model.state_dict()
    assert set(sd) == official_point_mae_keys()
    assert sd["mask_token"].shape == (1, 1, 384)
    assert sd["MAE_encoder.encoder.second_conv.3.weight"].shape == (384, 512, 1)
    assert sd["MAE_encoder.blocks.blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert sd["MAE_encoder.blocks.blocks.11.mlp.fc1.weight"].shape == (1536, 384)
    assert sd["increase_dim.0.weight"].shape == (96, 384, 1)
    assert "MAE_encoder.blocks.blocks.0.attn.qkv.bias" not in sd


@pytest.mark.parametrize("mask_type", ["rand", "block"])
def test_forward_backward_every_parameter_gets_gradient(mask_type):
    torch.manual_seed(0)
    model = tiny_mae(mask_type=mask_type)
    out = model({"points": torch.randn(3, 128, 3)}, generator=torch.Generator().manual_seed(0))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


def test_embed_visible_only_matches_embed_all_in_eval():
    torch.manual_seed(0)
    model = tiny_mae().eval()
    p = model.group(torch.randn(2, 128, 3))
    mask = MASKS.get("random")(0.6)(p.center, generator=torch.Generator().manual_seed(1))
    a = model.MAE_encoder(p.neighborhood, p.center, mask)
    model.MAE_encoder.embed_visible_only = False
    b = model.MAE_encoder(p.neighborhood, p.center, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.shape == (2, 16 - int(0.6 * 16), 48)


def test_registry_names_and_config_errors():
    assert {"PointMAE", "Point_MAE", "PointMAE_GM3D"} <= set(MODELS.list())
    m = build_model({"NAME": "Point_MAE", "group_size": 8, "num_group": 16, "transformer_config": TINY_TC})
    assert isinstance(m, PointMAE)
    with pytest.raises(ConfigError, match="unknown key 'num_groups'"):
        build_model({"NAME": "Point_MAE", "num_groups": 16})
    with pytest.raises(ConfigError, match="transformer_config.*unknown key 'mask_ratoi'"):
        build_model({"NAME": "Point_MAE", "transformer_config": {"mask_ratoi": 0.6}})
    with pytest.raises(ConfigError, match="key 'num_group' has value '64'"):
        build_model({"NAME": "Point_MAE", "num_group": "64"})
    with pytest.raises(ConfigError, match="unknown models NAME 'PointBERT'"):
        build_model({"NAME": "PointBERT"})


def test_extract_features_shape_and_determinism():
    model = tiny_mae().eval()
    x = torch.randn(4, 128, 3)
    f1, f2 = model.extract_features(x), model.extract_features(x)
    assert f1.shape == (4, 48)
    torch.testing.assert_close(f1, f2)


def test_svm_C_selection_uses_train_features_only():
    import numpy as np

    from tools.tasks.svm import linear_svm_accuracy, select_C

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 8)) * 0.01 + np.eye(3)[y] @ rng.normal(size=(3, 8)) * 0.02  # tiny scale
    assert select_C(x, y, [0.01, 1000.0]) == 1000.0  # C=0.01 under-fits features this small
    assert linear_svm_accuracy(x, y, x, y, C=1000.0) > linear_svm_accuracy(x, y, x, y, C=0.01)
    assert linear_svm_accuracy(x, y, x, y, C=0.01, standardize=True) > 90.0
