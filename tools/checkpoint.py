"""Checkpoints: atomic writes, safe loads, and the official key layouts.

File layout (a superset of the official Point-MAE runner's)::

    {"base_model": state_dict, "optimizer": ..., "epoch": int, "metrics": {...}, "best_metrics": {...},
     "scaler": ..., "model_name": str, "config": {...}, "rng": {...}, "format": "geomask3d-1",
     "history": [metric record per epoch, as in metrics.jsonl]}

Official files keep their keys under ``base_model`` (sometimes ``model``) with a ``module.`` prefix
when saved from a DataParallel wrapper; :func:`extract_state_dict` normalises all of them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import CheckpointError
from utils.io import atomic_write
from utils.state_dict import check_keys, extract_state_dict, load_state_dict_checked  # noqa: F401 (re-exported)

FORMAT = "geomask3d-1"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path`` (utils.io.atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def replace_with_link(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` another name of ``src``'s current content (a hard link, else a copy), atomically.

    The link goes to a temp name ``.<dst>.<pid>.tmp`` that is then renamed over ``dst``. When ``dst`` already
    is a link to the same file (a kill between this call and the next write of ``src`` leaves it so),
    ``rename`` does nothing and both names stay (POSIX: renaming one link of a file onto another link of
    the same file is a successful no-op); the temp name is removed in every case, so none survives.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        data = src.read_bytes()
        atomic_write(dst, lambda f: f.write(data))
        return
    try:
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def load_file(path: str | Path) -> dict:
    """``torch.load(weights_only=True, map_location='cpu')`` with a clear error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that needs arbitrary globals
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return dict(obj)


def rng_state() -> dict[str, Any]:
    """Global RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] is not None],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = list(state["python"])
    random.setstate((state["python_version"], tuple(py[:-1]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
