"""Benchmark the point ops against naive baselines measured in the same run; prints a markdown table.

    python bench/ops.py [--device cpu|cuda] [--repeats 11] [--threads N] [--dtype float32]

Each row times one call (median of ``--repeats`` after warm-up, slow baselines fewer times) of the
package op and of a naive formulation of the same op, and reports the speed-up. On the CPU the run
takes well under a minute; the machine may be shared, so differences under ~1.5x are ties.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from extensions import backends, chamfer_l2, fps, group, knn
from extensions.pointops import dispatch
from utils.misc import cpu_name


def naive_fps(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """The usual torch FPS loop: advanced indexing, broadcast distance, minimum, argmax."""
    batch, n, _ = xyz.shape
    rows = torch.arange(batch, device=xyz.device)
    dist = torch.full((batch, n), float("inf"), device=xyz.device, dtype=xyz.dtype)
    far = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    out = []
    for _ in range(npoint):
        out.append(far)
        dist = torch.minimum(dist, ((xyz - xyz[rows, far].unsqueeze(1)) ** 2).sum(-1))
        far = dist.argmax(-1)
    return torch.stack(out, 1)


def naive_knn(query: torch.Tensor, ref: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast-difference distances and a full sort."""
    d = ((query[:, :, None] - ref[:, None]) ** 2).sum(-1).sqrt()
    dist, idx = d.sort(-1)
    return dist[..., :k], idx[..., :k]


def naive_group(xyz: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive FPS + naive kNN + advanced indexing, the Point-MAE ``Group`` written plainly."""
    rows = torch.arange(xyz.shape[0], device=xyz.device)[:, None]
    center = xyz[rows, naive_fps(xyz, num_group)]
    idx = naive_knn(center, xyz, group_size)[1]
    return xyz[rows[:, :, None], idx] - center.unsqueeze(2), center


def naive_chamfer_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Broadcast-difference distance matrix, min both ways (autograd through the dense min)."""
    d = ((a[:, :, None] - b[:, None]) ** 2).sum(-1)
    return d.min(2)[0].mean() + d.min(1)[0].mean()


def timeit(fn: Callable[[], object], repeats: int, device: torch.device, budget_s: float = 3.0) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call; stops early past ``budget_s``."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - started > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor):
    """A closure running forward and backward of ``loss_fn`` on fresh leaves (a and b both need grad)."""

    def run() -> None:
        x = a.detach().requires_grad_()
        y = b.detach().requires_grad_()
        loss_fn(x, y).backward()

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per row (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)

    def cloud(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    rep = args.repeats
    rows: list[tuple[str, str, float, float, str]] = []
    names = backends(device)

    def add(
        op: str,
        shape: str,
        naive: Callable[[], object],
        ours: Callable[[], object],
        backend: str,
        naive_repeats: int | None = None,
    ) -> None:
        rows.append(
            (op, shape, timeit(naive, naive_repeats or rep, device), timeit(ours, rep, device), backend)
        )

    for b, n, m in [(32, 1024, 64), (32, 2048, 128)]:
        x = cloud(b, n, 3)
        add(
            "fps",
            f"{b}x{n} -> {m}",
            lambda x=x, m=m: naive_fps(x, m),
            lambda x=x, m=m: fps(x, m),
            names["fps"],
        )
    if dispatch.load_quickfps() is not None:
        previous = os.environ.get(dispatch.ENV_VAR)
        os.environ[dispatch.ENV_VAR] = "fast"
        try:
            if dispatch.fps_backend(device) == "quickfps":
                for b, n, m in [(32, 1024, 64), (32, 2048, 128)]:
                    x = cloud(b, n, 3)
                    add(
                        "fps (GM3D_OPS=fast)",
                        f"{b}x{n} -> {m}",
                        lambda x=x, m=m: naive_fps(x, m),
                        lambda x=x, m=m: fps(x, m),
                        "quickfps",
                    )
        finally:
            if previous is None:
                del os.environ[dispatch.ENV_VAR]
            else:
                os.environ[dispatch.ENV_VAR] = previous

    x = cloud(32, 1024, 3)
    centres = x[:, :64].contiguous()
    add(
        "knn k=32",
        "32x64 vs 32x1024",
        lambda: naive_knn(centres, x, 32),
        lambda: knn(centres, x, 32),
        names["knn"],
    )
    add("group 64x32", "32x1024", lambda: naive_group(x, 64, 32), lambda: group(x, 64, 32), names["group"])

    pred, target = cloud(2048, 32, 3), cloud(2048, 32, 3)
    with torch.no_grad():
        add(
            "chamfer_l2 fwd",
            "2048 x (32 vs 32)",
            lambda: naive_chamfer_l2(pred, target),
            lambda: chamfer_l2(pred, target),
            names["chamfer_l2"],
        )
    add(
        "chamfer_l2 fwd+bwd",
        "2048 x (32 vs 32)",
        fwd_bwd(naive_chamfer_l2, pred, target),
        fwd_bwd(chamfer_l2, pred, target),
        names["chamfer_l2"],
    )
    big_a, big_b = cloud(32, 1024, 3), cloud(32, 1024, 3)
    add(
        "chamfer_l2 fwd+bwd",
        "32 x (1024 vs 1024)",
        fwd_bwd(naive_chamfer_l2, big_a, big_b),
        fwd_bwd(chamfer_l2, big_a, big_b),
        names["chamfer_l2"],
        naive_repeats=3,
    )

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"machine: {where} ({device.type}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"dtype {args.dtype}, median of up to {rep} calls (ms), GM3D_OPS={dispatch.mode()}"
    )
    print()
    print("| op | shape | naive ms | ours ms | speed-up | backend |")
    print("|---|---|---:|---:|---:|---|")
    for op, shape, naive_ms, ours_ms, backend in rows:
        print(f"| {op} | {shape} | {naive_ms:.1f} | {ours_ms:.1f} | {naive_ms / ours_ms:.1f}x | {backend} |")


if __name__ == "__main__":
    main()
