"""Part-segmentation metrics, as the official ShapeNetPart evaluation computes them (docs/SEGMENTATION.md).

* Predictions are restricted to the parts of the shape's ground-truth category: the arg-max over that
  category's part logits only (:func:`restricted_argmax`).
* Per shape, the IoU of each part of its category; a part absent from both the prediction and the
  ground truth counts as IoU 1; the shape's IoU is the mean over its category's parts
  (:func:`shape_ious`).
* ``miou_i`` (instance mIoU) is the mean shape IoU over all shapes; ``miou_c`` (class mIoU) is the mean
  over categories of the mean shape IoU of that category's shapes (categories without a test shape are
  left out; the full ShapeNetPart test split has all 16); ``acc`` is the overall point accuracy of the
  restricted predictions. All three in percent.

Pure tensor code (no files, no command-line imports); :class:`SegMetricAccumulator` collects per-batch
results so an evaluator never holds all the logits at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from utils.errors import DataError

__all__ = ["part_table", "category_part_mask", "restricted_argmax", "shape_ious", "reduce_shape_ious",
           "segmentation_metrics", "SegMetricAccumulator"]

PartTable = Sequence[Sequence[int]]


def part_table(seg_classes: Mapping[str, Sequence[int]] | PartTable, classes: Sequence[str] | None = None
               ) -> list[list[int]]:
    """Category index -> its part ids. ``seg_classes`` is either a list in category order or a mapping
    ``name -> parts`` read in the order of ``classes`` (default: the mapping's own order)."""
    if isinstance(seg_classes, Mapping):
        names = list(classes) if classes is not None else list(seg_classes)
        missing = [n for n in names if n not in seg_classes]
        if missing:
            raise DataError(f"seg_classes has no parts for categories {missing}")
        return [[int(p) for p in seg_classes[n]] for n in names]
    return [[int(p) for p in parts] for parts in seg_classes]


def category_part_mask(parts: PartTable, num_parts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, num_parts) bool: ``mask[k, p]`` is True when part ``p`` belongs to category ``k``."""
    mask = torch.zeros(len(parts), num_parts, dtype=torch.bool, device=device)
    for k, ids in enumerate(parts):
        if not ids:
            raise DataError(f"category {k} has no parts")
        if min(ids) < 0 or max(ids) >= num_parts:
            raise DataError(f"category {k} has part ids {list(ids)} outside 0..{num_parts - 1} "
                            f"(the model predicts {num_parts} parts)")
        mask[k, list(ids)] = True
    return mask


def _check_category(category: torch.Tensor, n_categories: int) -> torch.Tensor:
    category = category.reshape(-1).long()
    if category.numel() and (int(category.min()) < 0 or int(category.max()) >= n_categories):
        raise DataError(f"category indices span [{int(category.min())}, {int(category.max())}], "
                        f"expected 0..{n_categories - 1}")
    return category


def restricted_argmax(logits: torch.Tensor, category: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(M, N, P) part scores -> (M, N) predicted part ids among the parts of each shape's category.

    ``mask`` is :func:`category_part_mask`; ties go to the lowest part id (as an arg-max over the
    category's contiguous slice of logits)."""
    if logits.dim() != 3 or logits.shape[-1] != mask.shape[1]:
        raise DataError(f"restricted_argmax: expected (M, N, {mask.shape[1]}) logits, got {tuple(logits.shape)}")
    category = _check_category(category, mask.shape[0]).to(logits.device)
    allowed = mask.to(logits.device)[category].unsqueeze(1)                   # (M, 1, P)
    return logits.float().masked_fill(~allowed, float("-inf")).argmax(-1)


def shape_ious(pred: torch.Tensor, seg: torch.Tensor, category: torch.Tensor, parts: PartTable) -> torch.Tensor:
    """(M,) float64 IoU of every shape: the mean over its category's parts of ``|P & T| / |P | T|``,
    1 for a part absent from both the prediction ``pred`` (M, N) and the truth ``seg`` (M, N)."""
    if pred.shape != seg.shape or pred.dim() != 2:
        raise DataError(f"shape_ious: pred {tuple(pred.shape)} and seg {tuple(seg.shape)} must both be (M, N)")
    category = _check_category(category, len(parts)).cpu()
    if category.numel() != pred.shape[0]:
        raise DataError(f"shape_ious: {category.numel()} categories for {pred.shape[0]} shapes")
    num_parts = 1 + max(max(p) for p in parts)
    pred, seg = pred.long().cpu(), seg.long().cpu()
    for name, t in (("pred", pred), ("seg", seg)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_parts):
            raise DataError(f"shape_ious: {name} holds part ids in [{int(t.min())}, {int(t.max())}], "
                            f"expected 0..{num_parts - 1}")
    M = pred.shape[0]
    row = torch.arange(M).unsqueeze(1) * num_parts
    size = M * num_parts
    inter = torch.bincount((row + seg)[pred == seg], minlength=size).view(M, num_parts).double()
    area_p = torch.bincount((row + pred).reshape(-1), minlength=size).view(M, num_parts).double()
    area_t = torch.bincount((row + seg).reshape(-1), minlength=size).view(M, num_parts).double()
    union = area_p + area_t - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    mask = category_part_mask(parts, num_parts)[category].double()            # (M, P)
    return (iou * mask).sum(1) / mask.sum(1)


def reduce_shape_ious(ious: torch.Tensor, category: torch.Tensor, correct: int, total: int,
                      prefix: str = "test") -> dict[str, float]:
    """``{prefix}_miou_c``, ``{prefix}_miou_i`` and ``{prefix}_acc`` (percent) from per-shape IoUs."""
    if ious.numel() == 0:
        raise DataError("segmentation metrics of an empty set of shapes")
    category = category.reshape(-1).long().cpu()
    per_cat = torch.stack([ious[category == c].mean() for c in category.unique()])
    return {f"{prefix}_miou_c": float(per_cat.mean() * 100), f"{prefix}_miou_i": float(ious.mean() * 100),
            f"{prefix}_acc": 100.0 * correct / max(total, 1)}


def segmentation_metrics(logits_or_pred: torch.Tensor, seg: torch.Tensor, category: torch.Tensor,
                         parts: PartTable, prefix: str = "test") -> dict[str, float]:
    """mIoU_c, mIoU_i and point accuracy of (M, N, P) logits (restricted to each category's parts
    first) or of (M, N) predicted part ids (used as they are)."""
    parts = part_table(parts)
    if logits_or_pred.dim() == 3:
        pred = restricted_argmax(logits_or_pred, category, category_part_mask(parts, logits_or_pred.shape[-1]))
    else:
        pred = logits_or_pred
    ious = shape_ious(pred, seg, category, parts)
    correct = int((pred.long().cpu() == seg.long().cpu()).sum())
    return reduce_shape_ious(ious, category, correct, seg.numel(), prefix)


class SegMetricAccumulator:
    """Collects per-batch segmentation results; :meth:`compute` gives :func:`reduce_shape_ious`."""

    def __init__(self, parts: PartTable, num_parts: int):
        self.parts = part_table(parts)
        self.mask = category_part_mask(self.parts, num_parts)
        self.ious: list[torch.Tensor] = []
        self.categories: list[torch.Tensor] = []
        self.correct = 0
        self.total = 0

    def update(self, logits: torch.Tensor, seg: torch.Tensor, category: torch.Tensor) -> None:
        pred = restricted_argmax(logits, category, self.mask).cpu()
        seg = seg.long().cpu()
        self.ious.append(shape_ious(pred, seg, category, self.parts))
        self.categories.append(category.reshape(-1).long().cpu())
        self.correct += int((pred == seg).sum())
        self.total += seg.numel()

    def compute(self, prefix: str = "test") -> dict[str, float]:
        return reduce_shape_ious(torch.cat(self.ious), torch.cat(self.categories), self.correct, self.total,
                                 prefix)
