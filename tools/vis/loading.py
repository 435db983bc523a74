"""Pre-training checkpoints rebuilt for inference, the checkpoints of a run, and the shapes to draw.

Models are built from the checkpoint's own ``config["model"]`` and loaded with the exact key check;
a GM3D knowledge teacher whose ``teacher_ckpt`` file is missing is left out (the model is built as
variant A and the ``knowledge_teacher.*`` keys are skipped): the GC decoder and the EMA teacher do not
depend on it.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.engine import checkpoint as ckpt_io
from utils.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "LoadedCheckpoint",
    "NoGCDecoderError",
    "Shape",
    "default_split",
    "is_gm3d",
    "load_checkpoint",
    "load_shapes",
    "run_checkpoints",
    "shapes_from_dataset",
    "thin",
]


class NoGCDecoderError(CheckpointError):
    """The checkpoint's model has no GC decoder / EMA teacher (a plain Point-MAE checkpoint)."""


def is_gm3d(model: torch.nn.Module) -> bool:
    """Whether ``model`` has what the GC views need: an EMA teacher's scores, a GC decoder, a GM3D masker."""
    from models.gm3d import GM3D

    return isinstance(model, GM3D)


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    """A pre-training checkpoint rebuilt for inference (``model`` is in eval mode)."""

    path: Path
    model: torch.nn.Module
    epoch: int
    config: dict
    model_name: str
    is_gm3d: bool
    variant: str | None = None           # the GM3D loss variant the run trained with
    kd_dropped: bool = False             # the knowledge teacher was left out (its file is missing)
    point_head: torch.nn.Module | None = None  # variant B: the knowledge teacher's head (from the file)


def _model_class(name: str):
    from models import MODELS

    try:
        return MODELS.get(name)
    except Exception as e:  # unknown name: the registry's message lists the known ones
        raise ConfigError(f"config model.NAME {name!r}: {e}") from e


