"""Load pre-trained and fine-tuned weights into models, through the checkpoint adapters.

Every loader reads a file (``tools.engine.checkpoint.load_file``: ``weights_only``, CPU), asks the model's
adapter (:mod:`models.adapters`, found by the model's ``ARCH``) for the mapped weights, and loads them
with the exact set of keys the model may leave at their initialisation; any other missing, unexpected or
wrongly shaped key is a :class:`~utils.errors.CheckpointError` naming it.

* :func:`load_pretrained_encoder`: a pre-training (or fine-tuned) checkpoint's encoder into a classifier
  or a segmentation model (``--finetune``).
* :func:`load_finetuned`: a fine-tuned checkpoint into its classifier, strict (``--test``).
* GM3D's frozen knowledge teacher (``model.gm3d.teacher_ckpt``) is loaded the same way by
  :func:`tools.engine.builders.load_knowledge_teacher` when the model is built.
* :func:`load_start_checkpoint`: a pre-training checkpoint into a pre-training model (``--start_ckpts``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from torch import nn

from models.adapters import adapter_for
from tools.engine import checkpoint as ckpt_io
from utils.errors import CheckpointError
from utils.state_dict import load_state_dict_checked, show_keys

log = logging.getLogger(__name__)

__all__ = ["load_pretrained_encoder", "load_finetuned", "load_start_checkpoint"]


def load_pretrained_encoder(model: nn.Module, path: str | Path, *, source: Literal["student", "ema", "teacher"] = "student"
                            ) -> dict[str, Any]:
    """Load a pre-trained encoder into a fine-tuning model (classifier or segmentation).

    Every encoder key of the model must come from the checkpoint with the right shape; only the
    adapter's new keys for that model (for a Point-MAE classifier: ``cls_token``, ``cls_pos``,
    ``cls_head_finetune.*``) may be missing.

    Returns:
        The adapter's ``info`` (``layout``, ``dropped``, ``n_encoder``) plus ``missing``: the sorted keys
        left at their initialisation.
    """
    adapter = adapter_for(model)
    ckpt = ckpt_io.load_file(path)
    state, info = adapter.finetune_state(model, ckpt, source=source, where=str(path))
    new = adapter.finetune_new_keys(model)
    load_state_dict_checked(model, state, allowed_missing=new,
                            what=f"pre-trained checkpoint {path} ({info['layout']})")
    missing = sorted(set(model.state_dict()) - set(state))
    info["missing"] = missing
    for kind, keys in info["dropped"].items():
        log.info("%s: dropped %d %s keys (%s)", path, len(keys), kind, show_keys(keys, 4))
    log.info("loaded %d encoder tensors (source %s) from %s (%s); left at init: %s", info["n_encoder"],
             source, path, info["layout"], show_keys(missing, 6))
    return info


def load_finetuned(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Strict load of a fine-tuned checkpoint (official layout or this project's ``ckpt-*.pth``);
    returns the file's metadata (epoch, metrics)."""
    adapter = adapter_for(model)
    ckpt = ckpt_io.load_file(path)
    sd = adapter.state(ckpt, str(path))
    if adapter.is_pretraining(sd):
        raise CheckpointError(f"{path} is a pre-training checkpoint; --test needs a fine-tuned model. "
                              f"Fine-tune it first: --finetune {path}")
    load_state_dict_checked(model, sd, what=f"fine-tuned checkpoint {path}")
    meta = {k: ckpt.get(k) for k in ("epoch", "metrics", "best_metrics", "model_name") if k in ckpt}
    log.info("loaded fine-tuned checkpoint %s (epoch %s)", path, meta.get("epoch"))
    return meta


def load_start_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Initialise a pre-training model from a pre-training checkpoint (the official ``--start_ckpts``).

    The file's keys (``module.`` / ``base_model.`` removed) must cover every key of the backbone's
    pre-training model exactly. For a GM3D model the GC branch and the EMA teacher are taken from the
    file when it has them (a GM3D run) and otherwise stay new, with the EMA teacher re-synchronised to
    the loaded student; the knowledge teacher always stays the configured one.

    Returns:
        ``{"loaded": n, "new": sorted keys left at init, "ignored": sorted keys of the file not used}``.
    """
    sd = adapter_for(model).state(ckpt_io.load_file(path), str(path))
    own = model.state_dict()
    student = getattr(model, "student", None)
    if student is None:  # a plain backbone: every key, exactly
        load_state_dict_checked(model, sd, what=f"--start_ckpts {path}")
        log.info("--start_ckpts %s: %d tensors loaded (every key of the model)", path, len(sd))
        return {"loaded": len(sd), "new": [], "ignored": []}
    student_keys = set(student.state_dict())
    gc_keys = {k for k in own if k not in student_keys and not k.startswith(("ema.", "knowledge_teacher."))}
    has_gc = any(k in sd for k in gc_keys)
    has_ema = any(k.startswith("ema.") for k in sd)
    ema_keys = {k for k in own if k.startswith("ema.")}
    wanted = student_keys | (gc_keys if has_gc else set()) | (ema_keys if has_ema else set())
    ignored = sorted(k for k in sd if k.startswith("knowledge_teacher."))
    state = {k: v for k, v in sd.items() if not k.startswith("knowledge_teacher.")}
    allowed_missing = set(own) - wanted
    load_state_dict_checked(model, state, allowed_missing=allowed_missing, what=f"--start_ckpts {path}")
    if not has_ema:  # the EMA teacher starts as a copy of the loaded student
        model.ema.load_state_dict({k: v for k, v in model.state_dict().items()
                                   if not k.startswith(("ema.", "knowledge_teacher."))}, strict=True)
    new = sorted(k for k in allowed_missing if not k.startswith(("ema.", "knowledge_teacher.")))
    log.info("--start_ckpts %s: %d tensors loaded; new: %s; EMA teacher %s; ignored %d knowledge-teacher keys",
             path, len(state), show_keys(new, 6), "from the file" if has_ema else "re-synchronised to the student",
             len(ignored))
    return {"loaded": len(state), "new": new, "ignored": ignored}
