"""Where the time of one GM3D pre-training step goes: inclusive timers around its pieces.

    python bench/profile_step.py [--formulation project|official] [--embed-visible-only]
                                 [--batch 32] [--threads T] [--repeats 2] [--precision fp32|bf16] [--ops]

The step is :class:`bench.pretrain_step.Step` on cfgs/pretrain/point_mae_gm3d.yaml (variant C, 12-block
GC decoder) at epoch 200 of 400, fp32 (or bf16 autocast with ``--precision bf16``), with the official
semantics (every patch embedded) unless
``--embed-visible-only``; ``--formulation official`` times the bench's official-formulation baseline.
Each piece is timed inclusively (an indented row is part of the unindented row above it); the share
is of the median step; what no row names (masking, losses, zero_grad, the augmentation) is the rest.
``--ops`` adds torch.profiler's table of the most expensive ops of one more step.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import torch

from bench import pretrain_step as bench
from datasets.transforms import ScaleAndTranslate


def timed(times: dict, obj, name: str, label: str) -> None:
    """Replace ``obj.name`` by a wrapper that adds its wall time to ``times[label]``."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        times[label].append(time.perf_counter() - t0)
        return out

    setattr(obj, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formulation", default="project", choices=["project", "official"])
    ap.add_argument("--embed-visible-only", action="store_true", help="project default (not the official)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: under bf16 autocast")
    ap.add_argument("--ops", action="store_true", help="also print torch.profiler's op table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    official = args.formulation == "official"
    cfg = bench.model_cfg("gm3d")
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher.pth")
        bench.write_teacher(cfg, teacher)
        torch.manual_seed(0)
        model = bench.build("gm3d", cfg, teacher)
    if official:
        bench.officialize(model)
    elif not args.embed_visible_only:
        bench.embed_all(model)
    points = bench.make_points(args.batch, int(cfg["npoints"]), device)
    step = bench.Step(model, cfg, points, args.precision, device,
                      bench.official_scale_translate if official else ScaleAndTranslate(), bench.GM3D_EPOCH,
                      optimizer_impl="default" if official else "auto")

    times: dict = collections.defaultdict(list)
    s, ema, kt = model.student, model.ema, model.knowledge_teacher
    pieces = [
        (s, "group", "grouping (FPS + kNN)"),
        (model, "teacher_scores", "EMA teacher, no_grad: GC scores of all 64 patches"),
        (ema.student.MAE_encoder, "forward", "  encoder (patch embedding + 12 blocks, 64 tokens)"),
        (ema.student.MAE_encoder.encoder, "forward", "    patch embedding (64 patches)"),
        (ema.MAE_decoder, "forward", "  reconstruction decoder (official formulation only; unused)"),
        (ema.MAE_decoder_loss_pred, "forward", "  GC decoder (12 blocks, 64 tokens)"),
        (s.MAE_encoder, "forward", "student encoder (patch embedding + 12 blocks on the visible)"),
        (s.MAE_encoder.encoder, "forward", "  patch embedding (64 patches, then the visible)"),
        (s, "reconstruct_masked", "student reconstruction decoder (4 blocks) + head + Chamfer"),
        (kt, "encode_full", "knowledge teacher encoder, no_grad (patch embedding + 12 blocks)"),
        (kt.MAE_encoder.encoder, "forward", "  patch embedding (64 patches)"),
        (model, "student_scores", "student GC decoder (12 blocks, 64 tokens) + GC head"),
        (model.increase_dim_2, "forward", "  GC head"),
        (torch.nn.utils, "clip_grad_norm_", "gradient clipping"),
        (step.opt, "step", "AdamW step"),
        (model, "after_step", "EMA update"),
    ]
    for obj, name, label in pieces:
        timed(times, obj, name, label)
    backward = torch.Tensor.backward

    def timed_backward(self, *a, **k):
        t0 = time.perf_counter()
        backward(self, *a, **k)
        times["backward"].append(time.perf_counter() - t0)

    torch.Tensor.backward = timed_backward
    step()
    times.clear()
    totals = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        totals.append(time.perf_counter() - t0)
    med = statistics.median(totals)
    sem = "embed visible only" if args.embed_visible_only and not official else "official semantics"
    print(f"{args.formulation} formulation, {sem}; batch {args.batch} x {cfg['npoints']}, "
          f"{torch.get_num_threads()} threads, {args.precision}; step median {med * 1e3:,.0f} ms of {args.repeats} "
          f"(range {min(totals) * 1e3:,.0f}-{max(totals) * 1e3:,.0f}); 1-min load {os.getloadavg()[0]:.1f}")
    print("\n| piece | ms per step | share of the step |\n|---|---|---|")
    order = [label for _, _, label in pieces[:13]] + ["backward"] + [label for _, _, label in pieces[13:]]
    for label in order:
        if not times[label]:
            continue
        per = sum(times[label]) / args.repeats
        print(f"| {label} | {per * 1e3:,.0f} | {100 * per / med:.1f} % |")
    if args.ops:
        from torch.profiler import profile
        with profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
