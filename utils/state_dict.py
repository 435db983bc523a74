"""State-dict key handling shared by models and tools: layouts, exact key checks, checked loads.

Pure functions on loaded dictionaries (no file I/O): :func:`extract_state_dict` finds the weights in
any supported checkpoint layout, :func:`check_keys` and :func:`load_state_dict_checked` load them with
an exact list of allowed missing keys and a shape check, naming every mismatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from utils.errors import CheckpointError

__all__ = ["extract_state_dict", "check_keys", "load_state_dict_checked", "strip_prefixes", "show_keys"]


def show_keys(keys, limit: int = 12) -> str:
    """A short sorted listing of ``keys`` for error messages."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def strip_prefixes(key: str, prefixes: tuple[str, ...] = ("module.", "base_model.")) -> str:
    """Remove any run of the leading ``prefixes`` (DDP's ``module.``, Point-BERT's ``base_model.``)."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


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
        show = show_keys
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