def migrate_gm3d_config(model_cfg: dict) -> None:
    """Move ``gm3d.alpha_max`` / ``gm3d.curriculum`` of checkpoints written before the ``model.mask``
    block existed into it (in place)."""
    g = dict(model_cfg.get("gm3d") or {})
    moved = {k: g.pop(k) for k in ("alpha_max", "curriculum") if k in g}
    if moved:
        model_cfg["gm3d"] = g
        model_cfg["mask"] = {**dict(model_cfg.get("mask") or {}), **moved}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Build the model of a pre-training checkpoint from its own ``config['model']`` and load it.

    The key check is exact; the only keys allowed to be left over are ``knowledge_teacher.*`` when the
    GM3D knowledge teacher's ``teacher_ckpt`` file is missing (the model is then built as variant A,
    which has no knowledge teacher; the GC decoder and the EMA teacher do not depend on it).
    """
    from models import build_model
    from models.gm3d import GM3D

    path = Path(path)
    ck = ckpt_io.load_file(path)
    config = ck.get("config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping) \
            or not config["model"].get("NAME"):
        raise CheckpointError(f"{path} carries no 'config' with a model section; tools/visualize.py needs "
                              f"a checkpoint written by this project's trainer (ckpt-*.pth of a run)")
    config = copy.deepcopy(dict(config))
    model_cfg = copy.deepcopy(dict(config["model"]))
    cls = _model_class(model_cfg["NAME"])
    gm3d = isinstance(cls, type) and issubclass(cls, GM3D)
    if gm3d:
        migrate_gm3d_config(model_cfg)
    variant, kd_dropped = None, False
    if gm3d:
        g = dict(model_cfg.get("gm3d") or {})
        variant = g.get("variant", "C")
        teacher = g.get("teacher_ckpt")
        if variant in ("B", "C") and not teacher:
            variant = "A"  # the trainer built it as variant A too (with a warning)
        if variant in ("B", "C") and not Path(teacher).is_file():
            log.warning("%s: knowledge-teacher checkpoint %s not found; building the model without it "
                        "(variant A) for visualisation; the GC decoder and EMA teacher do not need it",
                        path, teacher)
            g["variant"], g["teacher_ckpt"] = "A", None
            model_cfg["gm3d"] = g
            kd_dropped = True
    model = build_model(model_cfg, where=f"{path}: config.model")
    state = ckpt_io.extract_state_dict(ck, path)
    ckpt_io.load_state_dict_checked(model, state,
                                    allowed_unexpected_prefixes=("knowledge_teacher.",) if kd_dropped else (),
                                    what=f"checkpoint {path}")
    point_head = None
    if variant == "B":
        # Variant B trains no student point head; its reconstructions come from the knowledge
        # teacher's head applied to the student's decoded tokens (the weights are in the file).
        w = state.get("knowledge_teacher.increase_dim.0.weight")
        b = state.get("knowledge_teacher.increase_dim.0.bias")
        if w is not None and b is not None:
            point_head = torch.nn.Conv1d(w.shape[1], w.shape[0], 1)
            point_head.load_state_dict({"weight": w, "bias": b})
            point_head = point_head.to(device).eval()
    if gm3d:
        model.masker.set_total_epochs(int(config.get("max_epoch", 1)))
    model = model.to(device).eval()
    return LoadedCheckpoint(path=path, model=model, epoch=int(ck.get("epoch", 0)), config=config,
                            model_name=str(ck.get("model_name") or type(model).__name__), is_gm3d=gm3d,
                            variant=variant, kd_dropped=kd_dropped, point_head=point_head)


_EPOCH_FILE = re.compile(r"ckpt-epoch-(\d+)\.pth$")


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every ``ckpt-epoch-*.pth`` and ``ckpt-last.pth`` of a run, ordered by epoch, one per epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    by_epoch: dict[int, Path] = {}
    for p in sorted(run_dir.glob("ckpt-epoch-*.pth")):
        m = _EPOCH_FILE.search(p.name)
        if m:
            by_epoch.setdefault(int(m.group(1)), p)
    last = run_dir / "ckpt-last.pth"
    if last.is_file():
        epoch = int(ckpt_io.load_file(last).get("epoch", -1))
        by_epoch.setdefault(epoch, last)
    if not by_epoch:
        raise CheckpointError(f"{run_dir} holds no ckpt-epoch-*.pth or ckpt-last.pth")
    return [by_epoch[e] for e in sorted(by_epoch)]


def thin(items: Sequence, k: int | None) -> list:
    """At most ``k`` items, evenly spaced, always keeping the first and the last."""
    items = list(items)
    if not k or k >= len(items):
        return items
    if k == 1:
        return [items[-1]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


# ---------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------
@dataclass
class Shape:
    points: torch.Tensor   # (N, 3)
    class_name: str
    name: str
    index: int


def default_split(config: Mapping[str, Any]) -> str:
    """The split the views draw from by default: ``svm_test`` when the config has one, else ``train``."""
    ds = config.get("dataset") or {}
    return "svm_test" if ds.get("svm_test") else "train"


def _shape_from_item(dataset, item: Mapping[str, Any], index: int) -> Shape:
    label = int(item["label"]) if "label" in item else -1
    classes = getattr(dataset, "classes", None)
    if classes is not None and 0 <= label < len(classes):
        cls = str(classes[label])
    elif label >= 0:
        cls = f"class {label}"
    else:
        cls = str(item.get("name", f"shape {index}"))
    pts = item["points"]
    pts = torch.as_tensor(pts, dtype=torch.float32)[:, :3]
    return Shape(points=pts, class_name=cls, name=str(item.get("name", f"#{index}")), index=index)


def shapes_from_dataset(dataset, indices: Sequence[int], seed: int = 0) -> list[Shape]:
    """Items ``indices`` of ``dataset``. Data sets that seed their draws per item (all of this project's,
    at their epoch 0) give the same points whatever ``seed``; one that draws from the global torch or
    numpy RNG draws under ``seed``, without touching the caller's RNG state."""
    n = len(dataset)
    out = []
    for i in indices:
        if not -n <= i < n:
            raise DataError(f"shape index {i} is out of range: the data set has {n} items ({dataset!r})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np_state = np.random.get_state()
            np.random.seed(seed)
            try:
                item = dataset[i % n]
            finally:
                np.random.set_state(np_state)
        out.append(_shape_from_item(dataset, item, i % n))
    return out


def load_shapes(config: Mapping[str, Any], indices: Sequence[int], split: str | None = None,
                seed: int = 0) -> list[Shape]:
    """Shapes ``indices`` of a split of the checkpoint's data config (default: svm_test, else train)."""
    from tools.engine.builders import build_split

    split = split or default_split(config)
    dataset = build_split(config, split)
    return shapes_from_dataset(dataset, indices, seed)
