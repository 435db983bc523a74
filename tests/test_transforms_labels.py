"""Batch transforms carry per-point labels: points and labels stay aligned (property test)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets.transforms import (Compose, Jitter, PermutePoints, RandomDropout, RotateY, Scale, ScaleAndTranslate,
                                 SubsamplePoints, build_transforms)
from utils.errors import DataError

MOVING = {"permute": lambda n: PermutePoints(), "subsample": lambda n: SubsamplePoints(max(1, n // 2)),
          "dropout": lambda n: RandomDropout(0.8)}
POINTWISE = {"scale": lambda n: Scale(), "rotate": lambda n: RotateY(), "jitter": lambda n: Jitter(),
             "scale_translate": lambda n: ScaleAndTranslate()}


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 4), n=st.integers(2, 40), seed=st.integers(0, 2**31 - 1),
       chain=st.lists(st.sampled_from(sorted(MOVING) + sorted(POINTWISE)), min_size=1, max_size=4))
def test_points_and_labels_stay_aligned(b, n, seed, chain):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(b, n, 3, generator=g)
    ident = torch.arange(n).expand(b, n).clone()                       # label = index of the source point
    normals = torch.randn(b, n, 3, generator=g)
    steps, cur = [], n
    for name in chain:
        steps.append((MOVING | POINTWISE)[name](cur))
        cur = steps[-1].npoints if name == "subsample" else cur
    t = Compose(steps)
    out, extra = t(points, torch.Generator().manual_seed(seed), extra={"seg": ident, "src": points,
                                                                      "normals": normals})
    plain = t(points, torch.Generator().manual_seed(seed))
    assert torch.equal(out, plain)                                      # extra does not change the draws
    assert extra["seg"].shape == out.shape[:2] and extra["normals"].shape == out.shape
    rows = torch.arange(b).unsqueeze(1)
    # every carried label still names the point it came from, and every carried tensor moved the same way
    assert torch.equal(extra["src"], points[rows, extra["seg"]])
    assert torch.equal(extra["normals"], normals[rows, extra["seg"]])
    if all(name in MOVING for name in chain):                           # no point-wise map: out = the sources
        assert torch.equal(out, extra["src"])


def test_pointwise_transform_returns_labels_unchanged_and_tensor_extra():
    pts = torch.rand(2, 5, 3)
    seg = torch.randint(0, 4, (2, 5))
    out, lab = Scale()(pts, torch.Generator().manual_seed(0), extra=seg)
    assert lab is seg and torch.equal(out, Scale()(pts, torch.Generator().manual_seed(0)))


def test_subsample_and_dropout_semantics():
    pts = torch.rand(3, 10, 3)
    seg = torch.arange(10).expand(3, 10)
    out, lab = SubsamplePoints(4)(pts, torch.Generator().manual_seed(1), extra=seg)
    assert out.shape == (3, 4, 3) and all(len(set(r.tolist())) == 4 for r in lab)   # distinct points kept
    out, lab = RandomDropout(0.9)(pts, torch.Generator().manual_seed(2), extra=seg)
    dropped = lab != torch.arange(10)
    assert dropped.any() and (lab[dropped] == 0).all()                  # dropped points take point 0's label
    built = build_transforms(["PermutePoints", {"NAME": "SubsamplePoints", "npoints": 4}])
    assert built(pts, torch.Generator().manual_seed(5)).shape == (3, 4, 3)


def test_misaligned_labels_are_an_error():
    with pytest.raises(DataError, match=r"PermutePoints: per-point 'seg' must be a \(B, N, \.\.\.\) tensor with "
                                        r"\(B, N\) = \(2, 5\) as the points, got \(2, 4\)"):
        PermutePoints()(torch.rand(2, 5, 3), extra={"seg": torch.zeros(2, 4)})
