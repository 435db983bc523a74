"""Time one pre-training step of every arm of the masking experiment (tools/compare_masking.py).

    python bench/masking_arms.py [--batch 4] [--threads 1] [--repeats 10] [--epoch 15] [--arms random ...]

The arms are built from cfgs/pretrain/quickstart.yaml with the overrides that compare_masking.py gives
them (GM3D with a 2-block GC decoder, variant C with a random, untrained knowledge teacher: its weights
do not change the cost). One step = forward, backward, AdamW, and the EMA update for GM3D, at ``--epoch``
of 20 so that the curriculum selects part of the mask. All arms run round-robin inside every repeat, so
a busy machine slows them alike; the table gives the median step time and its ratio to ``random``, the
baseline measured in the same run. compare_masking's ``--eqtime-epochs`` can be set from the ratio.
``random_ema`` is ``random`` plus the ``model_ema`` update of compare_masking's ``--ema`` (docs/EMA.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

GM3D = ["model.NAME=Point_MAE_GM3D", "model.transformer_config.mask_type=gm3d", "model.gm3d.gc_decoder_depth=2",
        "model.gm3d.variant=C"]
OPTIONS = ["model.gm3d.ema_bn=copy", "model.gm3d.ema_warmup=true", "model.gm3d.gc_target=zscore",
           "model.gm3d.gc_chamfer_norm=true"]
ARMS = {
    "random": [],
    "random_ema": [],  # + model_ema at the paper teacher's schedule, updated after every step
    "block": ["model.transformer_config.mask_type=block"],
    "gm3d_paper": GM3D,
    "gm3d_opts": GM3D + OPTIONS + ["model.gm3d.gc_scorer=content"],
    "gm3d_position": GM3D + OPTIONS + ["model.gm3d.gc_scorer=position"],
    "gm3d_oracle": GM3D + OPTIONS + ["model.gm3d.gc_scorer=oracle"],
}


def main(argv: list[str] | None = None) -> int:
    from utils.misc import cpu_name
    from tools.engine.builders import build_model_from_cfg
    from utils.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--epoch", type=int, default=15, help="epoch of 20 (the GM3D curriculum's share)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to time (random always)")
    args = p.parse_args(argv)
    from models.ema import ModelEMA, ModelEMAConfig

    arms = {a: ARMS[a] for a in ARMS if a in args.arms or a == "random"}
    torch.set_num_threads(args.threads)
    steps = {}
    for arm, opts in arms.items():
        torch.manual_seed(0)
        cfg = load_config("cfgs/pretrain/quickstart.yaml", [f"total_bs={args.batch}", "model.mask.count=gm3d", *opts])
        model = build_model_from_cfg(cfg, load_teacher=False)
        if getattr(model, "knowledge_teacher", None) is not None:
            model.knowledge_teacher.loaded = True  # random weights: same cost as a trained teacher
        model.train()
        model.on_epoch_start(args.epoch, 20)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], 1e-3)
        ema = ModelEMA(model, ModelEMAConfig(enabled=True, decay_start=0.999, decay_end=0.9999, ramp_epochs=5)) \
            if arm == "random_ema" else None
        steps[arm] = (model, opt, ema)
    x = {"points": torch.randn(args.batch, int(cfg.npoints), 3, generator=torch.Generator().manual_seed(0))}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(args.repeats + 2):
        for arm, (model, opt, ema) in steps.items():
            t0 = time.perf_counter()
            model(x, epoch=args.epoch)["loss"].backward()
            opt.step()
            opt.zero_grad()
            model.after_step()
            if ema is not None:
                ema.update(model)
            if r >= 2:  # two warm-up rounds
                times[arm].append(time.perf_counter() - t0)
    base = statistics.median(times["random"])
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{cpu_name()}, {args.threads} thread(s), fp32, batch {args.batch} x {cfg.npoints}, epoch {args.epoch} "
          f"of 20, median of {args.repeats} round-robin repeats, load average {load} at the end")
    print("\n| arm | s / step | x random |\n|---|---|---|")
    for arm, t in times.items():
        print(f"| {arm} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
