"""Point-MAE part segmentation: official key names, pre-trained encoder loading, propagation, contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.adapters import PointMAEAdapter
from models.build import MODELS
from models.point_mae import PointMAE
from models.point_mae_seg import PointMAESegmentation
from models.seg_common import three_nn_interpolate
from tests.helpers import TINY_TC, official_point_mae_keys
from tools.engine.checkpoint import atomic_save
from tools.tasks.pretrained import load_finetuned, load_pretrained_encoder
from utils.errors import CheckpointError, DataError

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
WB = ("weight", "bias")


def official_seg_head_keys() -> set[str]:
    """The official ``get_model(cls_dim=50)`` keys outside the encoder (segmentation/models/pt.py), by hand."""
    keys = {"label_conv.0.weight"} | {f"label_conv.1.{n}" for n in BN}
    keys |= {f"propagation_0.mlp_convs.{i}.{n}" for i in (0, 1) for n in WB}
    keys |= {f"propagation_0.mlp_bns.{i}.{n}" for i in (0, 1) for n in BN}
    keys |= {f"convs{i}.{n}" for i in (1, 2, 3) for n in WB}
    keys |= {f"bns{i}.{n}" for i in (1, 2) for n in BN}
    return keys


def tiny_seg(**kw) -> PointMAESegmentation:
    torch.manual_seed(0)
    args = dict(trans_dim=48, encoder_dims=48, depth=4, num_heads=3, num_group=16, group_size=8,
                fetch_layers=(1, 2, 3), fp_mlp=(64, 48), head_dims=(64, 32))
    args.update(kw)
    return PointMAESegmentation(**args)


def tiny_mae(depth=4) -> PointMAE:
    torch.manual_seed(1)
    return PointMAE(group_size=8, num_group=16, transformer_config={**TINY_TC, "depth": depth})


def test_official_key_names_and_shapes():
    model = MODELS.get("Point_MAE_Seg")()                       # the official 384 x 12, 128 x 32, 50 parts
    assert MODELS.get("pt") is MODELS.get("PointMAE_Seg") is PointMAESegmentation
    sd = model.state_dict()
    encoder = {k[len("MAE_encoder."):] for k in official_point_mae_keys() if k.startswith("MAE_encoder.")}
    assert set(sd) == encoder | official_seg_head_keys()
    assert PointMAEAdapter().finetune_new_keys(model) == official_seg_head_keys()
    shapes = {"label_conv.0.weight": (64, 16, 1), "propagation_0.mlp_convs.0.weight": (1536, 1155, 1),
              "propagation_0.mlp_convs.1.weight": (1024, 1536, 1), "convs1.weight": (512, 3392, 1),
              "convs2.weight": (256, 512, 1), "convs3.weight": (50, 256, 1), "bns1.weight": (512,),
              "bns2.weight": (256,)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


def fake_official_pretrain(path: Path, mae: PointMAE) -> dict:
    sd = {f"module.{k}": v.clone() for k, v in mae.state_dict().items()}
    atomic_save({"base_model": sd, "optimizer": {}, "epoch": 300}, path)
    return sd


def test_official_pretrain_loads_with_exactly_the_head_missing(tmp_path):
    sd = fake_official_pretrain(tmp_path / "pretrain.pth", tiny_mae())
    model = tiny_seg()
    info = load_pretrained_encoder(model, tmp_path / "pretrain.pth")
    assert set(info["missing"]) == official_seg_head_keys()
    mine = model.state_dict()
    n = 0
    for k, v in sd.items():
        if k.startswith("module.MAE_encoder."):
            torch.testing.assert_close(mine[k[len("module.MAE_encoder."):]], v)
            n += 1
    assert info["n_encoder"] == n and n > 0


@pytest.mark.parametrize("source", ["student", "ema"])
def test_project_gm3d_run_loads(tmp_path, source):
    from models.gm3d import PointMAEGM3D

    torch.manual_seed(2)
    gm = PointMAEGM3D(group_size=8, num_group=16, transformer_config={**TINY_TC, "depth": 4},
                      gm3d={"gc_decoder_depth": 1})
    atomic_save({"base_model": gm.state_dict(), "model_name": "PointMAEGM3D", "epoch": 3}, tmp_path / "gm.pth")
    model = tiny_seg()
    info = load_pretrained_encoder(model, tmp_path / "gm.pth", source=source)
    assert set(info["missing"]) == official_seg_head_keys()
    prefix = "ema.MAE_encoder." if source == "ema" else "MAE_encoder."
    key = "blocks.blocks.3.attn.qkv.weight"
    torch.testing.assert_close(model.state_dict()[key], gm.state_dict()[prefix + key])


def test_wrong_depth_fails_naming_the_keys(tmp_path):
    fake_official_pretrain(tmp_path / "pretrain.pth", tiny_mae(depth=2))
    with pytest.raises(CheckpointError, match="blocks.blocks.2"):
        load_pretrained_encoder(tiny_seg(), tmp_path / "pretrain.pth")


def test_seg_checkpoint_round_trips_strictly(tmp_path):
    src = tiny_seg()
    atomic_save({"model_state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 5},
                tmp_path / "best_model.pth")                       # the official seg checkpoint layout
    dst = tiny_seg()
    torch.manual_seed(9)
    for p in dst.parameters():
        p.data.normal_()
    load_finetuned(dst, tmp_path / "best_model.pth")
    x, c = torch.rand(2, 64, 3), torch.tensor([1, 2])
    src.eval(), dst.eval()
    torch.testing.assert_close(src.seg_logits(x, c), dst.seg_logits(x, c))


def test_three_nn_interpolation_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    xyz, known, feats = torch.rand(2, 20, 3, generator=g), torch.rand(2, 6, 3, generator=g), torch.randn(2, 6, 5, generator=g)
    got = three_nn_interpolate(xyz, known, feats)
    for b in range(2):
        for n in range(20):
            d = ((known[b] - xyz[b, n]) ** 2).sum(-1)
            idx = d.argsort()[:3]
            w = 1.0 / (d[idx] + 1e-8)
            torch.testing.assert_close(got[b, n], (feats[b, idx] * (w / w.sum())[:, None]).sum(0))
    assert torch.equal(three_nn_interpolate(xyz, known[:, :1], feats[:, :1]), feats[:, :1].expand(2, 20, 5))


def test_forward_contract_gradients_and_category_embedding():
    model = tiny_seg(num_parts=7, num_categories=3)
    x = torch.rand(4, 96, 3)
    batch = {"points": x, "seg": torch.randint(0, 7, (4, 96)), "category": torch.tensor([0, 1, 2, 1])}
    out = model(batch)
    assert set(out) == {"loss", "acc"} and out["loss"].requires_grad
    out["loss"].backward()
    for name in ("encoder.first_conv.0.weight", "blocks.blocks.1.attn.qkv.weight", "label_conv.0.weight",
                 "propagation_0.mlp_convs.0.weight", "convs3.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    # blocks after the last fetched layer get no gradient: depth 4 with fetch (1, 2) leaves block 3 unused
    m2 = tiny_seg(fetch_layers=(1, 2))
    m2(batch | {"seg": batch["seg"] % 7})["loss"].backward()
    assert m2.blocks.blocks[3].attn.qkv.weight.grad is None
    model.eval()
    a = model.seg_logits(x[:1], torch.tensor([0]))
    b = model.seg_logits(x[:1], torch.tensor([2]))
    assert a.shape == (1, 96, 7) and not torch.allclose(a, b)


def test_bad_input_is_named():
    model = tiny_seg(num_parts=7, num_categories=3)
    x = torch.rand(2, 64, 3)
    with pytest.raises(DataError, match=r"object categories span \[0, 3\] but the segmentation model has "
                                        r"num_categories=3"):
        model.seg_logits(x, torch.tensor([0, 3]))
    with pytest.raises(DataError, match=r"part labels span \[0, 9\] but the model predicts num_parts=7"):
        model({"points": x, "seg": torch.tensor([[0] * 63 + [9]] * 2), "category": torch.tensor([0, 1])})
    with pytest.raises(DataError, match="fewer than num_group=16"):
        model.seg_logits(torch.rand(2, 10, 3), torch.tensor([0, 1]))
