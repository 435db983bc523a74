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
import zipfile
import zlib
from collections.abc import Mapping
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


def _zip_damage(path: Path) -> str | None:
    """The first member of a zip-format checkpoint whose CRC-32 does not match its data, or None.

    ``torch.load`` does not check the CRCs, so a checkpoint with damaged tensor bytes loads with wrong
    weights; this reads the file once more (about 0.6 GB/s). Members recorded with CRC 0 (a writer that
    skipped it) and files in the legacy non-zip format are not checked.
    """
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _reason(exc: BaseException) -> str:
    """One line saying why torch.load failed (its messages run to several lines of generic advice)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if ln.startswith(("Unsupported", "WeightsUnpickler error:"))
                   and not ln.endswith(":")), None)
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    head = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{head} ({detail})" if detail else head


def _fallback_hint(path: Path) -> str:
    """For a damaged ``ckpt-last.pth``: the newest intact checkpoint beside it and how to use it."""
    if path.name != "ckpt-last.pth":
        return ""
    folder = path.parent
    names = ["ckpt-prev.pth", *sorted((p.name for p in folder.glob("ckpt-epoch-*.pth")), reverse=True),
             "ckpt-best.pth"]
    intact = []
    for name in names:
        other = folder / name
        if not other.is_file():
            continue
        try:
            intact.append((int(_load(other).get("epoch", -1)), other))
        except (CheckpointError, TypeError, ValueError):
            continue
    if not intact:
        return (" No intact checkpoint is left beside it (ckpt-prev.pth, ckpt-epoch-*.pth, ckpt-best.pth); "
                "start again.")
    epoch, other = max(intact, key=lambda c: c[0])
    return (f" {other} (epoch {epoch}) is intact: to resume from it, cp {other} {path} and run with --resume "
            f"again (it repeats epoch {epoch + 1}); elsewhere pass {other} as the checkpoint.")


def _load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that needs arbitrary globals
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a weights-only "
                              f"checkpoint ({_reason(e)}).") from e
    damage = _zip_damage(path)
    if damage is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its data fails the zip CRC check ({damage}).")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict.")
    return dict(obj)


def load_file(path: str | Path) -> dict:
    """``torch.load(weights_only=True, map_location='cpu')``, the zip CRCs checked, with a one-line error for a
    missing, damaged or non-weights-only file; for a damaged ``ckpt-last.pth`` the error names the newest
    intact checkpoint beside it (``ckpt-prev.pth`` first) and how to use it."""
    path = Path(path)
    try:
        return _load(path)
    except CheckpointError as e:
        if not path.is_file():
            raise
        raise CheckpointError(f"{e}{_fallback_hint(path)}") from e.__cause__


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
