"""Point-M2AE part segmentation: official key names and shapes, pre-trained encoder loading, head layout,
forward contract."""

from __future__ import annotations

import pytest
import torch

from models.adapters import PointM2AEAdapter
from models.build import MODELS
from models.point_m2ae import PointM2AE, PointM2AEGM3D
from models.point_m2ae_cls import PointM2AEModelNet40
from models.point_m2ae_seg import PointM2AESegmentation
from models.seg_common import three_nn_interpolate
from tests.test_point_m2ae import BN, TINY, official_ckpt, official_m2ae_encoder_keys
from tools.engine.checkpoint import atomic_save
from tools.tasks.pretrained import load_finetuned, load_pretrained_encoder
from utils.errors import CheckpointError, ConfigError, DataError

WB = ("weight", "bias")
ENC = {k: v for k, v in TINY.items() if not k.startswith("decoder")}
SEG_TINY = dict(fp_mlp=(40, 32), head_dims=(48, 32, 16))


def official_seg_head_keys() -> set[str]:
    """The official ``Point_M2AE_SEG(cls_dim=50)`` keys outside ``h_encoder`` (segmentation/Point_M2AE_SEG.py),
    by hand: ``group_dividers`` hold no parameters."""
    keys = {"label_conv.0.weight"} | {f"label_conv.1.{n}" for n in BN}
    for s in (0, 1, 2):
        keys |= {f"propagations.{s}.mlp_convs.{i}.{n}" for i in (0, 1) for n in WB}
        keys |= {f"propagations.{s}.mlp_bns.{i}.{n}" for i in (0, 1) for n in BN}
    keys |= {f"convs{i}.{n}" for i in (1, 2, 3, 4) for n in WB}
    keys |= {f"bns{i}.{n}" for i in (1, 2, 3) for n in BN}
    return keys


def tiny_seg(**kw) -> PointM2AESegmentation:
    torch.manual_seed(0)
    return PointM2AESegmentation(**{**ENC, **SEG_TINY, **kw})


def clouds(B=3, N=96, seed=0):
    x = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1).amax(1).view(B, 1, 1)


def test_official_key_names_and_shapes():
    model = MODELS.get("Point_M2AE_Seg")()                     # the official [16,8,8] x [512,256,64], 50 parts
    assert MODELS.get("Point_M2AE_SEG") is MODELS.get("PointM2AE_Seg") is PointM2AESegmentation
    sd = model.state_dict()
    assert set(sd) == official_m2ae_encoder_keys(norms=True) | official_seg_head_keys()
    assert PointM2AEAdapter().finetune_new_keys(model) == official_seg_head_keys()
    shapes = {"label_conv.0.weight": (64, 16, 1), "convs1.weight": (1024, 6208, 1), "convs2.weight": (512, 1024, 1),
              "convs3.weight": (256, 512, 1), "convs4.weight": (50, 256, 1), "bns1.weight": (1024,),
              "bns2.weight": (512,), "bns3.weight": (256,)}
    for s, d in enumerate((96, 192, 384)):
        shapes[f"propagations.{s}.mlp_convs.0.weight"] = (1536, d + 3, 1)
        shapes[f"propagations.{s}.mlp_convs.1.weight"] = (1024, 1536, 1)
        shapes[f"h_encoder.encoder_norms.{s}.weight"] = (d,)
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


def test_official_pretrain_loads_with_exactly_the_head_missing(tmp_path):
    torch.manual_seed(1)
    mae = PointM2AE(**TINY)
    path = official_ckpt(tmp_path, mae)                        # module.-prefixed official layout
    model = tiny_seg()
    info = load_pretrained_encoder(model, path)
    assert set(info["missing"]) == official_seg_head_keys()
    mine, theirs = model.state_dict(), mae.state_dict()
    enc = [k for k in theirs if k.startswith("h_encoder.")]
    assert any(k.startswith("h_encoder.encoder_norms.") for k in enc)   # the seg model keeps the norms
    for k in enc:
        torch.testing.assert_close(mine[k], theirs[k])
    assert info["n_encoder"] == len(enc) == len([k for k in mine if k.startswith("h_encoder.")])


@pytest.mark.parametrize("source", ["student", "ema"])
def test_project_gm3d_run_loads(tmp_path, source):
    torch.manual_seed(2)
    gm = PointM2AEGM3D(**TINY, gm3d={"gc_decoder_depth": 1})
    sd = gm.state_dict()
    atomic_save({"base_model": sd, "model_name": "Point_M2AE_GM3D", "epoch": 3}, tmp_path / "gm.pth")
    model = tiny_seg()
    info = load_pretrained_encoder(model, tmp_path / "gm.pth", source=source)
    assert set(info["missing"]) == official_seg_head_keys()
    prefix = "ema." if source == "ema" else ""
    for key in ("h_encoder.encoder_blocks.2.blocks.0.attn.qkv.weight", "h_encoder.encoder_norms.1.weight"):
        torch.testing.assert_close(model.state_dict()[key], sd[prefix + key])


