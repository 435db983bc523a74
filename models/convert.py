"""Checkpoint key mapping for fine-tuning (SPEC decision 8: explicit, exact, never silent).

One mapping, :func:`pretrained_to_classifier`, turns the weights of any supported pre-training
checkpoint into the fine-tune model's key names (:class:`models.classifier.PointTransformer`):

* official Point-MAE ``pretrain.pth``: ``{'base_model': {'module.MAE_encoder.*', 'module.mask_token',
  'module.MAE_decoder.*', ...}}`` -> ``encoder.*``, ``pos_embed.*``, ``blocks.blocks.*``, ``norm.*``;
* the same without ``module.`` (DDP runs) or under ``model`` / ``state_dict``;
* ``base_model.``-prefixed keys (the Point-BERT style the official loader also strips);
* this project's pre-training checkpoints (``PointMAE`` and ``PointMAE_GM3D``), whose state dicts also
  hold the GC branch (``MAE_decoder_loss_pred.*``, ``mask_token_loss_pred``, ``increase_dim_2.*``), the
  EMA teacher (``ema.*``) and the frozen knowledge teacher (``knowledge_teacher.*``): the student's
  ``MAE_encoder`` is used (``source="ema"`` takes the EMA teacher's instead);
* a fine-tuned classifier checkpoint used as initialisation (its head is dropped).

Pre-training keys that fine-tuning does not use are named in :data:`PRETRAIN_ONLY_PREFIXES` and
dropped; any other key is an error. :func:`load_pretrained_encoder` then loads the result with the
exact set of allowed missing keys (``cls_token``, ``cls_pos`` and ``cls_head_finetune.*``), checks the
shapes, and raises :class:`~utils.errors.CheckpointError` naming every mismatching key, so a checkpoint
of another architecture (Point-M2AE's ``h_encoder.*``, another width or depth) fails loudly.

:func:`load_finetuned` is the ``--test`` path: an official or project fine-tuned checkpoint, strict.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tools import checkpoint as ckpt_io
from utils.errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = ["PRETRAIN_ONLY_PREFIXES", "pretrained_to_classifier", "load_pretrained_encoder", "load_finetuned",
           "classifier_new_keys"]

ENCODER_PREFIXES = ("encoder.", "pos_embed.", "blocks.blocks.", "norm.")
NEW_PARAMS = ("cls_token", "cls_pos")
HEAD_PREFIX = "cls_head_finetune."
# keys of a pre-training state dict that fine-tuning does not use (after the encoder prefix is found)
PRETRAIN_ONLY_PREFIXES = (
    "mask_token", "decoder_pos_embed.", "MAE_decoder.", "increase_dim.",          # Point-MAE decoder
    "MAE_decoder_loss_pred.", "mask_token_loss_pred", "increase_dim_2.",           # GM3D GC branch
    "ema.", "knowledge_teacher.",                                                  # GM3D teachers
)
_LEADING = ("module.", "base_model.")


def _strip_leading(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _LEADING:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _show(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _guess_architecture(keys) -> str:
    keys = list(keys)
    if any(k.startswith("h_encoder.") for k in keys):
        return " It looks like a Point-M2AE checkpoint (h_encoder.*), which this Point-MAE classifier cannot use."
    if any(k.startswith(("transformer_q.", "dvae.", "module.transformer_q.")) for k in keys):
        return " It looks like a Point-BERT / MoCo checkpoint (transformer_q.*)."
    return ""


def pretrained_to_classifier(ckpt: Mapping[str, Any], *, source: Literal["student", "ema"] = "student",
                             where: str = "<checkpoint>") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map a pre-training (or fine-tuned) checkpoint to the fine-tune model's key names.

    Args:
        ckpt: a loaded checkpoint dict (``base_model`` / ``model`` / ``state_dict`` / a bare state dict).
        source: which encoder of a GM3D checkpoint to take: the ``student`` (``MAE_encoder.*``, default)
            or its ``ema`` teacher (``ema.MAE_encoder.*``).
        where: name for messages (the file path).

    Returns:
        ``(state_dict, info)``: the weights under classifier names (encoder keys, plus ``cls_token`` /
        ``cls_pos`` when the source has them; never the head) and ``info`` with ``layout`` (which layout
        was recognised), ``dropped`` (keys left out, by kind) and ``n_encoder`` (encoder tensors found).

    Raises:
        CheckpointError: no Point-MAE encoder in the checkpoint, or keys of an unknown kind.
    """
    raw = ckpt_io.extract_state_dict(ckpt, where)
    sd = {_strip_leading(k): v for k, v in raw.items()}
    enc_prefix = "ema.MAE_encoder." if source == "ema" else "MAE_encoder."
    dropped: dict[str, list[str]] = {"pre-training only": [], "fine-tune head": []}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    if any(k.startswith(enc_prefix) for k in sd):
        layout = f"pre-training ({enc_prefix}*)"
        unused = PRETRAIN_ONLY_PREFIXES + (("MAE_encoder.",) if source == "ema" else ())
        for k, v in sd.items():
            if k.startswith(enc_prefix):
                out[k[len(enc_prefix):]] = v
            elif k.startswith(unused):
                dropped["pre-training only"].append(k)
            else:
                unknown.append(k)
    elif source == "ema":
        raise CheckpointError(f"{where}: source='ema' but the checkpoint has no ema.MAE_encoder.* keys "
                              f"(it has {_show(sd)})")
    elif any(k.startswith(ENCODER_PREFIXES) for k in sd):
        layout = "fine-tune / encoder-only (encoder.*, blocks.blocks.*)"
        for k, v in sd.items():
            if k.startswith(ENCODER_PREFIXES) or k in NEW_PARAMS:
                out[k] = v
            elif k.startswith(HEAD_PREFIX):
                dropped["fine-tune head"].append(k)
            else:
                unknown.append(k)
    else:
        raise CheckpointError(
            f"{where}: no Point-MAE encoder weights found: expected keys under MAE_encoder.* (pre-training) "
            f"or encoder.* / blocks.blocks.* (fine-tuning), after removing module. / base_model. prefixes. "
            f"The checkpoint has: {_show(sd)}.{_guess_architecture(sd)}")
    if unknown:
        raise CheckpointError(f"{where} ({layout}): keys of an unknown kind, refusing to guess: {_show(unknown)}."
                              f"{_guess_architecture(sd)}")
    info = {"layout": layout, "dropped": {k: v for k, v in dropped.items() if v},
            "n_encoder": sum(1 for k in out if k.startswith(ENCODER_PREFIXES))}
    return out, info


