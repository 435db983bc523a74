"""Inference passes of the views on a pre-training model (no gradients, the caller's RNG untouched).

Every call into the model's internals made by ``tools/visualize.py`` and ``tools/gc_probe.py`` is in
this module (and in :mod:`tools.vis.loading`): the grouping (``model.group``), the EMA teacher's scores
(``model.teacher_scores``), the masker (``model.masker``), and in :func:`masked_forward` the encoder
(``model.encode``, the backbone contract), the Point-MAE decoder and point head of the reconstruction
pictures (``decode``, ``reconstruct``) and the GM3D per-patch terms (``model.per_patch_terms``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tools.vis.loading import LoadedCheckpoint, NoGCDecoderError, is_gm3d

__all__ = ["MaskedForward", "gc_state", "is_multiscale", "mask_generator", "masked_forward", "patch_of_point",
           "random_masker", "recon_state"]


def mask_generator(seed: int) -> torch.Generator:
    """The CPU generator every mask of the views is drawn from."""
    return torch.Generator().manual_seed(int(seed))


def random_masker(masker):
    """A GM3D masker with the same ratio and masked count but no score curriculum: a plain random mask."""
    from models.masking import GM3DMask

    return GM3DMask(masker.ratio, alpha_max=0.0, count=masker.count)


def _student(model: torch.nn.Module) -> torch.nn.Module:
    from models.gm3d import GM3D

    return model.student if isinstance(model, GM3D) else model


def is_multiscale(model: torch.nn.Module) -> bool:
    """Whether the (student) backbone is Point-M2AE: a list of scales, the mask decided at the coarsest."""
    from models.point_m2ae import PointM2AE

    return isinstance(_student(model), PointM2AE)


def patch_of_point(points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(N, 3), (G, 3) -> (N,) index of the nearest patch centre of every point."""
    return torch.cdist(points.float(), center.float()).argmin(dim=1)


@dataclass
class MaskedForward:
    """What the student computes for grouped clouds under a mask (B clouds, M masked patches each)."""

    x_vis: torch.Tensor                      # (B, G - M, C) encoder tokens of the visible patches
    decoded: torch.Tensor | None = None      # (B, M, C) decoded mask tokens (``reconstruct``)
    pred: torch.Tensor | None = None         # (B, M, K, 3) predicted patches, centred (``reconstruct``)
    gc_target: torch.Tensor | None = None    # (B, M) the GC decoder's training target (``gc_target``)


@torch.no_grad()
def masked_forward(model: torch.nn.Module, p, mask: torch.Tensor, *, reconstruct: bool = True,
                   gc_target: bool = False, point_head: torch.nn.Module | None = None) -> MaskedForward:
    """The student's forward pass on grouped clouds ``p`` under ``mask`` (B, G), True = masked.

    ``reconstruct``: decode the mask tokens and predict their patches, with the model's own point head or
    ``point_head`` (variant B: the knowledge teacher's head, see :class:`LoadedCheckpoint`).
    ``gc_target``: the per-masked-patch error that a GM3D model's GC decoder learns to rank (point
    Chamfer, plus the feature-KD error for variants B and C), as in training.
    """
    from models.gm3d import GM3D

    B, M = mask.shape[0], int(mask[0].sum())
    student = model.student if isinstance(model, GM3D) else model   # the Point-MAE pieces of the pictures
    if reconstruct and is_multiscale(model):
        raise NotImplementedError("masked_forward(reconstruct=True) decodes Point-MAE patches; Point-M2AE "
                                  "reconstructions come from recon_state (second-scale tokens)")
    out = MaskedForward(x_vis=model.encode(p, mask))
    if reconstruct:
        out.decoded = student.decode(out.x_vis, p.center, mask, student.mask_token, student.MAE_decoder)[:, -M:]
        if point_head is not None:
            K = student.group_size
            out.pred = point_head(out.decoded.transpose(1, 2)).transpose(1, 2).reshape(B, M, K, 3)
        else:
            out.pred = student.reconstruct(out.decoded)                                # (B, M, K, 3)
    if gc_target:
        out.gc_target = model.per_patch_terms(p, mask, out.x_vis)[3]
    return out


