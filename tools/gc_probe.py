"""What do a GM3D teacher's GC scores follow? Position, or local geometry?

For every shape of a split (default: the checkpoint config's ``svm_test``), the EMA teacher scores the
patches of the complete cloud, and the scores are rank-correlated (Spearman, per shape) with simple
per-patch quantities:

* ``x``, ``y``, ``z``: the patch centre's coordinates (``y`` is up in the generated data);
* ``radius``: the centre's distance from the cloud's centre;
* ``flatness``: smallest / summed eigenvalue of the patch's covariance (0 for a plane, 1/3 for an
  isotropic blob): a curvature-like measure of local geometric complexity;
* ``spread``: summed covariance eigenvalues, the patch's size.

The table gives the mean correlation over shapes and the mean of its absolute value.

With ``--targets`` it also rank-correlates the scores with the student's own GC training target (the
per-patch error that the GC decoder learns to rank: point Chamfer, plus the feature-KD error for
variants B and C) on the masked patches, once under random masks and once under the GM3D mask of the
checkpoint's epoch (3 mask draws each). If the correlation held only under GM3D masks, it would be
made by the masks themselves: the top-scored patches are always masked together, and contiguous
masked regions are harder to reconstruct. A predictor of
*geometric* complexity should follow ``flatness`` (or something like it) in a consistent direction.
A strong mean correlation with one coordinate means that the scores are mostly a positional prior.
The generated shapes are rotated at random about the up axis, so a consistent ``x`` or ``z`` ordering
cannot come from the shapes themselves.

    python tools/gc_probe.py experiments/gm3d_quickstart/default/ckpt-last.pth [more.pth ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.losses import spearman_per_row

QUANTITIES = ("x", "y", "z", "radius", "flatness", "spread")
MASK_SEEDS = (0, 1, 2)


def patch_quantities(center: torch.Tensor, neighborhood: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-patch quantities (B, G) from centres (B, G, 3) and centred patches (B, G, K, 3)."""
    nb = neighborhood.float()
    cov = torch.einsum("bgki,bgkj->bgij", nb, nb) / nb.shape[2]
    ev = torch.linalg.eigvalsh(cov)                                          # ascending
    total = ev.sum(-1)
    c = center.float()
    return {"x": c[..., 0], "y": c[..., 1], "z": c[..., 2],
            "radius": (c - c.mean(1, keepdim=True)).norm(dim=-1),
            "flatness": ev[..., 0] / total.clamp_min(1e-12), "spread": total}


def score_correlations(scores: torch.Tensor, center: torch.Tensor,
                       neighborhood: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spearman correlation per shape (B,) of the scores (B, G) with each of :data:`QUANTITIES`."""
    return {k: spearman_per_row(scores, v) for k, v in patch_quantities(center, neighborhood).items()}


@torch.no_grad()
def target_correlations(model, p, scores: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
    """Per shape (B,): Spearman of the teacher ``scores`` (B, G) with the student's GC training target on
    the masked patches, under random masks (``random_mask``) and the model's GM3D mask at ``epoch``
    (``gm3d_mask``), each averaged over :data:`MASK_SEEDS`."""
    from models.masking import GM3DMask

    maskers = {"random_mask": GM3DMask(model.masker.ratio, alpha_max=0.0), "gm3d_mask": model.masker}
    out = {}
    for name, masker in maskers.items():
        rhos = []
        for seed in MASK_SEEDS:
            mask = masker(p.center, generator=torch.Generator().manual_seed(seed), epoch=epoch, scores=scores)
            B, M = mask.shape[0], int(mask[0].sum())
            x_vis = model.MAE_encoder(p.neighborhood, p.center, mask)
            target = model.per_patch_terms(p, mask, x_vis)[3]
            rhos.append(spearman_per_row(scores[mask].view(B, M), target))
        out[name] = torch.stack(rhos).mean(0)
    return out


@torch.no_grad()
def probe(ckpt: str, split: str | None = None, batch_size: int = 64, limit: int | None = None,
          targets: bool = False) -> dict[str, torch.Tensor]:
    """Correlations of a GM3D checkpoint's teacher scores over a split: name -> (num_shapes,).

    Keys: :data:`QUANTITIES`, and with ``targets`` also ``random_mask`` / ``gm3d_mask``
    (:func:`target_correlations`)."""
    from tools.builders import build_split
    from tools.visualize import NoGCDecoderError, _is_gm3d, default_split, load_checkpoint

    ck = load_checkpoint(ckpt)
    model = ck.model.eval()
    if not _is_gm3d(model):
        raise NoGCDecoderError(f"{ckpt}: {type(model).__name__} has no GC decoder; gc_probe needs a GM3D checkpoint")
    dataset = build_split(ck.config, split or default_split(ck.config))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, batch_size):
        pts = torch.stack([dataset[i]["points"] for i in range(start, min(start + batch_size, n))])
        p = model.group(pts.float())
        scores = model.teacher_scores(p.neighborhood, p.center)
        corr = score_correlations(scores, p.center, p.neighborhood)
        if targets:
            corr.update(target_correlations(model, p, scores, max(ck.epoch, 0)))
        for k, v in corr.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def table(results: dict[str, dict[str, torch.Tensor]]) -> str:
    cols = [k for k in (*QUANTITIES, "random_mask", "gm3d_mask") if all(k in c for c in results.values())]
    head = "| checkpoint | shapes | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, corr in results.items():
        cells = [f"{corr[k].mean():+.2f} ({corr[k].abs().mean():.2f})" for k in cols]
        lines.append(f"| {name} | {len(corr['x'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", help="GM3D pre-training checkpoints (ckpt-*.pth of a run)")
    ap.add_argument("--split", default=None, help="data split of the checkpoint's config (default svm_test)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N shapes only")
    ap.add_argument("--targets", action="store_true",
                    help="also correlate with the student's GC training target under random and GM3D masks")
    args = ap.parse_args(argv)
    from tools.visualize import NoGCDecoderError
    from utils.errors import CheckpointError, ConfigError, DataError

    try:
        results = {c: probe(c, args.split, limit=args.limit, targets=args.targets) for c in args.ckpts}
    except (NoGCDecoderError, CheckpointError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"gc_probe: {e}", file=sys.stderr)
        return 2
    print("Spearman correlation of the EMA teacher's GC scores with per-patch quantities, per shape"
          + (" (random_mask / gm3d_mask: with the student's GC training target on the masked patches)"
             if args.targets else "") + ":")
    print("mean over shapes (mean of |rho| in brackets)\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
