"""GM3D options (issue: masks that follow geometry): each changes what it claims, and only that."""

import pytest
import torch

from models.gm3d import ContentScorer, _zscore_rows
from models.losses import spearman_per_row
from tests.helpers import TINY_TC
from tests.test_gm3d import batch, gm3d, official_teacher_ckpt  # noqa: F401  (fixture)
from utils.errors import ConfigError


def _mask(m, groups):
    centers = m.mask_centers(groups)
    return m.masker(centers, epoch=0, scores=torch.rand(centers.shape[:2]))


def _step(m, epoch=3, seed=0):
    m.train()
    m.on_epoch_start(epoch, 6)
    out = m(batch(seed=seed), epoch=epoch)
    out["loss"].backward()
    return out


def test_ema_bn_copy_copies_running_stats_and_still_averages_weights():
    m = gm3d("A", ema_bn="copy")
    _step(m)  # train-mode forward: the student's BatchNorm buffers move, the teacher's do not
    m.ema_decay = 0.9
    before = {k: v.clone() for k, v in m.ema.state_dict().items()}
    student = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("ema.")}
    m.after_step()
    after = m.ema.state_dict()
    n_bn = 0
    for k, v in before.items():
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(after[k], student[k]) and not torch.equal(v, student[k]), k
            n_bn += 1
        elif v.is_floating_point():
            torch.testing.assert_close(after[k], 0.9 * v + 0.1 * student[k], rtol=1e-5, atol=1e-6)
    assert n_bn >= 4
    # the official default averages them
    m = gm3d("A")
    _step(m)
    m.ema_decay = 0.9
    before = {k: v.clone() for k, v in m.ema.state_dict().items()}
    student = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("ema.")}
    m.after_step()
    k = next(k for k in before if k.endswith("running_var"))
    torch.testing.assert_close(m.ema.state_dict()[k], 0.9 * before[k] + 0.1 * student[k])


def test_ema_warmup_formula_counts_updates_and_is_saved():
    m = gm3d("A", ema_warmup=True, ema_decay_start=0.99, ema_decay_end=0.99)
    m.on_epoch_start(0, 6)
    seen = []
    for _ in range(3):
        seen.append(m.current_ema_decay())
        m.after_step()
    assert seen == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert int(m.state_dict()["ema_num_updates"]) == 3
    m.ema_num_updates.fill_(10_000)
    assert m.current_ema_decay() == pytest.approx(0.99)  # capped by the configured decay
    assert "ema_num_updates" not in gm3d("A").state_dict()  # official keys unchanged when off


def test_gc_target_options(official_teacher_ckpt):
    torch.manual_seed(0)
    l_p, l_f = torch.rand(3, 9) * 1e-3, torch.rand(3, 9) * 5
    m = gm3d("C", official_teacher_ckpt)
    groups = m.group(batch()["points"])
    mask = _mask(m, groups)
    torch.testing.assert_close(m.gc_target(groups, mask, l_p, l_f), l_p + l_f)
    m.gcfg.gc_target = "zscore"
    z = m.gc_target(groups, mask, l_p, l_f)
    torch.testing.assert_close(z, _zscore_rows(l_p) + _zscore_rows(l_f))
    torch.testing.assert_close(z.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    m.gcfg.gc_target = "weighted"
    torch.testing.assert_close(m.gc_target(groups, mask, l_p, l_f, epoch=0), 1000.0 * l_p + 13.889 * l_f)
    m.gcfg.gc_target, m.gcfg.gc_chamfer_norm = "sum", True
    B, M = mask.shape[0], int(mask[0].sum())
    l_p = torch.rand(B, M)
    size = groups.neighborhood[mask].view(B, M, -1, 3).pow(2).sum(-1).mean(-1)
    torch.testing.assert_close(m.gc_target(groups, mask, l_p, None), l_p / (size + 1e-8))


def test_content_scorer_follows_contents_position_scorer_does_not():
    torch.manual_seed(0)
    m = gm3d("A", gc_scorer="content")
    groups = m.group(batch()["points"])
    with torch.no_grad():
        m.ema.gc_content.head[-1].weight.normal_()
    s = m.teacher_scores(groups)
    perm = torch.randperm(groups.center.shape[1])
    shuffled = type(groups)(**{**groups._asdict(), "neighborhood": groups.neighborhood[:, perm]}) \
        if hasattr(groups, "_asdict") else None
    if shuffled is None:
        import dataclasses
        shuffled = dataclasses.replace(groups, neighborhood=groups.neighborhood[:, perm])
    torch.testing.assert_close(m.teacher_scores(shuffled), s[:, perm])  # the score moves with the patch
    p = gm3d("A", gc_scorer="position")
    torch.testing.assert_close(p.teacher_scores(shuffled), p.teacher_scores(groups))  # stays with the centre
    assert not hasattr(m, "MAE_decoder_loss_pred")  # no GC transformer decoder is built for it
    assert isinstance(m.gc_content, ContentScorer)


@pytest.mark.parametrize("scorer", ["content", "position"])
def test_learned_scorers_train_on_the_masked_patches_and_leave_the_student_alone(scorer):
    m = gm3d("A", gc_scorer=scorer)
    out = _step(m)
    head = m.gc_content if scorer == "content" else m.gc_position
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    # the GC loss reaches only the scorer: its gradient w.r.t. the encoder is zero
    m.zero_grad()
    m.train()
    out = m(batch(), epoch=3)
    out["loss_gc"].requires_grad_(False)
    groups = m.group(batch()["points"])
    mask = _mask(m, groups)
    enc = m.encode(groups, mask)
    g_hat = m.student_scores(groups, mask, enc)
    g_hat.sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.MAE_encoder.parameters())


