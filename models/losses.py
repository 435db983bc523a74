"""Losses of the GM3D objective that are not point ops (Chamfer lives in ``extensions``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.layers import at_least_float32

__all__ = ["gc_ranking_loss", "normalized_mse", "spearman_per_row"]


def gc_ranking_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HPM's relative loss-prediction loss over ordered pairs of each row (docs/METHOD.md, section 4.3).

    For every sample b and ordered pair (i, j) with target_j != target_i the logit is
    ``pred_j - pred_i`` and the label is ``target_j > target_i``; binary cross-entropy with
    ``eps`` inside the logs, summed and divided by the number of non-tied pairs in the batch.

    Args:
        pred: (B, M) predicted GC scores (gradient flows here).
        target: (B, M) per-patch reconstruction errors (detached here).

    Returns:
        Scalar loss (0 when every pair is tied).
    """
    target = target.detach()
    dt = target.unsqueeze(1) - target.unsqueeze(2)      # [b, i, j] = t_j - t_i
    dp = pred.unsqueeze(1) - pred.unsqueeze(2)          # [b, i, j] = p_j - p_i
    pos, neg = dt > 0, dt < 0
    s = torch.sigmoid(at_least_float32(dp))
    nll = -(pos * torch.log(s + eps) + neg * torch.log(1 - s + eps))
    return nll.sum() / (pos | neg).sum().clamp_min(1)


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token ``|| p/|p| - t/|t| ||^2`` (= 2 - 2 cos) over the last dim; target detached. (...,C)->(...)"""
    p = F.normalize(at_least_float32(pred), dim=-1)
    t = F.normalize(at_least_float32(target.detach()), dim=-1)
    return (p - t).square().sum(-1)


def spearman_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of a and b (B, M) -> (B,), ties broken by position."""
    ra = a.float().argsort(1).argsort(1).float()
    rb = b.float().argsort(1).argsort(1).float()
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
