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

The computations are in the library module ``tools/vis/probe.py``; this script parses the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()

from tools.vis.loading import NoGCDecoderError
from tools.vis.probe import probe, table
from utils.errors import CheckpointError, ConfigError, DataError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", help="GM3D pre-training checkpoints (ckpt-*.pth of a run)")
    ap.add_argument("--split", default=None, help="data split of the checkpoint's config (default svm_test)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N shapes only")
    ap.add_argument("--targets", action="store_true",
                    help="also correlate with the student's GC training target under random and GM3D masks")
    args = ap.parse_args(argv)
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
