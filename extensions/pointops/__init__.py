"""Point ops behind one door: FPS, kNN, gather, Point-MAE grouping, Chamfer and EMD.

Every op is batched, vectorised and device-agnostic. Each dispatches per call to an optional
accelerator or to the plain-PyTorch reference (:mod:`extensions.pointops.reference`); the policy is
the ``GM3D_OPS`` environment variable (see :mod:`extensions.pointops.dispatch`) and
:func:`backends` reports the choice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from extensions.pointops import dispatch, reference
from extensions.pointops.reference import KNN, Reduction
from utils.errors import DataError

__all__ = [
    "KNN",
    "Patches",
    "backends",
    "chamfer_l1",
    "chamfer_l2",
    "emd",
    "fps",
    "gather",
    "group",
    "knn",
]


class Patches(NamedTuple):
    """Point-MAE patches returned by :func:`group`.

    Attributes:
        neighborhood: (B, G, K, 3) neighbour coordinates minus their patch centre.
        center: (B, G, 3) patch centres (farthest point samples of the cloud).
        idx: (B, G, K) int64 indices of the neighbours into the N input points.
    """

    neighborhood: Tensor
    center: Tensor
    idx: Tensor


def fps(xyz: Tensor, npoint: int) -> Tensor:
    """Farthest point sampling started at index 0.

    Squared Euclidean distances; ties go to the lowest index (``argmax``). Computed in float32 for
    float16/bfloat16 input. Not differentiable.

    Args:
        xyz: (B, N, 3) points.
        npoint: number of samples, 0 <= npoint <= N.

    Returns:
        (B, npoint) int64 indices into N.
    """
    return dispatch.fps(xyz, npoint)


def knn(query: Tensor, ref: Tensor, k: int, sorted: bool = True) -> KNN:
    """The k nearest reference points of every query point.

    Args:
        query: (B, M, 3) query points (they may be part of ``ref``).
        ref: (B, N, 3) reference points.
        k: neighbours per query, 1 <= k <= N.
        sorted: neighbours in ascending distance order (False: ``topk``'s unspecified order).

    Returns:
        :class:`KNN` ``(dist, idx)``: (B, M, k) Euclidean distances (float32 for low-precision
        input) and (B, M, k) int64 indices into N. ``idx`` carries no gradient; ``dist`` does.
    """
    return reference.knn(query, ref, k, sorted=sorted)


def gather(x: Tensor, idx: Tensor) -> Tensor:
    """Batched gather of rows, differentiable with respect to ``x``.

    Args:
        x: (B, N, C) points or features.
        idx: (B, *S) int64 (or int32) indices into N.

    Returns:
        (B, *S, C) tensor with ``out[b, s] = x[b, idx[b, s]]``.
    """
    return reference.gather(x, idx)


def _validate_group_input(xyz: Tensor, num_group: int, group_size: int) -> None:
    """Raise :class:`DataError` for a cloud that cannot be grouped; one cheap check when valid."""
    if num_group < 1 or group_size < 1:
        raise ValueError(f"group: num_group={num_group} and group_size={group_size} must be >= 1")
    reference.check_points(xyz, "xyz", "group")
    n = xyz.shape[1]
    if n < num_group:
        raise DataError(f"group: the cloud has N={n} points, fewer than num_group={num_group} centres")
    if n < group_size:
        raise DataError(f"group: the cloud has N={n} points, fewer than group_size={group_size} neighbours")
    finite = torch.isfinite(xyz)
    if not bool(finite.all()):
        bad = ~finite
        entries = bad.flatten(1).any(1).nonzero().flatten().tolist()
        shown = ", ".join(str(i) for i in entries[:10]) + (", ..." if len(entries) > 10 else "")
        raise DataError(
            f"group: xyz holds {int(bad.sum())} non-finite (NaN/inf) coordinates in "
            f"{int(bad.any(-1).sum())} points, in {len(entries)} of {xyz.shape[0]} batch entries: [{shown}]"
        )


def group(xyz: Tensor, num_group: int, group_size: int) -> Patches:
    """Point-MAE ``Group``: FPS centres, their kNN patches, coordinates relative to the centre.

    The centre is one of the cloud's points, so it is its own nearest neighbour: ``idx[..., 0]`` is
    the centre (or an exact duplicate of it) and ``neighborhood[..., 0, :]`` is zero. Patches overlap.
    Differentiable with respect to ``xyz`` through the gathers.

    Args:
        xyz: (B, N, 3) points, N >= num_group and N >= group_size, all finite.
        num_group: number of patches G.
        group_size: points per patch K.

    Returns:
        :class:`Patches` with ``neighborhood`` (B, G, K, 3), ``center`` (B, G, 3), ``idx`` (B, G, K).

    Raises:
        DataError: xyz is not (B, N, 3) floating point, has too few points, or non-finite values.
    """
    _validate_group_input(xyz, num_group, group_size)
    center = gather(xyz, fps(xyz, num_group))
    idx = reference.knn(center.detach(), xyz.detach(), group_size, sorted=True).idx
    neighborhood = gather(xyz, idx) - center.unsqueeze(2)
    return Patches(neighborhood, center, idx)


def chamfer_l2(a: Tensor, b: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Chamfer distance with squared distances (official ``ChamferDistanceL2``: no sqrt, no /2).

    ``d1`` (B, N): squared distance from each a-point to its nearest b-point; ``d2`` (B, M) likewise
    from b to a. Small problems use one dense distance matrix, large ones (B*N*M above
    :data:`reference.MAX_ELEMENTS` on the CPU, :data:`reference.MAX_ELEMENTS_ACCELERATOR` on CUDA)
    chunks of it with no-grad argmin and a gather recompute; the choice is automatic and gives the
    same result. Gradients flow through the matched pairs, as autograd through the brute force does.

    Args:
        a: (B, N, 3) points.
        b: (B, M, 3) points.
        reduction: ``"mean"``: ``mean(d1) + mean(d2)`` over all B*N and B*M entries, a scalar (the
            official batch mean); ``"none"``: (B,) per set, ``d1.mean(1) + d2.mean(1)``.

    Returns:
        Scalar or (B,) tensor (float32, or float64 for float64 input).
    """
    return reference.chamfer_l2(a, b, reduction)


def chamfer_l1(a: Tensor, b: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Chamfer distance with Euclidean distances: ``(mean sqrt(d1) + mean sqrt(d2)) / 2``.

    The square root is guarded (:func:`reference.safe_sqrt`): its gradient is defined as 0 where a
    point coincides exactly with its nearest neighbour (the official kernel gives inf/NaN there);
    elsewhere values and gradients are exact.

    Args:
        a: (B, N, 3) points.
        b: (B, M, 3) points.
        reduction: ``"mean"`` (scalar over all entries) or ``"none"`` ((B,) per set, each halved).

    Returns:
        Scalar or (B,) tensor (float32, or float64 for float64 input).
    """
    return reference.chamfer_l1(a, b, reduction)


def emd(a: Tensor, b: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Exact earth mover's distance between equal-size sets: mean squared distance of the best match.

    The matching is solved exactly on the CPU (scipy Hungarian, no grad); the value is recomputed from
    the matched points on the input's device and is differentiable. The official approximate EMD also
    sums squared distances over its (soft) match and divides by N. For evaluation: O(N^3) per set.

    Args:
        a: (B, N, 3) points.
        b: (B, N, 3) points.
        reduction: ``"mean"`` (scalar over all B*N pairs) or ``"none"`` ((B,) per set).

    Returns:
        Scalar or (B,) tensor (float32, or float64 for float64 input).
    """
    return reference.emd(a, b, reduction)


def backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Backend in use per op for tensors on ``device``, e.g. ``{"fps": "reference", ...}``."""
    return dispatch.backends(device)
