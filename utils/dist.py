"""torch.distributed helpers: the same code runs single-process and under ``torchrun``."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun; return (rank, world_size).

    gloo on CPU, NCCL on CUDA. A plain ``python`` launch returns (0, 1) and touches nothing.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    exit_with_parent()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


PR_SET_PDEATHSIG = 1
_WATCHDOG: threading.Thread | None = None


def exit_with_parent(sig: int = signal.SIGTERM, poll_s: float = 1.0) -> str:
    """Make this process receive ``sig`` when its parent (the torchrun launcher) dies.

    On Linux: ``prctl(PR_SET_PDEATHSIG, sig)`` through ctypes. Elsewhere, or when prctl is not available:
    a daemon thread that polls ``os.getppid()`` every ``poll_s`` seconds and signals this process once the
    parent has changed. Returns which mechanism is active (``"prctl"`` or ``"watchdog"``).
    """
    global _WATCHDOG
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os.kill(os.getpid(), sig)
                return "prctl"
        except (OSError, AttributeError):
            pass
    if _WATCHDOG is None or not _WATCHDOG.is_alive():
        def watch() -> None:
            while True:
                time.sleep(poll_s)
                if os.getppid() != parent:
                    os.kill(os.getpid(), sig)
                    return

        _WATCHDOG = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
        _WATCHDOG.start()
    return "watchdog"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (same keys on every rank)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= get_world_size()
    return dict(zip(keys, t.tolist()))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
