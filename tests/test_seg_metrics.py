"""Part-segmentation metrics vs a hand-computed example and a slow per-shape reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.shapenetpart import SEG_CLASSES
from tools.tasks.seg_metrics import (SegMetricAccumulator, category_part_mask, part_table, restricted_argmax,
                               segmentation_metrics, shape_ious)
from utils.errors import DataError

PARTS = [[0, 1], [2, 3, 4]]


def test_hand_example_with_absent_parts():
    # shape A (category 0): part 0 -> I 1 / U 2, part 1 -> I 2 / U 3; mean 7/12
    # shape B (category 1): part 2 -> 2/3, part 3 -> 1/2, part 4 absent from both -> 1; mean 13/18
    # shape C (category 1): only part 4, predicted exactly; parts 2, 3 absent from both -> 1; mean 1
    seg = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 4, 4]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 3, 2], [4, 4, 4, 4]])
    cat = torch.tensor([0, 1, 1])
    ious = shape_ious(pred, seg, cat, PARTS)
    assert torch.allclose(ious, torch.tensor([7 / 12, 13 / 18, 1.0], dtype=torch.float64))
    m = segmentation_metrics(pred, seg, cat, PARTS)
    assert m["test_miou_i"] == pytest.approx(100 * (7 / 12 + 13 / 18 + 1) / 3)
    assert m["test_miou_c"] == pytest.approx(100 * (7 / 12 + (13 / 18 + 1) / 2) / 2)
    assert m["test_acc"] == pytest.approx(100 * 10 / 12)


def test_predictions_are_restricted_to_the_category_parts():
    # the largest logit is on a part of the other category: it must not be chosen
    logits = torch.full((1, 3, 5), -5.0)
    logits[0, :, 3] = 10.0                              # part 3 belongs to category 1
    logits[0, 0, 1] = 1.0
    logits[0, 1, 0] = 2.0
    logits[0, 2, 0] = 0.5
    logits[0, 2, 1] = 0.5                               # tie -> the lower part id
    pred = restricted_argmax(logits, torch.tensor([0]), category_part_mask(PARTS, 5))
    assert pred.tolist() == [[1, 0, 0]]
    m = segmentation_metrics(logits, torch.tensor([[1, 0, 0]]), torch.tensor([0]), PARTS)
    assert m["test_miou_i"] == pytest.approx(100.0) and m["test_acc"] == pytest.approx(100.0)


def _slow_reference(logits, seg, cat, parts):
    """The official loop, shape by shape, in numpy."""
    per_cat: dict[int, list[float]] = {}
    all_ious, correct = [], 0
    for i in range(logits.shape[0]):
        ids = parts[cat[i]]
        pred = np.argmax(logits[i][:, ids], 1) + ids[0]
        correct += int((pred == seg[i]).sum())
        ious = []
        for p in ids:
            if (seg[i] == p).sum() == 0 and (pred == p).sum() == 0:
                ious.append(1.0)
            else:
                ious.append(((seg[i] == p) & (pred == p)).sum() / float(((seg[i] == p) | (pred == p)).sum()))
        per_cat.setdefault(int(cat[i]), []).append(float(np.mean(ious)))
        all_ious.append(float(np.mean(ious)))
    return (100 * np.mean([np.mean(v) for v in per_cat.values()]), 100 * np.mean(all_ious),
            100 * correct / seg.size)


def test_matches_the_slow_reference_on_shapenetpart_parts():
    g = torch.Generator().manual_seed(3)
    parts = part_table(SEG_CLASSES)
    M, N = 40, 64
    cat = torch.randint(0, 16, (M,), generator=g)
    seg = torch.stack([torch.tensor(parts[c])[torch.randint(0, len(parts[c]), (N,), generator=g)] for c in cat])
    logits = torch.randn(M, N, 50, generator=g)
    logits[torch.arange(M)[:, None], torch.arange(N), seg] += 1.0   # better than chance
    want = _slow_reference(logits.numpy(), seg.numpy(), cat.numpy(), parts)
    got = segmentation_metrics(logits, seg, cat, parts)
    assert (got["test_miou_c"], got["test_miou_i"], got["test_acc"]) == pytest.approx(want, rel=1e-9)
    acc = SegMetricAccumulator(SEG_CLASSES.values(), 50)
    for sl in (slice(0, 7), slice(7, 30), slice(30, 40)):
        acc.update(logits[sl], seg[sl], cat[sl])
    assert acc.compute("val") == pytest.approx({"val_" + k[5:]: v for k, v in got.items()}, rel=1e-12)


def test_bad_input_is_named():
    with pytest.raises(DataError, match=r"category indices span \[0, 2\], expected 0..1"):
        shape_ious(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 2]), PARTS)
    with pytest.raises(DataError, match=r"part ids \[0, 7\] outside 0..4"):
        category_part_mask([[0, 7]], 5)
    with pytest.raises(DataError, match=r"seg holds part ids in \[0, 9\], expected 0..4"):
        shape_ious(torch.zeros(1, 2), torch.tensor([[0, 9]]), torch.tensor([0]), PARTS)