def test_finetuned_classifier_lacks_the_encoder_norms_and_is_refused(tmp_path):
    cls = PointM2AEModelNet40(**ENC)
    atomic_save({"base_model": cls.state_dict(), "epoch": 1}, tmp_path / "cls.pth")
    with pytest.raises(CheckpointError, match="encoder_norms"):
        load_pretrained_encoder(tiny_seg(), tmp_path / "cls.pth")


def test_wrong_width_fails_naming_the_key(tmp_path):
    torch.manual_seed(1)
    path = official_ckpt(tmp_path, PointM2AE(**TINY))
    with pytest.raises(CheckpointError, match="h_encoder"):
        load_pretrained_encoder(tiny_seg(encoder_dims=[12, 48, 96]), path)


def test_seg_checkpoint_round_trips_strictly(tmp_path):
    src = tiny_seg()
    atomic_save({"model_state_dict": src.state_dict(), "epoch": 5}, tmp_path / "best_model.pth")
    dst = tiny_seg()
    torch.manual_seed(9)
    for p in dst.parameters():
        p.data.normal_()
    load_finetuned(dst, tmp_path / "best_model.pth")     # encoder_norms without a decoder: a fine-tuned file
    x, c = clouds(2), torch.tensor([1, 2])
    src.eval(), dst.eval()
    torch.testing.assert_close(src.seg_logits(x, c), dst.seg_logits(x, c))


def reference_logits(model: PointM2AESegmentation, x: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
    """The head written out step by step (eval mode): per stage norm -> 3-NN propagation with the xyz skip;
    the global feature [max + mean ; label] first, then the per-point features."""
    centers, tokens = model.stage_features(x)
    per = []
    for prop, c, t in zip(model.propagations, centers, tokens):
        h = torch.cat([x, three_nn_interpolate(x, c, t)], -1).transpose(1, 2)
        for conv, bn in zip(prop.mlp_convs, prop.mlp_bns):
            h = torch.relu(bn(conv(h)))
        per.append(h)
    f = torch.cat(per, 1)
    onehot = torch.zeros(x.shape[0], model.num_categories, 1)
    onehot[torch.arange(x.shape[0]), category, 0] = 1.0
    lab = model.label_conv(onehot)
    N = x.shape[1]
    g = torch.cat([(f.max(2)[0] + f.mean(2)).unsqueeze(-1).repeat(1, 1, N), lab.repeat(1, 1, N)], 1)
    h = torch.cat([g, f], 1)
    for conv, bn in ((model.convs1, model.bns1), (model.convs2, model.bns2), (model.convs3, model.bns3)):
        h = torch.relu(bn(conv(h)))
    return model.convs4(h).permute(0, 2, 1)


def test_logits_match_the_step_by_step_head_and_global_part_comes_first():
    model = tiny_seg(num_parts=7, num_categories=3).eval()
    x, c = clouds(2), torch.tensor([0, 2])
    torch.testing.assert_close(model.seg_logits(x, c), reference_logits(model, x, c))
    # the tokens of each stage go through that stage's own LayerNorm
    _, tokens = model.stage_features(x)
    assert [t.shape[-1] for t in tokens] == ENC["encoder_dims"]
    with torch.no_grad():
        model.h_encoder.encoder_norms[0].bias.add_(1.0)
    assert not torch.allclose(model.stage_features(x)[1][0], tokens[0])
    # zero the convs1 columns that read the per-point features: what is left is the same at every point
    F_ = sum(p.out_channels for p in model.propagations)
    with torch.no_grad():
        model.convs1.weight[:, F_ + 64:] = 0
    out = model.seg_logits(x, c)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))


def test_forward_contract_gradients_and_category_embedding():
    model = tiny_seg(num_parts=7, num_categories=3)
    x = clouds(4)
    batch = {"points": x, "seg": torch.randint(0, 7, (4, 96)), "category": torch.tensor([0, 1, 2, 1])}
    out = model(batch)
    assert set(out) == {"loss", "acc"} and out["loss"].requires_grad
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    model.eval()
    a = model.seg_logits(x[:1], torch.tensor([0]))
    b = model.seg_logits(x[:1], torch.tensor([2]))
    assert a.shape == (1, 96, 7) and not torch.allclose(a, b)


def test_bad_input_and_config_are_named():
    model = tiny_seg(num_parts=7, num_categories=3)
    x = clouds(2)
    with pytest.raises(DataError, match=r"object categories span \[0, 3\] but the segmentation model has "
                                        r"num_categories=3"):
        model.seg_logits(x, torch.tensor([0, 3]))
    with pytest.raises(DataError, match=r"part labels span \[0, 9\] but the model predicts num_parts=7"):
        model({"points": x, "seg": torch.tensor([[0] * 95 + [9]] * 2), "category": torch.tensor([0, 1])})
    with pytest.raises(DataError, match=r"clouds have 20 points, fewer than num_groups\[0\]=32"):
        model.seg_logits(torch.rand(2, 20, 3), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=r"head_dims must have 3 widths .* got \[8, 8\]"):
        tiny_seg(head_dims=(8, 8))
    with pytest.raises(ConfigError, match=r"Point_M2AE_Seg.encoder_dims has 2 entries"):
        tiny_seg(encoder_dims=[24, 48])