def classifier_new_keys(model: nn.Module) -> set[str]:
    """The keys a pre-trained encoder does not provide: ``cls_token``, ``cls_pos`` and the head."""
    return {k for k in model.state_dict() if k in NEW_PARAMS or k.startswith(HEAD_PREFIX)}


def load_pretrained_encoder(model: nn.Module, path: str | Path, *, source: Literal["student", "ema"] = "student"
                            ) -> dict[str, Any]:
    """Load a pre-trained encoder into a :class:`~models.classifier.PointTransformer`.

    Every encoder key of the model must come from the checkpoint with the right shape; only
    ``cls_token``, ``cls_pos`` and ``cls_head_finetune.*`` may be missing (they keep their init).

    Returns:
        The mapping ``info`` plus ``missing``: the sorted keys left at their initialisation.

    Raises:
        CheckpointError: naming the missing, unexpected or wrongly shaped keys.
    """
    state, info = pretrained_to_classifier(ckpt_io.load_file(path), source=source, where=str(path))
    new = classifier_new_keys(model)
    ckpt_io.load_state_dict_checked(model, state, allowed_missing=new,
                                    what=f"pre-trained checkpoint {path} ({info['layout']})")
    missing = sorted(set(model.state_dict()) - set(state))
    assert set(missing) <= new, missing  # load_state_dict_checked guarantees it
    info["missing"] = missing
    for kind, keys in info["dropped"].items():
        log.info("%s: dropped %d %s keys (%s)", path, len(keys), kind, _show(keys, 4))
    log.info("loaded %d encoder tensors from %s (%s); left at init: %s", info["n_encoder"], path,
             info["layout"], _show(missing, 6))
    return info


def load_finetuned(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Strict load of a fine-tuned classifier checkpoint (official ``modelnet_1k.pth`` / ``scan_*.pth``
    layout, or this project's ``ckpt-*.pth``); returns the file's metadata (epoch, metrics)."""
    ckpt = ckpt_io.load_file(path)
    raw = ckpt_io.extract_state_dict(ckpt, path)
    sd = {_strip_leading(k): v for k, v in raw.items()}
    if any(k.startswith("MAE_encoder.") for k in sd):
        raise CheckpointError(f"{path} is a pre-training checkpoint (MAE_encoder.*); --test needs a fine-tuned "
                              f"classifier. Fine-tune it first: --finetune {path}")
    ckpt_io.load_state_dict_checked(model, sd, what=f"fine-tuned checkpoint {path}")
    meta = {k: ckpt.get(k) for k in ("epoch", "metrics", "best_metrics", "model_name") if k in ckpt}
    log.info("loaded fine-tuned checkpoint %s (epoch %s)", path, meta.get("epoch"))
    return meta
