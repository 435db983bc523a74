"""Samples/s of the ShapeNet-55 readers: one ``.npy`` per shape (the official layout, the baseline)
against the packed, memory-mapped file of ``tools/prepare_data.py pack shapenet``.

    OMP_NUM_THREADS=1 python bench/data_loader.py [--shapes 4000] [--npoints 1024] [--batch 128] [--dir DIR]

A data set of the official per-item size (8192 x 3 float32 per shape, ShapeNet-55 file names and split
list) is generated in a temporary folder (or ``--dir``) and packed. The official train split has 41,952
shapes (4.1 GB); ``--shapes`` generates a subset. Each row reads every shape once in a seeded random
order through the engine's DataLoader path (batch ``--batch``, ``num_workers=0``, the engine's collate):
the per-item work (file read or memory-map slice, the seeded draw of ``--npoints`` rows, ``pc_norm``).

The *read only* rows read each stored cloud (``np.load`` of the file, or a copy of the pack's slice)
without the item pipeline, which isolates the I/O. Rows with a *cold* page cache evict the files from
the OS page cache first (``posix_fadvise DONTNEED`` on the files this bench wrote), which is what a data
set larger than RAM, or read for the first time, costs; *warm* rows read them right after another pass.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from bench.pretrain_step import machine  # noqa: E402
from datasets import DATASETS  # noqa: E402
from datasets.shapenet55 import pack_shapenet  # noqa: E402
from tools.engine.trainer import collate_points  # noqa: E402

OFFICIAL_TRAIN = 41_952
SYNSETS = ("02691156", "02747177", "02773838", "02801938", "02808440")


def generate(root: Path, shapes: int, points: int = 8192) -> None:
    """``shapenet_pc/<synset>-<id>.npy`` float32 (points, 3) and ``ShapeNet-55/{train,test}.txt``."""
    (root / "shapenet_pc").mkdir(parents=True)
    (root / "ShapeNet-55").mkdir()
    rng = np.random.default_rng(0)
    names = [f"{SYNSETS[i % len(SYNSETS)]}-{i:08x}.npy" for i in range(shapes)]
    for name in names:
        np.save(root / "shapenet_pc" / name, rng.standard_normal((points, 3), dtype=np.float32))
    (root / "ShapeNet-55" / "train.txt").write_text("\n".join(names) + "\n")
    (root / "ShapeNet-55" / "test.txt").write_text(names[0] + "\n")


def evict(dataset, paths: list[Path]) -> None:
    """Drop the clean pages of ``paths`` from the page cache (only files this bench wrote). A pack's memory
    map is closed first: the kernel keeps pages that are still mapped."""
    if dataset.packed is not None:
        dataset.packed._data = None
        gc.collect()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def one_pass(dataset, batch: int, epoch: int) -> float:
    """Seconds to read every item once through a DataLoader like the engine's (num_workers=0)."""
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=batch, sampler=RandomSampler(dataset, generator=torch.Generator()
                        .manual_seed(epoch)), num_workers=0, collate_fn=collate_points, drop_last=False)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += b["points"].shape[0]
    assert n == len(dataset)
    return time.perf_counter() - t0


def read_only(dataset, epoch: int) -> float:
    """Seconds to read every stored cloud once (random order) without the item pipeline: the I/O part."""
    order = np.random.default_rng(epoch).permutation(len(dataset))
    t0 = time.perf_counter()
    for i in order:
        if dataset.packed is not None:
            np.array(dataset.packed.cloud(dataset._pack_index[i]))
        else:
            np.load(os.path.join(dataset.pc_path, dataset.files[i]))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=int, default=4000, help="shapes generated (official train: 41,952)")
    ap.add_argument("--npoints", type=int, default=1024, help="points drawn per item (Point-MAE 1024)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="passes per row (median reported)")
    ap.add_argument("--dir", default=None, help="where to generate the data (default: a temp folder)")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "ShapeNet55-34"
        t0 = time.perf_counter()
        generate(root, args.shapes)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        pack = root / "shapenet_pc.pack.json"
        pack_shapenet(str(root / "shapenet_pc"), str(pack))
        t_pack = time.perf_counter() - t0
        common = {"data_path": str(root / "ShapeNet-55"), "pc_path": str(root / "shapenet_pc"),
                  "npoints": args.npoints}
        readers = {"per-file .npy (official layout)": DATASETS.get("ShapeNet")(**common),
                   "packed memory map": DATASETS.get("ShapeNet")(**common, packed_path=str(pack))}
        files = {"per-file .npy (official layout)": sorted((root / "shapenet_pc").glob("*.npy")),
                 "packed memory map": [root / "shapenet_pc.pack.npy"]}
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.repeats):  # rows interleaved so load drift weighs on all alike
            for name, ds in readers.items():
                evict(ds, files[name])
                times.setdefault((name, "cold"), []).append(one_pass(ds, args.batch, 2 * r))
                times.setdefault((name, "warm"), []).append(one_pass(ds, args.batch, 2 * r + 1))
                evict(ds, files[name])
                times.setdefault((name, "cold, read only"), []).append(read_only(ds, 2 * r))
                times.setdefault((name, "warm, read only"), []).append(read_only(ds, 2 * r + 1))
    load1 = os.getloadavg()
    n = args.shapes
    print(f"Machine: {machine(torch.device('cpu'))}; torch {torch.__version__}; torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"1-min load {load0[0]:.1f} at start, {load1[0]:.1f} at end.")
    print(f"Data: {n:,} generated shapes of 8192 x 3 float32 ({n * 8192 * 12 / 1e9:.2f} GB; the official "
          f"ShapeNet-55 train split is {OFFICIAL_TRAIN:,} shapes, 4.1 GB); generated in {t_gen:.0f} s, "
          f"packed in {t_pack:.0f} s. Each row: every shape once, random order, batch {args.batch}, "
          f"{args.npoints} points drawn per shape, num_workers=0, median of {args.repeats} passes.")
    print()
    print(f"| reader | page cache | samples/s | ms per batch of {args.batch} | speed-up vs per-file |")
    print("|---|---|---|---|---|")
    for cache in ("cold", "warm", "cold, read only", "warm, read only"):
        base = statistics.median(times[("per-file .npy (official layout)", cache)])
        for name in readers:
            t = statistics.median(times[(name, cache)])
            print(f"| {name} | {cache} | {n / t:,.0f} | {t / (n / args.batch) * 1e3:.1f} | "
                  f"{'1.00x (baseline)' if t == base else f'**{base / t:.2f}x**'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
