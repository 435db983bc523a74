"""Point-M2AE's official pre-training attention mask (``mask_radius * mask_vis``) at batch size >= 2."""

from __future__ import annotations

import pytest
import torch

from models.point_m2ae import PointM2AE, official_padding_bias
from utils.errors import ConfigError

TINY = dict(group_sizes=[8, 4, 4], num_groups=[32, 16, 8], encoder_depths=[2, 1, 1], encoder_dims=[24, 48, 96],
            local_radius=[0.3, 0.6, 1.2], num_heads=3, decoder_depths=[1, 1], decoder_dims=[96, 48],
            decoder_up_blocks=[1, 1], drop_path_rate=0.0)


def tiny(**kw) -> PointM2AE:
    torch.manual_seed(0)
    return PointM2AE(**{**TINY, **kw}).eval()


def clouds(B=3, N=128, scale=0.5, seed=0):
    """Clouds in a ball of radius ``scale``: most stage-0 centres lie within 0.3 of the origin, some not."""
    x = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(seed))
    return scale * x / x.norm(dim=-1).amax(1).view(B, 1, 1)


def official_encoder(model: PointM2AE, groups, masks):
    """The official ``H_Encoder.forward`` loop after the mask propagation, written from its equations:
    per sample, the visible tokens and centres are copied into zero tensors of the batch's longest
    visible length, ``mask_vis`` is 1 except on the (valid, valid) block, the attention mask is
    ``(cdist(centres) >= radius) * mask_vis`` (distances cached while the length is unchanged), every
    block adds ``-1e5 * mask`` to the logits, and token merging reads the transformer outputs at the
    visible slots and the embeddings elsewhere."""
    enc = model.h_encoder
    outs, xyz_dist, prev = [], None, None
    for i, g in enumerate(groups):
        if i == 0:
            tokens = enc.token_embed[0](g.neighborhood)
        else:
            nb = torch.stack([prev[b][g.idx[b]] for b in range(prev.shape[0])])      # (B, G, K, C)
            tokens = enc.token_embed[i](nb)
        vis = ~masks[i]
        B, _, C = tokens.shape
        lens = vis.sum(1)
        L = int(lens.max())
        x = torch.zeros(B, L, C)
        c = torch.zeros(B, L, 3)
        mask_vis = torch.ones(B, L, L)
        for b in range(B):
            n = int(lens[b])
            x[b, :n] = tokens[b][vis[b]]
            c[b, :n] = g.center[b][vis[b]]
            mask_vis[b, :n, :n] = 0
        r = enc.local_radius[i]
        if r > 0:
            if xyz_dist is None or xyz_dist.shape[1] != L:
                xyz_dist = torch.cdist(c, c, p=2)
            att = (xyz_dist >= r).float() * mask_vis
        else:
            att = mask_vis
        pos = enc.encoder_pos_embeds[i](c)
        for blk in enc.encoder_blocks[i].blocks:
            x = blk(x + pos, (att * -100000.0).unsqueeze(1))
        outs.append(x)
        if i < len(groups) - 1:
            tokens = tokens.clone()
            tokens[vis] = x[~mask_vis[:, :, 0].bool()]
            prev = tokens
    return [norm(t) for norm, t in zip(enc.encoder_norms, outs)]


def _inputs(model, B=3, seed=0):
    groups = model.group(clouds(B, seed=seed))
    mask = model.masker(groups[-1].center, generator=torch.Generator().manual_seed(seed + 1), epoch=0)
    return groups, mask


@pytest.mark.parametrize("B", [2, 4])
def test_official_padding_equals_the_official_equations(B):
    model = tiny(official_padding=True)
    groups, mask = _inputs(model, B)
    masks = model.scale_masks(groups, mask)
    # the case that matters: padding exists, and some (valid, padding) pairs are NOT blocked officially
    lens = [(~m).sum(1) for m in masks]
    assert any(int(n.max()) > int(n.min()) for n in lens)
    near = (groups[0].center.norm(dim=-1) < TINY["local_radius"][0]) & ~masks[0]
    far = (groups[0].center.norm(dim=-1) >= TINY["local_radius"][0]) & ~masks[0]
    assert near.any() and far.any()
    with torch.no_grad():
        ref = official_encoder(model, groups, masks)
        got = model.encode(groups, mask).tokens
    for s, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"stage {s}")
    # the fixed behaviour (padding fully masked out) is a different function on the same input
    fixed = tiny(official_padding=False)
    with torch.no_grad():
        fixed_tok = fixed.encode(groups, mask)
    diff = max(float((a - b)[v].abs().max()) for a, b, v in zip(got, fixed_tok.tokens, fixed_tok.valid))
    assert diff > 1e-3


def test_official_padding_equals_the_official_equations_on_the_evaluation_path():
    model = tiny(official_padding=True)
    groups = model.group(clouds(4, seed=3))
    masks = model.scale_masks(groups, None)           # nothing masked on top; uncovered fine tokens dropped
    with torch.no_grad():
        ref = official_encoder(model, groups, masks)
        got = model.encode(groups, None).tokens
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batch_of_one_is_the_same_with_and_without_the_switch():
    groups, mask = _inputs(tiny(), B=1)
    with torch.no_grad():
        a = tiny(official_padding=True).encode(groups, mask).tokens
        b = tiny(official_padding=False).encode(groups, mask).tokens
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_official_bias_pairs_and_distance_cache():
    center = torch.tensor([[[0.1, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.0, 0.0]]])   # slot 2 is padding
    valid = torch.tensor([[True, True, False]])
    bias, dist = official_padding_bias(center, 0.5, valid)
    blocked = (bias[0, 0] < 0).tolist()
    # (valid, valid) never blocked; (valid near origin, padding) open; (valid far, padding) blocked;
    # (padding, padding) open
    assert blocked == [[False, False, False], [False, False, True], [False, True, False]]
    # a cached matrix of the same size is reused as it is (the official cache); another size is recomputed
    stale = torch.full((1, 3, 3), 10.0)
    assert (official_padding_bias(center, 0.5, valid, stale)[0][0, 0] < 0).tolist() == [
        [False, False, True], [False, False, True], [True, True, True]]
    assert torch.equal(official_padding_bias(center, 0.5, valid, torch.zeros(1, 4, 4))[1], dist)
    # radius <= 0: the padding mask alone
    assert (official_padding_bias(center, 0.0, valid)[0][0, 0] < 0).tolist() == [
        [False, False, True], [False, False, True], [True, True, True]]


def test_official_padding_conflicts_with_local_attention_in_pretrain():
    with pytest.raises(ConfigError, match="official_padding: true .* local_attention_in_pretrain: true"):
        PointM2AE(**TINY, official_padding=True, local_attention_in_pretrain=True)


def test_paper_configs_run_official_semantics_and_fixed_is_an_override():
    from utils.config import load_config
    for f in ("cfgs/pretrain/point_m2ae.yaml", "cfgs/pretrain/point_m2ae_gm3d.yaml"):
        m = load_config(f)["model"]
        assert m["official_padding"] is True and m["official_index0"] is True, f
        fixed = load_config(f, overrides=["model.official_padding=false", "model.official_index0=false"])["model"]
        assert fixed["official_padding"] is False and fixed["official_index0"] is False
