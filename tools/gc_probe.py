"""What do a GM3D teacher's GC scores follow? Position, or local geometry?

For every shape of a split (default: the checkpoint config's ``svm_test``), the EMA teacher scores the
patches of the complete cloud, and the scores are rank-correlated (Spearman, per shape) with simple
per-patch quantities:

* ``x``, ``y``, ``z``: the patch centre's coordinates (``y`` is up in the generated data);
* ``radius``: the centre's distance from the cloud's centre;
* ``flatness``: smallest / summed eigenvalue of the patch's covariance (0 for a plane, 1/3 for an
  isotropic blob): a curvature-like measure of local geometric complexity;
* ``spread``: summed covariance eigenvalues, the patch's size.

The table gives the mean correlation over shapes and the mean of its absolute value. A predictor of
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
def probe(ckpt: str, split: str | None = None, batch_size: int = 64, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Correlations of a GM3D checkpoint's teacher scores over a split: name -> (num_shapes,)."""
    from tools.builders import build_split
    from tools.visualize import NoGCDecoderError, _is_gm3d, default_split, load_checkpoint

    ck = load_checkpoint(ckpt)
    model = ck.model.eval()
    if not _is_gm3d(model):
        raise NoGCDecoderError(f"{ckpt}: {type(model).__name__} has no GC decoder; gc_probe needs a GM3D checkpoint")
    dataset = build_split(ck.config, split or default_split(ck.config))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in QUANTITIES}
    for start in range(0, n, batch_size):
        pts = torch.stack([dataset[i]["points"] for i in range(start, min(start + batch_size, n))])
        p = model.group(pts.float())
        scores = model.teacher_scores(p.neighborhood, p.center)
        for k, v in score_correlations(scores, p.center, p.neighborhood).items():
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def table(results: dict[str, dict[str, torch.Tensor]]) -> str:
    head = "| checkpoint | shapes | " + " | ".join(QUANTITIES) + " |"
    lines = [head, "|" + "---|" * (len(QUANTITIES) + 2)]
    for name, corr in results.items():
        cells = [f"{corr[k].mean():+.2f} ({corr[k].abs().mean():.2f})" for k in QUANTITIES]
        lines.append(f"| {name} | {len(corr['x'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", help="GM3D pre-training checkpoints (ckpt-*.pth of a run)")
    ap.add_argument("--split", default=None, help="data split of the checkpoint's config (default svm_test)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N shapes only")
    args = ap.parse_args(argv)
    from tools.visualize import NoGCDecoderError
    from utils.errors import CheckpointError, ConfigError, DataError

    try:
        results = {c: probe(c, args.split, limit=args.limit) for c in args.ckpts}
    except (NoGCDecoderError, CheckpointError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"gc_probe: {e}", file=sys.stderr)
        return 2
    print("Spearman correlation of the EMA teacher's GC scores with per-patch quantities, per shape:")
    print("mean over shapes (mean of |rho| in brackets)\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
