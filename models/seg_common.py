"""Pieces shared by the part-segmentation heads of every backbone (docs/SEGMENTATION.md).

* :func:`three_nn_interpolate`: features known at a few points (patch centres) interpolated to every
  point from its three nearest known points, weights ``1 / (d^2 + 1e-8)`` normalised to sum to 1.
* :class:`FeaturePropagation`: the PointNet++ feature-propagation layer of the official seg heads
  (keys ``mlp_convs.{i}``, ``mlp_bns.{i}``): ``[skip features ; interpolated]`` then Conv1d-BN-ReLU
  for each width of ``mlp``.
* :func:`category_one_hot`: the (B, num_categories) one-hot of the object category, with a clear error
  for an index out of range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import DataError

__all__ = ["three_nn_interpolate", "FeaturePropagation", "category_one_hot"]


def three_nn_interpolate(xyz: torch.Tensor, known_xyz: torch.Tensor, known_feats: torch.Tensor,
                         k: int = 3) -> torch.Tensor:
    """(B, N, 3) targets, (B, S, 3) known points with (B, S, C) features -> (B, N, C) interpolated.

    Squared distances; the ``k`` nearest known points (all of them when S < k; S == 1 copies the one
    feature), inverse squared-distance weights with ``1e-8`` added, normalised."""
    B, N, _ = xyz.shape
    S = known_xyz.shape[1]
    if S == 1:
        return known_feats.expand(B, N, known_feats.shape[-1])
    d2 = (xyz.unsqueeze(2) - known_xyz.unsqueeze(1)).square().sum(-1)          # (B, N, S)
    d2, idx = d2.topk(min(k, S), dim=-1, largest=False, sorted=True)
    w = 1.0 / (d2 + 1e-8)
    w = w / w.sum(-1, keepdim=True)
    rows = torch.arange(B, device=xyz.device).view(B, 1, 1)
    return (known_feats[rows, idx] * w.unsqueeze(-1)).sum(2)


class FeaturePropagation(nn.Module):
    """PointNet++ feature propagation (official ``PointNetFeaturePropagation``, channels-first convs).

    Args:
        in_channel: skip channels + propagated channels.
        mlp: output widths of the Conv1d-BN-ReLU layers.
    """

    def __init__(self, in_channel: int, mlp: Sequence[int]):
        super().__init__()
        self.mlp_convs = nn.ModuleList()
        self.mlp_bns = nn.ModuleList()
        last = in_channel
        for width in mlp:
            self.mlp_convs.append(nn.Conv1d(last, int(width), 1))
            self.mlp_bns.append(nn.BatchNorm1d(int(width)))
            last = int(width)
        self.out_channels = last

    def forward(self, xyz: torch.Tensor, known_xyz: torch.Tensor, skip: torch.Tensor | None,
                known_feats: torch.Tensor) -> torch.Tensor:
        """(B, N, 3), (B, S, 3), skip (B, N, D) or None, (B, S, C) -> (B, out_channels, N)."""
        x = three_nn_interpolate(xyz, known_xyz, known_feats)
        if skip is not None:
            x = torch.cat([skip, x], dim=-1)                                     # the skip comes first
        x = x.transpose(1, 2)
        for conv, bn in zip(self.mlp_convs, self.mlp_bns):
            x = F.relu(bn(conv(x)))
        return x


def category_one_hot(category: torch.Tensor, num_categories: int, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """(B,) category indices -> (B, num_categories) one-hot of ``dtype`` (the model's: float64 in a float64 model)."""
    category = category.reshape(-1).long()
    if category.numel() and (int(category.min()) < 0 or int(category.max()) >= num_categories):
        raise DataError(f"object categories span [{int(category.min())}, {int(category.max())}] but the "
                        f"segmentation model has num_categories={num_categories} (check model.num_categories "
                        f"against the data set)")
    return F.one_hot(category, num_categories).to(dtype)
