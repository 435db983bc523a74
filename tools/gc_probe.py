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

With ``--diagnostics`` it also measures whether the scores are content-blind, on a probe batch of
``--limit`` shapes (default 32) spread evenly over the split (``tools/vis/diagnostics.py``):

* ``shuffle_rho``: Spearman between the scores and the scores after the patch contents are permuted
  among a cloud's patches, centres kept (1.0 = the scores ignore the patch contents);
* ``rotation_rho``: Spearman between a patch's score before and after the whole cloud is rotated about
  the up axis (no regrouping); ``position_rotation_rho`` is the same for the affine position fit of the
  scores (what a pure world-position score gives); ``position_r2``: the score variance that fit explains;
* ``target_rho``: Spearman of the scores with the student's GC training target averaged over random
  masks; ``position_baseline_rho``: a small MLP of the centre fitted to that target on half of the
  clouds, scored on the other half, beside ``target_rho_heldout`` (the scores on that same half), and
  ``position_linear_rho``, the same for one affine function of the centre;
* ``bn``: mean BatchNorm running variance of the EMA teacher over the student's, per layer.

``--json OUT`` writes everything machine-readably (NaN as null).

    python tools/gc_probe.py experiments/gm3d_quickstart/default/ckpt-last.pth [more.pth ...]
    python tools/gc_probe.py CKPT --diagnostics --json out.json --limit 32

The computations are in the library module ``tools/vis/probe.py``; this script parses the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()

from tools.vis.diagnostics import Probe, diagnose, finite_or_none
from tools.vis.loading import NoGCDecoderError
from tools.vis.probe import open_probe, probe, table
from utils.errors import CheckpointError, ConfigError, DataError
from utils.io import atomic_write

DIAGNOSTIC_SHAPES = 32


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", help="GM3D pre-training checkpoints (ckpt-*.pth of a run)")
    ap.add_argument("--split", default=None, help="data split of the checkpoint's config (default svm_test)")
    ap.add_argument("--limit", type=int, default=None,
                    help=f"use N shapes spread evenly over the split (default: all for the table, "
                         f"{DIAGNOSTIC_SHAPES} for the diagnostics)")
    ap.add_argument("--targets", action="store_true",
                    help="also correlate with the student's GC training target under random and GM3D masks")
    ap.add_argument("--diagnostics", action="store_true",
                    help="also the content-shuffle, rotation, target-vs-position and BatchNorm diagnostics")
    ap.add_argument("--json", metavar="OUT", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < (2 if args.diagnostics else 1):
        ap.error(f"--limit must be >= {2 if args.diagnostics else 1}, got {args.limit}")
    results, records = {}, []
    try:
        for c in args.ckpts:
            ck, dataset = open_probe(c, args.split)
            corr = results[c] = probe(ck, limit=args.limit, targets=args.targets, dataset=dataset)
            rec = {"path": c, "epoch": ck.epoch, "model": ck.model_name, "variant": ck.model.gcfg.variant,
                   "kd_dropped": ck.kd_dropped, "shapes": len(corr["x"]),
                   "correlations": {k: {"mean": float(v.mean()), "mean_abs": float(v.abs().mean())}
                                    for k, v in corr.items()}}
            if args.diagnostics:
                batch = Probe.from_dataset(dataset, args.limit or DIAGNOSTIC_SHAPES)
                rec["diagnostics"] = {**diagnose(ck.model, batch.points), "indices": batch.indices}
            records.append(rec)
    except (NoGCDecoderError, CheckpointError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"gc_probe: {e}", file=sys.stderr)
        return 2
    print("Spearman correlation of the EMA teacher's GC scores with per-patch quantities, per shape"
          + (" (random_mask / gm3d_mask: with the student's GC training target on the masked patches)"
             if args.targets else "") + ":")
    print("mean over shapes (mean of |rho| in brackets)\n")
    print(table(results))
    if args.diagnostics:
        print("\nContent-blindness diagnostics (shuffle_rho 1.0 = the scores ignore patch contents):\n")
        print(diagnostics_table(records))
    if args.json:
        text = json.dumps({"split": args.split, "checkpoints": finite_or_none(records)}, indent=2,
                          allow_nan=False)
        atomic_write(Path(args.json), lambda f: f.write(text + "\n"), binary=False)
        print(f"\nwrote {args.json}")
    return 0


DIAG_COLUMNS = ("shuffle_rho", "rotation_rho", "position_rotation_rho", "position_r2", "target_rho",
                "target_rho_heldout", "position_baseline_rho", "position_linear_rho")


def diagnostics_table(records: list[dict]) -> str:
    """A Markdown table: one row per checkpoint, the diagnostics and the BatchNorm variance ratio."""
    head = ("| checkpoint | shapes | " + " | ".join(DIAG_COLUMNS)
            + " | bn_var_ratio (median) | worst BN layer |")
    lines = [head, "|" + "---|" * (len(DIAG_COLUMNS) + 4)]
    for r in records:
        d = r["diagnostics"]
        cells = [f"{d[k]:+.2f}" if k in d and math.isfinite(d[k]) else "-" for k in DIAG_COLUMNS]
        bn = d.get("bn") or {}
        worst = f"{bn['worst_layer']} ({bn['worst_ratio']:.3g})" if bn.get("worst_layer") else "-"
        lines.append(f"| {r['path']} | {d['shapes']} | " + " | ".join(cells)
                     + f" | {bn.get('median_ratio', float('nan')):.3g} | {worst} |")
    for r in records:
        for k, why in r["diagnostics"]["skipped"].items():
            lines.append(f"\n{r['path']}: {k} not computed: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
