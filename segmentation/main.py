"""Part segmentation on ShapeNetPart (or the default SyntheticShapes data), docs/SEGMENTATION.md.

    python segmentation/main.py --config cfgs/segmentation/point_mae_gm3d_shapenetpart.yaml --finetune CKPT
    python segmentation/main.py --config cfgs/segmentation/quickstart_seg.yaml --scratch
    python segmentation/main.py --config cfgs/segmentation/point_mae_gm3d_shapenetpart.yaml --finetune CKPT --data PATH
    python segmentation/main.py --config CONFIG --test SEG_CKPT [--vote]
    python segmentation/main.py --config CONFIG --run_dir RUN --resume

CKPT is any Point-MAE pre-training checkpoint (the official ``pretrain.pth``, this project's Point-MAE or
GM3D ``ckpt-last.pth``). Every run prints the last-epoch and the best-epoch class / instance mIoU; the
best epoch is selected on ``eval.best_metric`` (instance mIoU on the test split, the official protocol).
"""

from __future__ import annotations

import argparse

if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="segmentation YAML, e.g. cfgs/segmentation/quickstart_seg.yaml")
    from tools.engine.cli import OVERRIDES_HELP, add_data_args, add_init_args, check_init_args, parse_with_overrides

    add_init_args(p, "model", "only evaluate this segmentation checkpoint")
    p.add_argument("--vote", action="store_true", help="also report voting mIoU (finetune.votes votes)")
    p.add_argument("--exp_name", default="default", help="run folder name under experiments/<config stem>/")
    p.add_argument("--run_dir", default=None, help="explicit run folder (overrides --exp_name)")
    p.add_argument("--resume", action="store_true", help="continue a run from <run>/ckpt-last.pth")
    p.add_argument("--stop_after_epoch", type=int, default=None,
                   help="leave after this epoch (checkpoint written); continue with --resume")
    add_data_args(p)
    p.add_argument("opts", nargs="*", help=OVERRIDES_HELP)
    args = parse_with_overrides(p, argv)
    check_init_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tools.engine.runs import run_cli
    from tools.tasks.segment import run_segmentation

    def job():
        if args.data:
            from tools.engine.cli import data_overrides

            args.opts = data_overrides(args.data, "segment", args.config, args.opts, args.data_points)
        run_segmentation(args.config, args.opts, exp_name=args.exp_name, run_dir=args.run_dir, ckpt=args.finetune,
                         scratch=args.scratch, test=args.test, vote=args.vote, resume=args.resume,
                         stop_after_epoch=args.stop_after_epoch)

    return run_cli(job, "segmentation")


if __name__ == "__main__":
    raise SystemExit(main())