def test_oracle_scores_are_the_students_true_error_and_train_no_scorer():
    m = gm3d("A", gc_scorer="oracle")
    groups = m.group(batch()["points"])
    B, G = groups.center.shape[:2]
    M = m.masker.num_masked(G)
    g = torch.Generator().manual_seed(3)
    s = m.oracle_scores(groups, generator=g)
    assert s.shape == (B, G) and torch.isfinite(s).all()
    # a slow reference: the same permutation, each patch's Chamfer error under each mask that hides it
    g = torch.Generator().manual_seed(3)
    perm = torch.rand(B, G, generator=g).argsort(1)
    m.student.eval()
    total, count = torch.zeros(B, G), torch.zeros(B, G)
    with torch.no_grad():
        for k in range(-(-G // M)):
            for b in range(B):
                hide = [int(perm[b, (k * M + j) % G]) for j in range(M)]
                mask = torch.zeros(B, G, dtype=torch.bool)
                for bb in range(B):
                    mask[bb, [int(perm[bb, (k * M + j) % G]) for j in range(M)]] = True
                _, l_p = m.student.reconstruct_masked(groups, mask, m.student.encode(groups, mask))
                idx = mask[b].nonzero().squeeze(1)
                for j, i in enumerate(idx.tolist()):
                    assert i in hide
                    total[b, i] += l_p[b, j]
                    count[b, i] += 1
    torch.testing.assert_close(s, total / count, rtol=1e-4, atol=1e-7)
    out = _step(m)
    assert float(out["loss_gc"]) == 0.0


def test_oracle_masks_its_highest_error_patches():
    m = gm3d("A", gc_scorer="oracle", alpha_max=1.0)
    m.train()
    m.on_epoch_start(5, 6)
    groups = m.group(batch()["points"])
    torch.manual_seed(0)
    scores, mask = m.masked_view(groups, epoch=5)
    n_sel = m.masker.num_selected(5, groups.center.shape[1])
    assert n_sel > 0
    top = scores.topk(n_sel, 1).indices
    assert mask.gather(1, top).all()


def test_variant_b_point_term_goes_through_the_teachers_decoder(official_teacher_ckpt):
    m = gm3d("B", official_teacher_ckpt)
    kt = m.knowledge_teacher
    assert kt.with_decoder and any(k.startswith("MAE_decoder.") for k in kt.state_dict())
    groups = m.group(batch()["points"])
    mask = _mask(m, groups)
    B, M = mask.shape[0], int(mask[0].sum())
    f_full = kt.encode_full(groups)
    f_hat = torch.randn(B, M, f_full.shape[-1])
    l_p = kt.point_head_loss(groups, mask, f_hat, f_full, m.student.loss_fn)
    # by hand: decoder over the student's masked tokens at their centres; decoder over all teacher tokens
    C, K = f_full.shape[-1], kt.increase_dim[0].out_channels // 3
    rec_s = kt.MAE_decoder(f_hat, kt.decoder_pos_embed(groups.center[mask].view(B, M, 3)), M)
    rec_t = kt.MAE_decoder(f_full, kt.decoder_pos_embed(groups.center), 0)[mask].view(B, M, C)
    pts = lambda x: kt.increase_dim(x.transpose(1, 2)).transpose(1, 2).reshape(B * M, K, 3)  # noqa: E731
    ref = m.student.loss_fn(pts(rec_s), pts(rec_t), reduction="none").view(B, M)
    torch.testing.assert_close(l_p, ref)
    # and it is not the old shortcut that skipped the decoder
    skip = m.student.loss_fn(pts(f_hat), pts(f_full[mask].view(B, M, C)), reduction="none").view(B, M)
    assert not torch.allclose(l_p, skip)


def test_official_init_zero_mask_tokens_and_default_encoder_init():
    m = gm3d("A", official_init=True)
    assert torch.count_nonzero(m.mask_token) == 0 and torch.count_nonzero(m.mask_token_loss_pred) == 0
    lin = m.MAE_encoder.blocks.blocks[0].mlp.fc1
    assert lin.bias.abs().sum() > 0  # PyTorch's default init gives a non-zero bias; trunc-normal sets 0
    p = gm3d("A")
    assert p.MAE_encoder.blocks.blocks[0].mlp.fc1.bias.abs().sum() == 0
    torch.testing.assert_close(m.ema.mask_token, m.mask_token)  # the EMA teacher starts as the student


def test_bad_option_values_name_the_key():
    with pytest.raises(ConfigError, match="model.gm3d: key 'gc_scorer' has value 'decodr'"):
        gm3d("A", gc_scorer="decodr")
    with pytest.raises(ConfigError, match="key 'ema_bn' has value 'median'"):
        gm3d("A", ema_bn="median")


def test_paper_configs_run_official_semantics():
    from tools.engine.builders import build_model_from_cfg
    from utils.config import load_config

    for name in ("point_mae", "point_mae_gm3d", "point_mae_gm3d_A", "point_mae_gm3d_B"):
        cfg = load_config(f"cfgs/pretrain/{name}.yaml", [f"model.transformer_config.{k}={v}"
                                                         for k, v in TINY_TC.items() if k != "mask_type"])
        m = build_model_from_cfg(cfg, load_teacher=False)
        assert m.MAE_encoder.embed_visible_only is False, name
        g = getattr(m, "gcfg", None)
        if g is not None:
            assert (g.ema_bn, g.ema_warmup, g.gc_target, g.gc_chamfer_norm, g.gc_scorer) == \
                ("average", False, "sum", False, "decoder"), name


def test_content_scorer_rank_correlates_with_what_it_was_trained_on():
    """Fitted on a content-only target (patch spread), the content scorer learns to rank it."""
    torch.manual_seed(0)
    net = ContentScorer()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    from models.losses import gc_ranking_loss
    for _ in range(60):
        pts = torch.randn(4, 12, 8, 3) * torch.rand(4, 12, 1, 1)
        target = pts.pow(2).sum(-1).mean(-1)
        loss = gc_ranking_loss(net(pts), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pts = torch.randn(4, 12, 8, 3) * torch.rand(4, 12, 1, 1)
    rho = spearman_per_row(net(pts).detach(), pts.pow(2).sum(-1).mean(-1)).mean()
    assert rho > 0.8


def test_classifier_pytorch_init_keeps_the_default_initialisation():
    from models.classifier import PointTransformer

    kw = dict(trans_dim=48, depth=1, num_heads=3, encoder_dims=48, cls_dim=4, group_size=8, num_group=8)
    torch.manual_seed(0)
    ours = PointTransformer(**kw)
    torch.manual_seed(0)
    default = PointTransformer(**kw, init="pytorch")
    assert torch.count_nonzero(default.cls_token) == 0 and torch.count_nonzero(ours.cls_token) > 0
    assert default.blocks.blocks[0].mlp.fc1.bias.abs().sum() > 0  # PyTorch's default: non-zero bias
    assert ours.blocks.blocks[0].mlp.fc1.bias.abs().sum() == 0     # trunc-normal init: zero bias
    with pytest.raises(ConfigError, match="init must be"):
        PointTransformer(**kw, init="xavier")
