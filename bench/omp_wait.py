"""A/B of the OpenMP wait policy: a fixed CPU workload at 2 threads, runtime default (spinning) against
``OMP_WAIT_POLICY=PASSIVE``, on the machine as it is and beside one extra busy-loop process.

    OMP_NUM_THREADS=1 python bench/omp_wait.py [--threads 2] [--rounds 3] [--iters 20]

The workload is a transformer-block-sized loop, forward and backward: Linear 384 -> 1536, GELU,
Linear 1536 -> 384, LayerNorm on 32 x 64 tokens, plus a Conv1d on 832 patches of 32 points (the
mini-PointNet's shape), ``--iters`` timed iterations after 3 warm-up ones. Each measurement is a fresh
process (the runtime reads the policy once, when torch loads it); the four cells of a round run back to
back and the rounds repeat, so load drift weighs on all of them alike. The busy loop is one
``while True: pass`` Python process, killed after the round. Everything runs at the priority this bench
was started with (use ``nice -n 10`` on a shared machine); the 1-minute load average is printed, so
"quiet" means "without the extra busy loop", not "idle".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

WORKLOAD = r"""
import statistics, sys, time
import torch
from torch import nn
torch.set_num_threads(int(sys.argv[1]))
iters = int(sys.argv[2])
torch.manual_seed(0)
mlp = nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384), nn.LayerNorm(384))
conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(), nn.Conv1d(128, 256, 1))
x, pts = torch.randn(32 * 64, 384), torch.randn(832, 3, 32)
times = []
for i in range(iters + 3):
    t0 = time.perf_counter()
    loss = mlp(x).square().mean() + conv(pts).amax(-1).square().mean()
    loss.backward()
    if i >= 3:
        times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""


def measure(policy: str | None, threads: int, iters: int) -> float:
    """Median seconds per iteration of the workload in a fresh process with ``policy`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", WORKLOAD, str(threads), str(iters)], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    policies = {"runtime default (spin)": None, "PASSIVE": "PASSIVE"}
    cells: dict[tuple[str, str], list[float]] = {}
    loads = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    for _ in range(args.rounds):
        for load in ("quiet", "busy"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                for name, policy in policies.items():
                    cells.setdefault((load, name), []).append(measure(policy, args.threads, args.iters))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            loads.append(os.getloadavg()[0])
    print(f"Machine: {os.cpu_count()} logical cores; {args.threads} threads; {args.rounds} rounds x "
          f"{args.iters} timed iterations per cell; 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
          f"during the run (other jobs included); total {time.perf_counter() - t_start:.0f} s.")
    print()
    print("| beside | OpenMP wait policy | median ms / iteration | min-max ms | vs spin, same load |")
    print("|---|---|---|---|---|")
    for load in ("quiet", "busy"):
        base = statistics.median(cells[(load, "runtime default (spin)")])
        for name in policies:
            ts = cells[(load, name)]
            med = statistics.median(ts)
            where = "nothing extra" if load == "quiet" else "1 busy-loop process"
            print(f"| {where} | {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f} "
                  f"| {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
