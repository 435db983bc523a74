"""Rank correlations of a GM3D teacher's GC scores with per-patch quantities (``tools/gc_probe.py``).

For every shape, the EMA teacher scores the patches of the complete cloud and the scores are
Spearman-correlated with the patch centre's coordinates, its distance from the cloud's centre, the
patch's flatness, linearity and spread (:func:`patch_quantities`), and optionally with the student's own GC
training target under random and GM3D masks (:func:`target_correlations`).
"""

from __future__ import annotations

from typing import Any

import torch

from models.losses import spearman_per_row
from tools.vis.diagnostics import mask_scale_patches, probe_indices
from tools.vis.forward import mask_generator, masked_forward, random_masker
from tools.vis.loading import LoadedCheckpoint, NoGCDecoderError, default_split, is_gm3d, load_checkpoint

__all__ = ["MASK_SEEDS", "QUANTITIES", "open_probe", "patch_quantities", "probe", "score_correlations",
           "table", "target_correlations"]

QUANTITIES = ("x", "y", "z", "radius", "flatness", "linearity", "spread")
MASK_SEEDS = (0, 1, 2)


def patch_quantities(center: torch.Tensor, neighborhood: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-patch quantities (B, G) from centres (B, G, 3) and centred patches (B, G, K, 3).

    With the patch covariance's eigenvalues l1 >= l2 >= l3: ``flatness`` = l3 / (l1 + l2 + l3) (0 for a
    plane, 1/3 for an isotropic blob), ``linearity`` = (l1 - l2) / l1 (1 for a line or a thin leg, about 0
    for a disc or a blob), ``spread`` = l1 + l2 + l3."""
    nb = neighborhood.float()
    cov = torch.einsum("bgki,bgkj->bgij", nb, nb) / nb.shape[2]
    ev = torch.linalg.eigvalsh(cov)                                          # ascending
    total = ev.sum(-1)
    c = center.float()
    return {"x": c[..., 0], "y": c[..., 1], "z": c[..., 2],
            "radius": (c - c.mean(1, keepdim=True)).norm(dim=-1),
            "flatness": ev[..., 0] / total.clamp_min(1e-12),
            "linearity": (ev[..., 2] - ev[..., 1]) / ev[..., 2].clamp_min(1e-12), "spread": total}


def score_correlations(scores: torch.Tensor, center: torch.Tensor,
                       neighborhood: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spearman correlation per shape (B,) of the scores (B, G) with each of :data:`QUANTITIES`."""
    return {k: spearman_per_row(scores, v) for k, v in patch_quantities(center, neighborhood).items()}


@torch.no_grad()
def target_correlations(model, p, scores: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
    """Per shape (B,): Spearman of the teacher ``scores`` (B, G) with the student's GC training target on
    the masked patches, under random masks (``random_mask``) and the model's GM3D mask at ``epoch``
    (``gm3d_mask``), each averaged over :data:`MASK_SEEDS`."""
    maskers = {"random_mask": random_masker(model.masker), "gm3d_mask": model.masker}
    out = {}
    for name, masker in maskers.items():
        rhos = []
        for seed in MASK_SEEDS:
            mask = masker(model.mask_centers(p), generator=mask_generator(seed), epoch=epoch, scores=scores)
            B, M = mask.shape[0], int(mask[0].sum())
            target = masked_forward(model, p, mask, reconstruct=False, gc_target=True).gc_target
            rhos.append(spearman_per_row(scores[mask].view(B, M), target))
        out[name] = torch.stack(rhos).mean(0)
    return out


def open_probe(ckpt: str, split: str | None = None) -> tuple[LoadedCheckpoint, Any]:
    """A GM3D checkpoint, loaded, and the data split to probe it on (default: svm_test, else train)."""
    from tools.engine.builders import build_split

    ck = load_checkpoint(ckpt)
    if not is_gm3d(ck.model):
        raise NoGCDecoderError(f"{ckpt}: {type(ck.model).__name__} has no GC decoder; "
                               f"gc_probe needs a GM3D checkpoint")
    return ck, build_split(ck.config, split or default_split(ck.config))


@torch.no_grad()
def probe(ckpt: str | LoadedCheckpoint, split: str | None = None, batch_size: int = 64,
          limit: int | None = None, targets: bool = False, dataset=None) -> dict[str, torch.Tensor]:
    """Correlations of a GM3D checkpoint's teacher scores over a split: name -> (num_shapes,).

    ``limit`` shapes spread evenly over the split (every class; all of them by default).
    ``ckpt`` may be a path or a :class:`LoadedCheckpoint` given with its ``dataset`` (:func:`open_probe`).
    Keys: :data:`QUANTITIES`, and with ``targets`` also ``random_mask`` / ``gm3d_mask``
    (:func:`target_correlations`)."""
    ck, dataset = (ckpt, dataset) if isinstance(ckpt, LoadedCheckpoint) else open_probe(ckpt, split)
    model = ck.model.eval()
    indices = probe_indices(len(dataset), limit)
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(indices), batch_size):
        pts = torch.stack([dataset[i]["points"] for i in indices[start:start + batch_size]])
        p = model.group(pts.float())
        scores = model.teacher_scores(p)
        ms = mask_scale_patches(p)                  # the mask scale of a multi-scale backbone
        corr = score_correlations(scores, ms.center, ms.neighborhood)
        if targets:
            corr.update(target_correlations(model, p, scores, max(ck.epoch, 0)))
        for k, v in corr.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def table(results: dict[str, dict[str, torch.Tensor]]) -> str:
    """A Markdown table: one row per checkpoint, ``mean (mean |rho|)`` per quantity."""
    cols = [k for k in (*QUANTITIES, "random_mask", "gm3d_mask") if all(k in c for c in results.values())]
    head = "| checkpoint | shapes | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, corr in results.items():
        cells = [f"{corr[k].mean():+.2f} ({corr[k].abs().mean():.2f})" for k in cols]
        lines.append(f"| {name} | {len(corr['x'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
