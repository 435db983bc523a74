"""Fine-tune and evaluate a Point-MAE classifier: classification, voting, few-shot (docs/FINETUNE.md).

    python main_finetune.py --config cfgs/finetune/modelnet40.yaml --finetune CKPT [--vote] [key=value ...]
    python main_finetune.py --config cfgs/finetune/modelnet40.yaml --scratch
    python main_finetune.py --config cfgs/finetune/modelnet40.yaml --scratch --data PATH   # your own folder
    python main_finetune.py --config cfgs/finetune/modelnet40.yaml --test FINETUNED_CKPT [--vote]
    python main_finetune.py --config cfgs/finetune/fewshot_modelnet40.yaml --fewshot --finetune CKPT
                            [--way 5 --shot 10] [--fold 0]

CKPT is any pre-training checkpoint: the official Point-MAE ``pretrain.pth`` or this project's
(Point-MAE or Point-MAE + GM3D) ``ckpt-last.pth``. Every run prints the last-epoch and the best-epoch
test accuracy with their epochs; the best epoch is selected on the test split (official protocol).
"""

from __future__ import annotations

import argparse

if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from tools.engine.cli import OVERRIDES_HELP, add_data_args, add_init_args, check_init_args, parse_with_overrides

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="fine-tuning YAML, e.g. cfgs/finetune/modelnet40.yaml")
    add_init_args(p, "classifier",
                  "only evaluate this fine-tuned checkpoint (official or ours, strict key check)")
    p.add_argument("--vote", action="store_true", help="also report voting accuracy (finetune.votes votes)")
    p.add_argument("--fewshot", action="store_true", help="run the few-shot settings x folds of the config")
    p.add_argument("--way", type=int, default=None, help="few-shot: only this way")
    p.add_argument("--shot", type=int, default=None, help="few-shot: only this shot")
    p.add_argument("--fold", type=int, default=None, help="few-shot: only this fold")
    p.add_argument("--exp_name", default="default", help="run folder name under experiments/<config stem>/")
    p.add_argument("--run_dir", default=None, help="explicit run folder (overrides --exp_name)")
    p.add_argument("--resume", action="store_true", help="continue a fine-tuning run from <run>/ckpt-last.pth")
    p.add_argument("--accept-config-change", action="store_true",
                   help="with --resume (or a few-shot rerun): continue although the config differs from the run's config.yaml "
                        "(the difference is recorded in <run>/config-changes.jsonl)")
    add_data_args(p)
    p.add_argument("opts", nargs="*", help=OVERRIDES_HELP)
    args = parse_with_overrides(p, argv)
    if args.fewshot and (args.test or args.vote or args.resume):
        p.error("--fewshot does not combine with --test, --vote or --resume (a few-shot run resumes by itself)")
    if not args.fewshot and (args.way is not None or args.shot is not None or args.fold is not None):
        p.error("--way / --shot / --fold need --fewshot")
    check_init_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tools.engine.runs import run_cli

    def job():
        if args.data:
            from tools.engine.cli import data_overrides

            args.opts = data_overrides(args.data, "finetune", args.config, args.opts, args.data_points,
                                       fewshot=args.fewshot)
        if args.fewshot:
            from tools.tasks.fewshot import run_fewshot

            run_fewshot(args.config, args.opts, exp_name=args.exp_name, run_dir=args.run_dir, ckpt=args.finetune,
                        scratch=args.scratch, way=args.way, shot=args.shot, fold=args.fold,
                        accept_config_change=args.accept_config_change)
        else:
            from tools.tasks.finetune import run_finetune

            run_finetune(args.config, args.opts, exp_name=args.exp_name, run_dir=args.run_dir, ckpt=args.finetune,
                         scratch=args.scratch, test=args.test, vote=args.vote, resume=args.resume,
                         accept_config_change=args.accept_config_change)

    return run_cli(job, "main_finetune")


if __name__ == "__main__":
    raise SystemExit(main())
