"""Pictures of a pre-training run: GC heat-maps over training, reconstructions, curves.

    python tools/visualize.py gc     --run RUN_DIR [--max-ckpts 5] [--shapes 0 40] [-o gc.png]
    python tools/visualize.py gc     --ckpts a.pth b.pth [--split train] [--shapes 3]
    python tools/visualize.py recon  --ckpt RUN_DIR/ckpt-last.pth [--shapes 0 40] [-o recon.png]
    python tools/visualize.py curves --run RUN_DIR  (or --metrics RUN_DIR/metrics.jsonl) [-o curves.png]

``gc``: each shape's points coloured by the EMA teacher's GC score of the patch they belong to
(nearest patch centre), one column pair per checkpoint (GC heat-map | the GM3D mask chosen at that
epoch with a fixed seed: visible vs masked patches, the N_sel patches picked by score marked with
``x``), one row per shape, one colour bar shared by every panel. GM3D checkpoints only (Point-MAE +
GM3D, or Point-M2AE + GM3D, whose scores and mask are at its coarsest scale).

``recon``: input cloud | visible patches | the student's reconstruction of the masked patches (predicted
points in red, their patch centres in black, the visible patches in grey), any pre-training
checkpoint (Point-MAE, Point-M2AE, or either with GM3D; GM3D uses its own masker with the teacher's
scores at the checkpoint's epoch). Point-M2AE: the mask is counted at the coarsest scale, where it is
drawn; the visible panel shows the finest-scale patches it leaves visible, the reconstruction the
predicted points of every masked second-scale token (what the training loss compares).

``curves``: loss terms, N_sel, GC rank correlation, learning rate and linear-SVM accuracy against
epoch, from a run's ``metrics.jsonl``; only the panels whose metric is present.

Every panel of one figure uses the same camera (``--elev``/``--azim``) and the same axis limits; the
figure's pixel size is fixed by ``--panel`` (inches) and ``--dpi`` (see the ``*_figsize`` functions).
Models are built from the checkpoint's own ``config["model"]`` and loaded with the exact key check;
a GM3D knowledge teacher whose ``teacher_ckpt`` file is missing is left out (the model is built as
variant A and the ``knowledge_teacher.*`` keys are skipped): the GC decoder and the EMA teacher do not
depend on it.

:class:`tools.vis.evaluator.GCPanelEvaluator` is the periodic training hook (``vis.gc_every``): an
engine evaluator that saves the ``gc`` figure of fixed shapes as ``gc_epoch_XXX.png``. The computations
and figures live in the library package ``tools/vis/``; this script only parses the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()

import argparse
import logging

import torch

from tools.vis.curves import read_metrics, render_curves
from tools.vis.forward import gc_state, is_multiscale, recon_state
from tools.vis.loading import NoGCDecoderError, load_checkpoint, load_shapes, run_checkpoints, thin
from tools.vis.panels import View, render_gc, render_recon
from utils.errors import CheckpointError, ConfigError, DataError

__all__ = ["build_parser", "main"]


def _run_label(run_dir: Path) -> str:
    """``<config stem>/<run name>`` for titles."""
    run_dir = Path(run_dir).resolve()
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.parent.name else run_dir.name


def _view_from_args(args) -> View:
    return View(elev=args.elev, azim=args.azim, up=args.up, zoom=args.zoom, point_size=args.point_size)


def cmd_gc(args) -> Path:
    if args.run:
        paths = thin(run_checkpoints(args.run), args.max_ckpts)
    else:
        paths = thin([Path(p) for p in args.ckpts], args.max_ckpts)
    cks = []
    for p in paths:
        ck = load_checkpoint(p, args.device)
        if not ck.is_gm3d:
            raise NoGCDecoderError(
                f"{p}: this checkpoint ({ck.model_name}, model.NAME={ck.config['model']['NAME']}) has no GC "
                f"decoder; the gc view needs a GeoMask3D checkpoint "
                f"(model.NAME: Point_MAE_GM3D or Point_M2AE_GM3D). "
                f"Use `recon` or `curves` for plain Point-MAE / Point-M2AE runs.")
        cks.append(ck)
    cks.sort(key=lambda c: c.epoch)
    shapes = load_shapes(cks[-1].config, args.shapes, args.split, args.seed)
    states = [[gc_state(ck.model, s.points, ck.epoch, args.seed) for ck in cks] for s in shapes]
    out = Path(args.out or (Path(args.run) / "vis" / "gc.png" if args.run else "gc.png"))
    title = args.title or (f"GM3D teacher GC score per patch and the mask it drives "
                           f"({_run_label(cks[-1].path.parent)}, variant {cks[-1].variant})")
    return render_gc(states, shapes, [ck.epoch for ck in cks], out, norm=args.norm, panel=args.panel,
                     dpi=args.dpi, view=_view_from_args(args), title=title)


def cmd_recon(args) -> Path:
    ck = load_checkpoint(args.ckpt, args.device)
    shapes = load_shapes(ck.config, args.shapes, args.split, args.seed)
    states = [recon_state(ck, s.points, args.seed) for s in shapes]
    out = Path(args.out or Path(args.ckpt).parent / "vis" / "recon.png")
    backbone = "Point-M2AE" if is_multiscale(ck.model) else "Point-MAE"
    kind = f"{backbone} + GM3D variant {ck.variant}" if ck.is_gm3d else backbone
    title = args.title or (f"{kind} reconstruction: {_run_label(ck.path.parent)}/{ck.path.name}, "
                           f"epoch {ck.epoch}")
    return render_recon(states, shapes, ck.epoch, out, panel=args.panel, dpi=args.dpi,
                        view=_view_from_args(args), title=title)


def cmd_curves(args) -> Path:
    src = Path(args.metrics or args.run)
    records = read_metrics(src)
    run_dir = src if src.is_dir() else src.parent
    out = Path(args.out or run_dir / "vis" / "curves.png")
    title = args.title or f"Training curves: {_run_label(run_dir)}"
    return render_curves(records, out, dpi=args.dpi, title=title)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, panel: float):
        sp.add_argument("-o", "--out", default=None, help="output PNG (default: <run>/vis/<command>.png)")
        sp.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNG")
        sp.add_argument("--title", default=None, help="figure title")
        if panel:
            sp.add_argument("--shapes", type=int, nargs="+", default=[0], help="item indices of the split")
            sp.add_argument("--split", default=None,
                            help="data-set split of the checkpoint's config (default svm_test, else train)")
            sp.add_argument("--seed", type=int, default=0,
                            help="seed of the mask (and of the point subset of a data set that draws from the global RNG)")
            sp.add_argument("--panel", type=float, default=panel, help="inches per 3-D panel")
            sp.add_argument("--elev", type=float, default=18.0, help="camera elevation (degrees)")
            sp.add_argument("--azim", type=float, default=-55.0, help="camera azimuth (degrees)")
            sp.add_argument("--up", choices=("x", "y", "z"), default="y", help="data axis drawn upwards")
            sp.add_argument("--zoom", type=float, default=1.2, help="3-D box zoom")
            sp.add_argument("--point-size", type=float, default=None, help="marker area (default: auto)")
            sp.add_argument("--device", default="cpu", help="torch device for the forward passes")

    g = sub.add_parser("gc", help="GC heat-map per epoch + the GM3D mask (GM3D checkpoints)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpts", nargs="+", help="checkpoint files (ordered by their epoch)")
    src.add_argument("--run", help="run folder: every ckpt-epoch-*.pth and ckpt-last.pth")
    g.add_argument("--max-ckpts", type=int, default=None, help="keep at most this many, evenly spaced")
    g.add_argument("--norm", choices=("panel", "rank", "global"), default="panel",
                   help="colour scale: min-max per panel (default), rank per panel, or raw scores shared")
    common(g, 2.4)

    r = sub.add_parser("recon", help="input / visible patches / reconstruction of the masked patches")
    r.add_argument("--ckpt", required=True, help="pre-training checkpoint (Point-MAE or GM3D)")
    common(r, 2.6)

    c = sub.add_parser("curves", help="training curves from metrics.jsonl")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder holding metrics.jsonl")
    src.add_argument("--metrics", help="a metrics.jsonl file")
    common(c, 0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    try:
        out = {"gc": cmd_gc, "recon": cmd_recon, "curves": cmd_curves}[args.command](args)
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_grad_enabled(True)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
