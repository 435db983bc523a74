"""Pre-train a point-cloud masked autoencoder (Point-MAE, Point-MAE + GeoMask3D).

    python main_pretrain.py --config cfgs/pretrain/quickstart.yaml [--exp_name NAME] [--resume] [--data PATH] [key=value ...]
    python main_pretrain.py --config cfgs/pretrain/point_mae_gm3d.yaml --start_ckpts pretrain.pth   # warm start
    torchrun --nproc_per_node 2 main_pretrain.py --config ...        # DDP (gloo on CPU, NCCL on GPU)
"""

from __future__ import annotations

import argparse

if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()

from tools.engine.cli import OVERRIDES_HELP, add_data_args, data_overrides, parse_with_overrides  # noqa: E402
from tools.engine.runs import run_cli  # noqa: E402
from tools.tasks.pretrain import run_pretrain  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (extends cfgs/_base_/default.yaml)")
    p.add_argument("--exp_name", default="default", help="run folder name under experiments/<config stem>/")
    p.add_argument("--run_dir", default=None, help="explicit run folder (overrides --exp_name)")
    p.add_argument("--resume", action="store_true", help="continue from <run>/ckpt-last.pth")
    p.add_argument("--accept-config-change", action="store_true",
                   help="with --resume: continue although the config differs from the run's config.yaml "
                        "(the difference is recorded in <run>/config-changes.jsonl)")
    p.add_argument("--stop_after_epoch", type=int, default=None,
                   help="leave after this epoch (checkpoint written), e.g. for a time-limited job; --resume continues")
    p.add_argument("--start_ckpts", default=None, metavar="CKPT",
                   help="initialise the model from a pre-training checkpoint (official or this project's; strict "
                        "key check), then train with a fresh optimizer")
    add_data_args(p)
    p.add_argument("opts", nargs="*", help=OVERRIDES_HELP)
    return parse_with_overrides(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job():
        if args.data:
            args.opts = data_overrides(args.data, "pretrain", args.config, args.opts, args.data_points)
        run_pretrain(args.config, args.opts, exp_name=args.exp_name, run_dir=args.run_dir, resume=args.resume,
                     stop_after_epoch=args.stop_after_epoch, start_ckpts=args.start_ckpts,
                     accept_config_change=args.accept_config_change)

    return run_cli(job, "main_pretrain")


if __name__ == "__main__":
    raise SystemExit(main())
