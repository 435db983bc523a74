"""Point-M2AE: official keys, checkpoint layouts, multi-scale masking, local attention, classifiers, GM3D."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import MODELS, build_model
from models.point_m2ae import (PointM2AE, PointM2AEGM3D, StageBlocks, local_attention_bias, propagate_mask)
from models.point_m2ae_cls import PointM2AEModelNet40, PointM2AEScanObjectNN, smooth_ce
from tests.helpers import assert_ema_update, child_env
from tools.engine.checkpoint import CheckpointError, atomic_save
from tools.engine.builders import load_knowledge_teacher
from tools.tasks.pretrained import load_finetuned, load_pretrained_encoder, load_start_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = dict(group_sizes=[8, 4, 4], num_groups=[32, 16, 8], encoder_depths=[1, 1, 1], encoder_dims=[24, 48, 96],
            local_radius=[0.3, 0.6, 1.2], num_heads=3, decoder_depths=[1, 1], decoder_dims=[96, 48],
            decoder_up_blocks=[1, 1])
ENC_KEYS = ("group_sizes", "num_groups", "encoder_depths", "encoder_dims", "local_radius", "num_heads")
BLOCK = ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
         "mlp.fc2.weight", "mlp.fc2.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias"]
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def official_m2ae_encoder_keys(depths=(5, 5, 5), norms=True) -> set[str]:
    """``h_encoder.*`` of the official Point_M2AE (REFERENCE section 3.5), by hand."""
    keys = set()
    for s, depth in enumerate(depths):
        p = f"h_encoder.token_embed.{s}"
        for conv in ("first_conv", "second_conv"):
            keys |= {f"{p}.{conv}.{i}.{n}" for i in (0, 3) for n in ("weight", "bias")}
            keys |= {f"{p}.{conv}.1.{n}" for n in BN}
        keys |= {f"h_encoder.encoder_pos_embeds.{s}.{i}.{n}" for i in (0, 2) for n in ("weight", "bias")}
        keys |= {f"h_encoder.encoder_blocks.{s}.blocks.{i}.{b}" for i in range(depth) for b in BLOCK}
        if norms:
            keys |= {f"h_encoder.encoder_norms.{s}.weight", f"h_encoder.encoder_norms.{s}.bias"}
    return keys


def official_m2ae_keys() -> set[str]:
    """The official Point_M2AE pre-training state_dict keys (REFERENCE section 3.5), by hand."""
    keys = official_m2ae_encoder_keys() | {"mask_token", "decoder_norm.weight", "decoder_norm.bias",
                                          "rec_head.weight", "rec_head.bias"}
    for d in (0, 1):
        keys |= {f"h_decoder.{d}.blocks.0.{b}" for b in BLOCK}
        keys |= {f"decoder_pos_embeds.{d}.{i}.{n}" for i in (0, 2) for n in ("weight", "bias")}
    keys |= {"token_prop.0.fuse.net.0.weight", "token_prop.0.fuse.net.0.bias"}
    keys |= {f"token_prop.0.fuse.net.1.{n}" for n in BN}
    for net in ("net1", "net2"):
        keys |= {f"token_prop.0.extraction.operation.0.{net}.0.{n}" for n in ("weight", "bias")}
        keys |= {f"token_prop.0.extraction.operation.0.{net}.1.{n}" for n in BN}
    return keys


HEAD = {f"cls_head_finetune.{i}.{n}" for i in (0, 4, 8) for n in ("weight", "bias")} | {
    f"cls_head_finetune.{i}.{n}" for i in (1, 5) for n in BN}


def tiny(**kw) -> PointM2AE:
    torch.manual_seed(0)
    return PointM2AE(**{**TINY, **kw})


def clouds(B=3, N=128, seed=0):
    x = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1).amax(1).view(B, 1, 1)


def official_ckpt(tmp_path, model, name="pre-train.pth"):
    path = tmp_path / name
    atomic_save({"base_model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 299,
                 "metrics": {"acc": 0.0}}, path)
    return path


# ------------------------------------------------------------------------------------ keys and shapes
def test_state_dict_keys_and_shapes_equal_official():
    m = PointM2AE()
    sd = m.state_dict()
    assert set(sd) == official_m2ae_keys()
    shapes = {"mask_token": (1, 384), "rec_head.weight": (48, 192, 1),
              "token_prop.0.fuse.net.0.weight": (192, 576, 1),
              "token_prop.0.extraction.operation.0.net1.0.weight": (192, 192, 1),
              "h_encoder.token_embed.0.first_conv.0.weight": (128, 3, 1),
              "h_encoder.token_embed.0.second_conv.3.weight": (96, 512, 1),
              "h_encoder.token_embed.1.first_conv.0.weight": (96, 96, 1),
              "h_encoder.token_embed.1.second_conv.0.weight": (192, 192, 1),
              "h_encoder.token_embed.2.second_conv.0.weight": (384, 384, 1),
              "h_encoder.token_embed.2.second_conv.3.weight": (384, 384, 1),
              "h_encoder.encoder_pos_embeds.1.0.weight": (192, 3),
              "h_encoder.encoder_pos_embeds.1.2.weight": (192, 192),
              "h_encoder.encoder_blocks.0.blocks.4.attn.qkv.weight": (288, 96),
              "h_encoder.encoder_blocks.2.blocks.0.mlp.fc1.weight": (1536, 384),
              "h_encoder.encoder_norms.2.weight": (384,),
              "h_decoder.0.blocks.0.attn.qkv.weight": (1152, 384),
              "h_decoder.1.blocks.0.attn.qkv.weight": (576, 192),
              "decoder_pos_embeds.1.2.weight": (192, 192), "decoder_norm.weight": (192,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert not any(k.endswith("attn.qkv.bias") for k in sd)
    # stochastic depth linear over the 15 encoder blocks, and over the 2 decoder blocks
    rates = [b.drop_path.drop_prob for st in m.h_encoder.encoder_blocks for b in st.blocks]
    assert rates == pytest.approx([0.1 * i / 14 for i in range(15)])
    assert [st.blocks[0].drop_path.drop_prob for st in m.h_decoder] == pytest.approx([0.0, 0.1])


def test_classifier_keys_are_the_official_finetune_keys():
    enc = official_m2ae_encoder_keys(norms=False) | {"norm.weight", "norm.bias"} | HEAD
    mn, scan = PointM2AEModelNet40(), PointM2AEScanObjectNN()
    assert set(mn.state_dict()) == enc and set(scan.state_dict()) == enc
    assert mn.cls_head_finetune[0].in_features == 384 and mn.cls_head_finetune[8].out_features == 40
    assert scan.cls_head_finetune[0].in_features == 768 and scan.cls_head_finetune[8].out_features == 15
    assert mn.smooth == 0.3 and scan.smooth == 0.0


def test_registry_names_and_config_errors():
    assert {"Point_M2AE", "PointM2AE", "Point_M2AE_GM3D", "Point_M2AE_ModelNet40",
            "Point_M2AE_ScanObjectNN"} <= set(MODELS.list())
    from utils.errors import ConfigError
    with pytest.raises(ConfigError, match="decoder_dims=.*must equal the encoder widths"):
        build_model({"NAME": "Point_M2AE", **TINY, "decoder_dims": [96, 24]})
    with pytest.raises(ConfigError, match="group_sizes has 2 entries but num_groups has 3"):
        build_model({"NAME": "Point_M2AE", **{**TINY, "group_sizes": [8, 4]}})
    with pytest.raises(ConfigError, match="unknown key 'trans_dim'"):
        build_model({"NAME": "Point_M2AE_ScanObjectNN", "trans_dim": 384})


# ------------------------------------------------------------------------------------ checkpoints
def test_fake_official_pretrain_checkpoint_loads_strictly(tmp_path):
    src = tiny()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = official_ckpt(tmp_path, src)
    dst = tiny()
    assert load_start_checkpoint(dst, path)["loaded"] == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # into the fine-tune models: exactly the fresh norm and the head are missing, encoder_norms dropped
    for cls in (PointM2AEModelNet40, PointM2AEScanObjectNN):
        clf = cls(**{k: TINY[k] for k in ENC_KEYS}, cls_dim=5)
        info = load_pretrained_encoder(clf, path)
        assert set(info["missing"]) == {"norm.weight", "norm.bias"} | HEAD
        assert any("encoder_norms" in kind for kind in info["dropped"])
        for k, v in clf.state_dict().items():
            if k.startswith("h_encoder."):
                assert torch.equal(v, src.state_dict()[k]), k


def test_fake_official_finetune_checkpoint_loads_strictly_and_as_encoder(tmp_path):
    torch.manual_seed(3)
    src = PointM2AEScanObjectNN(**{k: TINY[k] for k in ENC_KEYS}, cls_dim=5)
    path = official_ckpt(tmp_path, src, "scan_obj-bg.pth")
    dst = PointM2AEScanObjectNN(**{k: TINY[k] for k in ENC_KEYS}, cls_dim=5)
    load_finetuned(dst, path)
    x = clouds(2, 128)
    src.eval(), dst.eval()
    torch.testing.assert_close(dst.logits(x), src.logits(x))
    info = load_pretrained_encoder(PointM2AEScanObjectNN(**{k: TINY[k] for k in ENC_KEYS}, cls_dim=5), path)
    assert set(info["missing"]) == HEAD  # norm comes from the fine-tuned file
    with pytest.raises(CheckpointError, match="pre-training checkpoint; --test needs a fine-tuned model"):
        load_finetuned(dst, official_ckpt(tmp_path, tiny()))


def test_point_mae_checkpoint_into_m2ae_classifier_names_it(tmp_path):
    from models.point_mae import PointMAE
    from tests.helpers import TINY_TC
    path = official_ckpt(tmp_path, PointMAE(group_size=8, num_group=16, transformer_config=TINY_TC), "mae.pth")
    clf = PointM2AEModelNet40(**{k: TINY[k] for k in ENC_KEYS})
    with pytest.raises(CheckpointError, match="no Point-M2AE encoder weights.*looks like a Point-MAE checkpoint"):
        load_pretrained_encoder(clf, path)


# ------------------------------------------------------------------------------------ forward / backward
def test_forward_backward_every_parameter_gets_gradient():
    m = tiny()
    out = m(clouds(), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "chamfer_l2"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    # the official objective never reads the first stage's LayerNorm (only scales 1 and 2 are decoded)
    unused = {"h_encoder.encoder_norms.0.weight", "h_encoder.encoder_norms.0.bias"}
    for n, p in m.named_parameters():
        if n in unused:
            assert p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_loss_is_mean_chamfer_of_masked_second_scale_tokens():
    m = tiny().eval()
    x = clouds()
    groups = m.group(x)
    mask = m.masker(groups[-1].center, generator=torch.Generator().manual_seed(1))
    enc = m.encode(groups, mask)
    _, dec = m.decode(groups, enc, mask)
    fine = enc.masks[1]
    terms = []
    for b in range(x.shape[0]):
        for t in range(fine.shape[1]):
            if fine[b, t]:
                pred = m.rec_head(dec[b, t].view(1, -1, 1)).view(-1, 3)      # 8 points (3 * group_sizes[0])
                gt = groups[1].neighborhood[b, t]                            # 4 points (group_sizes[1])
                d = torch.cdist(pred, gt).square()
                terms.append(d.min(1).values.mean() + d.min(0).values.mean())
    torch.testing.assert_close(m.fine_token_loss(groups, enc, dec)[0].mean(), torch.stack(terms).mean())
    assert pred.shape == (8, 3) and gt.shape == (4, 3)


# ------------------------------------------------------------------------------------ masking
def test_multiscale_mask_counts_and_children_of_masked_coarse_tokens():
    m = tiny()
    groups = m.group(clouds(4))
    mask = m.masker(groups[-1].center, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == int(0.8 * 8)).all()                                 # official int(r * G): 6 of 8
    masks = propagate_mask(mask, groups)
    for s in (2, 1):                                                           # brute force, per sample
        for b in range(4):
            visible_children = {int(i) for j in range(groups[s].idx.shape[1]) if not masks[s][b, j]
                                for i in groups[s].idx[b, j]}
            expect = torch.tensor([t not in visible_children for t in range(masks[s - 1].shape[1])])
            assert torch.equal(masks[s - 1][b], expect), (s, b)
            # a masked coarse token's children are masked unless a visible token also claims them
            for j in range(groups[s].idx.shape[1]):
                if masks[s][b, j]:
                    for i in groups[s].idx[b, j]:
                        assert bool(masks[s - 1][b, i]) == (int(i) not in visible_children)
    assert torch.equal(m.encode(groups, mask).masks[0], masks[0])
    # padded encoder tokens: each sample's visible count, visible indices in increasing order
    enc = m.encode(groups, mask)
    for s in range(3):
        assert torch.equal(enc.valid[s].sum(1), (~masks[s]).sum(1))
        for b in range(4):
            assert torch.equal(enc.index[s][b][enc.valid[s][b]], (~masks[s][b]).nonzero().view(-1))


def test_official_index0_quirk_unmasks_token_0_of_sample_0_and_the_fix_does_not():
    m = tiny()
    groups = m.group(clouds(2))
    # mask every coarse token of sample 0 but one whose group does not contain scale-1 token 0
    keep = next(j for j in range(8) if 0 not in groups[2].idx[0, j].tolist())
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, keep] = False
    mask[1, 0] = False
    fixed = propagate_mask(mask, groups, official_index0=False)
    quirk = propagate_mask(mask, groups, official_index0=True)
    assert bool(fixed[1][0, 0]) and not bool(quirk[1][0, 0])
    assert torch.equal(fixed[1][1], quirk[1][1])                              # other samples unchanged
    assert not bool(quirk[0][0, 0])                                            # the finest scale too
    none = torch.zeros(2, 8, dtype=torch.bool)                                 # nothing masked: no quirk
    assert all(torch.equal(a, b) for a, b in zip(propagate_mask(none, groups, True), propagate_mask(none, groups)))


# ------------------------------------------------------------------------------------ local attention
def test_local_attention_ignores_tokens_outside_the_radius_brute_force():
    torch.manual_seed(0)
    B, L, C, r = 2, 10, 12, 0.8
    stage = StageBlocks(C, 1, 3, [0.0]).eval()
    x, pos = torch.randn(B, L, C), torch.zeros(B, L, C)
    center = torch.rand(B, L, 3) * 1.5
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 7:] = False                                                       # padding of sample 1
    out = stage(x, pos, local_attention_bias(center, r, valid))
    blk = stage.blocks[0]
    h, d = 3, C // 3
    for b in range(B):
        for i in range(L):
            if not valid[b, i]:
                continue
            hx = blk.norm1(x[b])
            q, k, v = blk.attn.qkv(hx).view(L, 3, h, d).unbind(1)
            allowed = [j for j in range(L) if valid[b, j] and float((center[b, i] - center[b, j]).norm()) < r]
            heads = []
            for hh in range(h):
                logits = torch.stack([q[i, hh] @ k[j, hh] for j in allowed]) / math.sqrt(d)
                w = logits.softmax(0)
                heads.append(sum(w[n] * v[j, hh] for n, j in enumerate(allowed)))
            y = x[b, i] + blk.attn.proj(torch.cat(heads))
            y = y + blk.mlp(blk.norm2(y))
            torch.testing.assert_close(out[b, i], y, rtol=1e-4, atol=1e-5)
    # and moving a far token changes nothing for a query that cannot see it
    far = (torch.cdist(center[0], center[0])[0] >= r).nonzero().view(-1)
    assert len(far)
    x2 = x.clone()
    x2[0, far[0]] += 10.0
    torch.testing.assert_close(stage(x2, pos, local_attention_bias(center, r, valid))[0, 0], out[0, 0])


def test_pretraining_local_attention_switch_official_off_by_default():
    x = clouds()
    a = tiny().eval()
    b = tiny(local_attention_in_pretrain=True).eval()
    c = tiny(local_radius=[0.0, 0.0, 0.0]).eval()
    fa, fb, fc = a.extract_features(x), b.extract_features(x), c.extract_features(x)
    torch.testing.assert_close(fa, fc)                 # official: the radii have no effect in pre-training
    assert not torch.allclose(fa, fb)                  # the switch turns them on


# ------------------------------------------------------------------------------------ classifiers
def test_scan_max_skip_switch_and_smooth_loss():
    torch.manual_seed(0)
    enc = {k: TINY[k] for k in ENC_KEYS}
    a = PointM2AEScanObjectNN(**enc, cls_dim=5).eval()
    b = PointM2AEScanObjectNN(**enc, cls_dim=5, official_max_skip=True).eval()
    b.load_state_dict(a.state_dict())
    x = clouds(2)
    t = a.tokens(x)
    torch.testing.assert_close(a.features(x), torch.cat([t.mean(1), t.amax(1)], -1))
    torch.testing.assert_close(b.features(x), torch.cat([t.mean(1), t[:, 1:].amax(1)], -1))
    logits, label = torch.randn(4, 5), torch.tensor([0, 3, 1, 4])
    eps = 0.3
    ref = -sum((1 - eps) * logits[i].log_softmax(0)[label[i]]
               + sum(eps / 4 * logits[i].log_softmax(0)[c] for c in range(5) if c != label[i]) for i in range(4)) / 4
    torch.testing.assert_close(smooth_ce(logits, label, eps), ref)
    mn = PointM2AEModelNet40(**enc, cls_dim=5)
    out = mn({"points": x, "label": torch.tensor([1, 2])})
    out["loss"].backward()
    assert all(p.grad is not None for p in mn.parameters())


# ------------------------------------------------------------------------------------ GM3D on M2AE
@pytest.fixture
def teacher_ckpt(tmp_path):
    return str(official_ckpt(tmp_path, tiny()))


def gm3d(variant="C", teacher=None, alpha_max=0.5, **g):
    torch.manual_seed(1)
    m = PointM2AEGM3D(**TINY, mask={"alpha_max": alpha_max},
                      gm3d={"variant": variant, "gc_decoder_depth": 1, "teacher_ckpt": teacher, **g})
    if m.knowledge_teacher is not None:
        load_knowledge_teacher(m.knowledge_teacher, teacher)
    return m


def test_gm3d_m2ae_curriculum_top_scores_masked_and_metrics(teacher_ckpt):
    m = gm3d("C", teacher_ckpt, alpha_max=1.0)
    assert m.masker.num_masked(8) == 8 - int(8 * 0.2)                          # GM3D rule: 7 of 8
    m.on_epoch_start(3, 4)
    groups = m.group(clouds())
    scores = m.teacher_scores(groups)
    assert scores.shape == (3, 8)
    mask = m.masker(m.mask_centers(groups), generator=torch.Generator().manual_seed(0), epoch=3, scores=scores)
    n_sel = m.masker.num_selected(3, 8)
    assert n_sel == 7 and mask.gather(1, scores.topk(n_sel, 1).indices).all()
    m(clouds(), epoch=3, generator=torch.Generator().manual_seed(0))
    metrics = m.extra_metrics()
    assert metrics["n_sel"] == n_sel and -1.0 <= metrics["gc_rank_corr"] <= 1.0


def test_gm3d_m2ae_target_is_mean_chamfer_of_masked_children(teacher_ckpt):
    m = gm3d("C", teacher_ckpt).eval()
    groups = m.group(clouds())
    _, mask = m.masked_view(groups, epoch=0, generator=torch.Generator().manual_seed(0), need_scores=True)
    enc = m.encode(groups, mask)
    f_hat, l_p = m.reconstruct_masked(groups, mask, enc)
    M = int(mask[0].sum())
    assert f_hat.shape == (3, M, 96) and l_p.shape == (3, M)
    _, dec = m.student.decode(groups, enc, mask)
    per, fine = m.student.fine_token_loss(groups, enc, dec)
    per_map = torch.zeros(fine.shape)
    per_map[fine] = per
    for b in range(3):
        for n, j in enumerate(mask[b].nonzero().view(-1)):
            kids = [int(i) for i in groups[2].idx[b, j] if fine[b, i]]
            want = torch.stack([per_map[b, i] for i in kids]).mean() if kids else torch.tensor(0.0)
            torch.testing.assert_close(l_p[b, n], want)


def test_gm3d_m2ae_every_student_param_gets_gradient_teachers_frozen(teacher_ckpt):
    m = gm3d("C", teacher_ckpt)
    m.train()
    m.on_epoch_start(0, 2)
    kt_before = copy.deepcopy(m.knowledge_teacher.state_dict())
    out = m(clouds(), epoch=0, generator=torch.Generator().manual_seed(0))
    assert {"loss", "loss_point", "loss_feat", "loss_gc"} <= set(out)
    out["loss"].backward()
    unused = {"h_encoder.encoder_norms.0.weight", "h_encoder.encoder_norms.0.bias"}
    for name, p in m.named_parameters():
        if name.startswith(("ema.", "knowledge_teacher.")):
            assert not p.requires_grad and p.grad is None, name
        elif name not in unused:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0).step()
    m.after_step()
    for k, v in m.knowledge_teacher.state_dict().items():
        assert torch.equal(v, kt_before[k]), k


def test_gm3d_m2ae_teacher_loads_from_fake_official_checkpoint(teacher_ckpt, tmp_path):
    m = gm3d("C", teacher_ckpt)
    ref = tiny().eval()
    for k, v in m.knowledge_teacher.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    groups = ref.group(clouds())
    torch.testing.assert_close(m.knowledge_teacher.encode_full(groups), ref.mask_scale_tokens(ref.encode(groups)))
    ft = PointM2AEModelNet40(**{k: TINY[k] for k in ENC_KEYS})
    with pytest.raises(CheckpointError, match="knowledge teacher needs a Point-M2AE pre-training checkpoint"):
        load_knowledge_teacher(m.knowledge_teacher, official_ckpt(tmp_path, ft, "ft.pth"))
    with pytest.raises(Exception, match="variant B needs a knowledge teacher with a decoder and point head"):
        gm3d("B", teacher_ckpt)


def test_gm3d_m2ae_ema_update_matches_formula():
    m = gm3d("A")
    m.on_epoch_start(50, 400)
    assert m.ema_decay == pytest.approx(0.999 + 0.5 * (0.9999 - 0.999))
    assert_ema_update(m)
    keys = set(m.state_dict())
    assert set(tiny().state_dict()) <= keys
    assert {k.split(".")[0] for k in keys - set(tiny().state_dict())} == {
        "mask_token_loss_pred", "MAE_decoder_loss_pred", "increase_dim_2", "ema"}


def test_gm3d_m2ae_run_encoder_loads_into_classifier_from_ema(tmp_path, teacher_ckpt):
    m = gm3d("C", teacher_ckpt)
    path = tmp_path / "gm3d.pth"
    atomic_save({"base_model": m.state_dict()}, path)
    clf = PointM2AEModelNet40(**{k: TINY[k] for k in ENC_KEYS})
    info = load_pretrained_encoder(clf, path, source="ema")
    assert set(info["missing"]) == {"norm.weight", "norm.bias"} | HEAD
    for k, v in clf.state_dict().items():
        if k.startswith("h_encoder."):
            assert torch.equal(v, m.ema.state_dict()[k]), k


# ------------------------------------------------------------------------------------ CLI
def test_m2ae_quickstart_cli_end_to_end(tmp_path):
    env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    small = ["model.num_groups=[32,16,8]", "model.group_sizes=[8,4,4]", "model.encoder_depths=[1,1,1]",
             "model.encoder_dims=[24,48,96]", "model.decoder_dims=[96,48]", "max_epoch=1", "total_bs=16",
             "scheduler.kwargs.epochs=1", "scheduler.kwargs.initial_epochs=0", "eval.svm_every=1",
             "dataset.train.samples_per_class=2", "dataset.svm_train.samples_per_class=3",
             "dataset.svm_test.test_per_class=2", "dataset.train.npoints=128", "dataset.svm_train.npoints=128",
             "dataset.svm_test.npoints=128", "npoints=128"]
    run = tmp_path / "m2ae"
    r = subprocess.run([sys.executable, "main_pretrain.py", "--config", "cfgs/pretrain/quickstart_m2ae.yaml",
                        "--run_dir", str(run), *small], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run / "ckpt-last.pth").exists()
    out = r.stdout + r.stderr
    assert "svm" in out.lower()
    r = subprocess.run([sys.executable, "main_pretrain.py", "--config", "cfgs/pretrain/gm3d_m2ae_quickstart.yaml",
                        "--run_dir", str(tmp_path / "gm3d"), *small, f"model.gm3d.teacher_ckpt={run / 'ckpt-last.pth'}",
                        "model.gm3d.gc_decoder_depth=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "gm3d" / "ckpt-last.pth").exists()
