"""Checkpoints: atomic writes, safe loads, and the official key layouts.

File layout (a superset of the official Point-MAE runner's)::

    {"base_model": state_dict, "optimizer": ..., "epoch": int, "metrics": {...}, "best_metrics": {...},
     "scaler": ..., "model_name": str, "config": {...}, "rng": {...}, "format": "geomask3d-1",
     "history": [metric record per epoch, as in metrics.jsonl]}

Official files keep their keys under ``base_model`` (sometimes ``model``) with a ``module.`` prefix
when saved from a DataParallel wrapper; :func:`extract_state_dict` normalises all of them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import CheckpointError
from utils.io import atomic_write

FORMAT = "geomask3d-1"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path`` (utils.io.atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


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


def extract_state_dict(ckpt: Mapping[str, Any], path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights of any supported layout, with a leading ``module.`` removed from each key."""
    for key in ("base_model", "model", "state_dict", "model_state_dict"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            sd = ckpt[key]
            break
    else:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            sd = ckpt
        else:
            raise CheckpointError(
                f"{path}: no model weights found; expected one of the keys 'base_model', 'model', "
                f"'state_dict', 'model_state_dict', got {sorted(ckpt)[:10]}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def check_keys(model_keys: Iterable[str], loaded_keys: Iterable[str], *, allowed_missing: Iterable[str] = (),
               allowed_unexpected_prefixes: Iterable[str] = (), what: str = "checkpoint") -> None:
    """Raise CheckpointError unless missing keys are exactly ``allowed_missing`` (a subset is an error
    too only if keys outside it are missing) and unexpected keys all start with an allowed prefix."""
    model_keys, loaded_keys = set(model_keys), set(loaded_keys)
    missing = model_keys - loaded_keys
    unexpected = {k for k in loaded_keys - model_keys
                  if not any(k.startswith(p) for p in allowed_unexpected_prefixes)}
    bad_missing = missing - set(allowed_missing)
    if bad_missing or unexpected:
        def show(keys):
            keys = sorted(keys)
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
        parts = []
        if bad_missing:
            parts.append(f"missing keys: {show(bad_missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise CheckpointError(f"{what} does not match the model; " + "; ".join(parts))


def load_state_dict_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                            allowed_missing: Iterable[str] = (), allowed_unexpected_prefixes: Iterable[str] = (),
                            what: str = "checkpoint") -> None:
    """``load_state_dict`` after an exact key check and a shape check, naming every mismatch."""
    own = module.state_dict()
    check_keys(own, state_dict, allowed_missing=allowed_missing,
               allowed_unexpected_prefixes=allowed_unexpected_prefixes, what=what)
    shape_bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shape_bad:
        raise CheckpointError(f"{what} has tensors of the wrong shape: " + "; ".join(shape_bad[:8]))
    filtered = {k: v for k, v in state_dict.items() if k in own}
    module.load_state_dict(filtered, strict=False)


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
