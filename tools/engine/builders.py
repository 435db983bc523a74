"""Build the pieces of a run from a resolved config (one place, shared by every entry point)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from datasets import build_dataset
from models import build_model
from models.adapters import adapter_for
from models.base import EncoderTeacher
from tools.engine import checkpoint as ckpt_io
from utils.errors import ConfigError
from utils.state_dict import load_state_dict_checked

log = logging.getLogger(__name__)


def section(cfg: Mapping[str, Any], dotted: str) -> Mapping[str, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if not node:
        raise ConfigError(f"config section '{dotted}' is empty or missing")
    return node


def build_split(cfg: Mapping[str, Any], split: str, **overrides: Any):
    return build_dataset(section(cfg, f"dataset.{split}"), data_root=cfg.get("data_root"),
                         where=f"dataset.{split}", **overrides)


def build_svm_sets(cfg: Mapping[str, Any]):
    return build_split(cfg, "svm_train"), build_split(cfg, "svm_test")


def build_transform(cfg: Mapping[str, Any]):
    from datasets.transforms import build_transforms

    spec = cfg.get("augment") or []
    return build_transforms(list(spec)) if spec else None


def build_model_from_cfg(cfg: Mapping[str, Any], *, load_teacher: bool = True, **extra: Any) -> torch.nn.Module:
    """The config's model. A GM3D model's knowledge teacher is loaded here from ``model.gm3d.teacher_ckpt``
    through the backbone's checkpoint adapter (models read no files); ``load_teacher=False`` leaves it
    weightless, for a caller that loads a run checkpoint holding the teacher's weights next."""
    model_cfg = dict(section(cfg, "model"))
    model = build_model(model_cfg, where="model", **extra)
    teacher = getattr(model, "knowledge_teacher", None)
    if load_teacher and teacher is not None and not teacher.loaded:
        path = model.gcfg.teacher_ckpt
        if not path:
            raise ConfigError("model.gm3d.teacher_ckpt: GM3D variants B and C need a knowledge-teacher checkpoint")
        load_knowledge_teacher(teacher, path)
    return model


def load_knowledge_teacher(teacher: EncoderTeacher, path: str | Path) -> None:
    """Strict load of GM3D's knowledge teacher from an official or project pre-training checkpoint;
    nothing of the teacher may be missing."""
    adapter = adapter_for(teacher)
    extra = {"with_decoder": True} if getattr(teacher, "with_decoder", False) else {}  # variant B only
    state = adapter.teacher_state(ckpt_io.load_file(path), where=str(path), **extra)
    load_state_dict_checked(teacher, state, what=f"knowledge-teacher checkpoint {path}")
    log.info("knowledge teacher: %d tensors from %s", len(state), path)


def load_pretrained_for_eval(cfg: Mapping[str, Any], ckpt: str | None, device: torch.device) -> torch.nn.Module:
    """The config's pre-training model, with a checkpoint's weights when given (exact key check)."""
    model = build_model_from_cfg(cfg, load_teacher=not ckpt)
    if ckpt:
        state = ckpt_io.load_file(ckpt)
        ckpt_io.load_state_dict_checked(model, ckpt_io.extract_state_dict(state, ckpt), what=ckpt)
    return model.to(device).eval()
