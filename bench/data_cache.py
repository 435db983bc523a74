"""Time building a ModelNet-style cache of clouds that already have the requested size: the FPS pass
(a pure reordering) against storing them as read (``fps_subsample(skip_sized=True)``, the default).

    OMP_NUM_THREADS=1 python bench/data_cache.py [--shapes 8] [--points 8192]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from datasets.io import fps_subsample  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=int, default=8)
    p.add_argument("--points", type=int, default=8192)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    clouds = [rng.normal(size=(args.points, 6)).astype(np.float32) for _ in range(args.shapes)]
    print(f"| {args.shapes} clouds of {args.points} points -> {args.points} | seconds | per shape |")
    print("|---|---|---|")
    for label, skip in (("FPS (reorder only)", False), ("stored as read (skip_sized)", True)):
        t0 = time.perf_counter()
        fps_subsample(clouds, args.points, batch_size=args.shapes, skip_sized=skip)
        dt = time.perf_counter() - t0
        print(f"| {label} | {dt:.3f} | {dt / args.shapes:.4f} |", flush=True)


if __name__ == "__main__":
    main()