@torch.no_grad()
def gc_state(model: torch.nn.Module, points: torch.Tensor, epoch: int, seed: int = 0) -> dict[str, Any]:
    """The EMA teacher's GC scores and the GM3D mask of one cloud at ``epoch``.

    Returns numpy arrays: ``points`` (N, 3), ``center`` (G, 3), ``scores`` (G,), ``mask`` (G,) bool
    (True = masked), ``selected`` (G,) bool (the N_sel top-scored patches, always masked),
    ``point_patch`` (N,), and ints ``n_sel``, ``n_masked``.
    """
    if not is_gm3d(model):
        raise NoGCDecoderError(f"{type(model).__name__} has no GC decoder")
    device = next(model.parameters()).device
    pts = points.to(device=device, dtype=torch.float32)[None]
    p = model.group(pts)
    center = model.mask_centers(p)                                                 # (1, G, 3) mask scale
    scores = model.teacher_scores(p)                                               # (1, G)
    masker = model.masker
    if epoch < 0:  # before training (the engine's epoch -1): no curriculum yet, a random mask
        masker = random_masker(masker)
    epoch = max(epoch, 0)
    mask = masker(center, generator=mask_generator(seed), epoch=epoch, scores=scores)
    G = center.shape[1]
    n_sel = int(masker.num_selected(epoch, G))
    selected = torch.zeros(G, dtype=torch.bool)
    if n_sel > 0:
        selected[scores[0].topk(n_sel).indices.cpu()] = True
    return {"points": pts[0].cpu().numpy(), "center": center[0].cpu().numpy(),
            "scores": scores[0].cpu().numpy(), "mask": mask[0].cpu().numpy(), "selected": selected.numpy(),
            "point_patch": patch_of_point(pts[0], center[0]).cpu().numpy(), "n_sel": n_sel,
            "n_masked": int(mask[0].sum())}


@torch.no_grad()
def recon_state(ck: LoadedCheckpoint, points: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Mask one cloud as the checkpoint's training did at its epoch and reconstruct the masked patches.

    Returns numpy arrays: ``points`` (N, 3), ``center`` (G, 3) and ``mask`` (G,) at the mask scale,
    ``visible`` (V*K, 3) visible patch points, ``pred`` (M, K, 3) and ``target`` (M, K', 3) masked
    patches in cloud coordinates, ``pred_center`` (M, 3), and ``chamfer`` (the mean CD-l2 of the masked
    patches, the training loss's terms).

    Point-M2AE (and Point-M2AE + GM3D): the mask is drawn at the coarsest scale (``center``, ``mask``);
    ``visible`` is the points of the finest-scale patches left visible by its propagation, and the
    reconstruction is what the model predicts in training: for every masked second-scale token its
    ``group_sizes[0]`` points (``pred``, around ``pred_center``) against the ``group_sizes[1]``
    finest-scale centres of its group (``target``).
    """
    from extensions import chamfer_l2

    model, epoch = ck.model, max(ck.epoch, 0)
    device = next(model.parameters()).device
    pts = points.to(device=device, dtype=torch.float32)[None]
    p = model.group(pts)
    center = model.mask_centers(p)
    scores = None
    if ck.is_gm3d and model.masker.num_selected(epoch, center.shape[1]) > 0:
        scores = model.teacher_scores(p)
    mask = model.masker(center, generator=mask_generator(seed), epoch=epoch, scores=scores)
    if is_multiscale(model):
        return _m2ae_recon(model, pts, p, mask)
    M = int(mask[0].sum())
    pred = masked_forward(model, p, mask, point_head=ck.point_head).pred          # (1, M, K, 3)
    K = pred.shape[2]
    c_m = p.center[mask].view(1, M, 1, 3)
    target = p.neighborhood[mask].view(1, M, K, 3)
    cd = chamfer_l2(pred.reshape(M, K, 3).float(), target.reshape(M, K, 3).float(), reduction="none").mean()
    vis = (p.neighborhood + p.center[:, :, None])[~mask]                          # (V, K, 3)
    return {"points": pts[0].cpu().numpy(), "center": p.center[0].cpu().numpy(),
            "mask": mask[0].cpu().numpy(),
            "visible": vis.reshape(-1, 3).cpu().numpy(), "pred": (pred + c_m)[0].cpu().numpy(),
            "target": (target + c_m)[0].cpu().numpy(), "pred_center": c_m[0, :, 0].cpu().numpy(),
            "chamfer": float(cd)}


@torch.no_grad()
def _m2ae_recon(model: torch.nn.Module, pts: torch.Tensor, groups, mask: torch.Tensor) -> dict[str, Any]:
    """:func:`recon_state` of a Point-M2AE student (one cloud, coarsest-scale ``mask``)."""
    student = _student(model)
    enc = student.encode(groups, mask)
    _, x = student.decode(groups, enc, mask)
    per_tok, fine_mask = student.fine_token_loss(groups, enc, x)                  # (L,), (1, G_1)
    rec = x[fine_mask]
    L = rec.shape[0]
    c1 = groups[1].center[fine_mask].view(L, 1, 3)
    pred = student.rec_head(rec.unsqueeze(-1)).reshape(L, -1, 3) + c1
    target = groups[1].neighborhood[fine_mask].view(L, -1, 3) + c1
    g0 = groups[0]
    vis = (g0.neighborhood + g0.center[:, :, None])[~enc.masks[0]]                # (V0, K0, 3)
    return {"points": pts[0].cpu().numpy(), "center": groups[-1].center[0].cpu().numpy(),
            "mask": mask[0].cpu().numpy(), "visible": vis.reshape(-1, 3).cpu().numpy(),
            "pred": pred.cpu().numpy(), "target": target.cpu().numpy(), "pred_center": c1[:, 0].cpu().numpy(),
            "chamfer": float(per_tok.mean()) if L else 0.0}
