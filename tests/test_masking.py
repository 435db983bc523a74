import pytest
import torch

from models.masking import MASKS, GM3DMask, curriculum_alpha


def centers(B=4, G=64, seed=0):
    return torch.randn(B, G, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,G,ratio,expected", [("random", 64, 0.6, 38), ("block", 64, 0.6, 38),
                                                    ("random", 32, 0.75, 24), ("gm3d", 64, 0.6, 39),
                                                    ("gm3d", 64, 0.8, 52)])
def test_exact_masked_count(name, G, ratio, expected):
    strat = MASKS.get(name)(ratio)
    c = centers(G=G)
    mask = strat(c, generator=torch.Generator().manual_seed(0), epoch=0, scores=torch.randn(4, G))
    assert mask.dtype == torch.bool and mask.shape == (4, G)
    assert (mask.sum(1) == expected).all()
    assert ((~mask).sum(1) == G - expected).all()  # visible + masked = G, no overlap by construction


@pytest.mark.parametrize("name", ["random", "block", "gm3d"])
def test_seeded_reproducible_and_seed_dependent(name):
    strat = MASKS.get(name)(0.6)
    c = centers()
    s = torch.randn(4, 64)
    m1 = strat(c, generator=torch.Generator().manual_seed(3), scores=s)
    m2 = strat(c, generator=torch.Generator().manual_seed(3), scores=s)
    m3 = strat(c, generator=torch.Generator().manual_seed(4), scores=s)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)


def test_random_mask_is_uniform():
    strat = MASKS.get("random")(0.5)
    counts = torch.zeros(16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts += strat(centers(B=8, G=16), generator=gen).float().sum(0)
    freq = counts / (200 * 8)
    assert (freq - 0.5).abs().max() < 0.06


def test_block_mask_masks_the_nearest_to_one_centre():
    c = centers(B=3, G=32)
    mask = MASKS.get("block")(0.5)(c, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        masked, visible = c[b][mask[b]], c[b][~mask[b]]
        # some centre (the seed) has every masked centre at most as far as any visible centre
        d_m = torch.cdist(c[b], masked).amax(1)
        d_v = torch.cdist(c[b], visible).amin(1)
        assert (d_m <= d_v + 1e-6).any()


def test_gm3d_curriculum_worked_numbers():
    """docs/METHOD.md, section 4.4: T=400, M=39, alpha_max=0.5 -> N_sel 0 up to epoch 19, 1 at 20,
    4/9/19 at 99/199/399."""
    strat = GM3DMask(0.6, alpha_max=0.5)
    strat.set_total_epochs(400)
    n = [strat.num_selected(e, 64) for e in range(400)]
    assert max(n[:20]) == 0 and n[20] == 1
    assert (n[99], n[199], n[399]) == (4, 9, 19)
    strat8 = GM3DMask(0.6, alpha_max=0.8)
    strat8.set_total_epochs(400)
    n8 = [strat8.num_selected(e, 64) for e in range(400)]
    assert n8.index(next(x for x in n8 if x > 0)) == 12 and n8[-1] == 31
    assert curriculum_alpha(199, 400, 0.5, "mid") == 0.5 and curriculum_alpha(99, 400, 0.5, "mid") == 0.25
    # past the configured length the share stays at alpha_max (N_sel never exceeds its final value)
    assert curriculum_alpha(999, 400, 0.5) == 0.5 and strat.num_selected(999, 64) == n[399]
    scores = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    mask = strat(torch.zeros(2, 64, 3), generator=torch.Generator().manual_seed(1), epoch=5000, scores=scores)
    assert mask.sum(1).tolist() == [39, 39]
    assert mask.gather(1, scores.topk(19, dim=1).indices).all()


def test_gm3d_top_scored_patches_always_masked():
    strat = GM3DMask(0.6, alpha_max=0.5)
    strat.set_total_epochs(10)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(10):
        scores = torch.randn(8, 64, generator=gen)
        mask = strat(centers(B=8), generator=gen, epoch=epoch, scores=scores)
        n_sel = strat.num_selected(epoch, 64)
        top = scores.topk(max(n_sel, 1), dim=1).indices
        if n_sel:
            assert mask.gather(1, top).all()
        assert (mask.sum(1) == 39).all()


def test_gm3d_without_scores_errors_only_when_needed():
    strat = GM3DMask(0.6, total_epochs=1000)  # epoch 0: N_sel = 0, a fully random mask, no scores needed
    assert strat(centers(), generator=torch.Generator().manual_seed(0), epoch=0).sum(1).eq(39).all()
    with pytest.raises(ValueError, match="needs the teacher's GC scores"):
        GM3DMask(0.6, alpha_max=1.0, total_epochs=1)(centers(), epoch=0)
