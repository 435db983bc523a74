"""Checkpoint adapters: per-architecture key mappings, exact and never silent (docs/METHOD.md, decision 8).

An adapter turns the weights of any checkpoint layout it knows (the official releases and this project's
runs) into the key names of one of its architecture's models, and says exactly which keys of that model
the checkpoint does not provide. Adapters work on loaded dictionaries only: reading files is the job of
``tools/tasks/pretrained.py``. ``ADAPTERS.get(model.ARCH)`` finds a model's adapter.

Point-MAE (``ARCH = "point_mae"``), the layouts recognised after removing ``module.`` / ``base_model.``
prefixes:

* pre-training: the official ``pretrain.pth`` and this project's Point-MAE and GM3D runs, encoder under
  ``MAE_encoder.*`` (a GM3D run's EMA teacher under ``ema.MAE_encoder.*``, used with ``source="teacher"``);
  the decoder, the GC branch and both teachers (:data:`PointMAEAdapter.PRETRAIN_ONLY`) are dropped;
* fine-tuned: the official ``modelnet_1k.pth`` / ``scan_*.pth`` and this project's classifier runs,
  encoder under ``encoder.*``, ``pos_embed.*``, ``blocks.blocks.*``, ``norm.*`` (the head is dropped when
  only the encoder is wanted).

Point-M2AE (``ARCH = "point_m2ae"``), canonical encoder names ``h_encoder.*`` (docs/M2AE.md):

* pre-training: the official ``pre-train.pth`` (``module.`` prefix) and this project's Point-M2AE and GM3D
  runs: ``h_encoder.*`` with ``encoder_norms`` (EMA teacher under ``ema.h_encoder.*``); the decoder
  (``mask_token``, ``h_decoder``, ``decoder_pos_embeds``, ``token_prop``, ``decoder_norm``, ``rec_head``),
  the GC branch and the teachers are dropped;
* fine-tuned: the official ``modelnet40.pth`` / ``scan_*.pth`` and this project's classifier runs:
  ``h_encoder.*`` without ``encoder_norms``, a top-level ``norm.*`` and the head; the part-segmentation
  model (``models/point_m2ae_seg.py``) keeps ``encoder_norms``, so they load into it from a pre-training file.

As in the official fine-tuning, a pre-trained file's ``encoder_norms`` are not used by a classifier,
whose ``norm`` starts fresh (it is taken from a fine-tuned file when that file has it).

Any other key is an error that names it, so a checkpoint of another architecture fails loudly.

Encoder sources (``source``, the ``finetune.source`` setting): ``student`` (the trained model), ``ema`` (the
weight average a run with ``model_ema`` on saves under the checkpoint's ``model_ema`` entry; for a GM3D
checkpoint without one, its EMA teacher) and ``teacher`` (a GM3D run's EMA teacher, ``ema.*`` keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from utils.errors import CheckpointError
from utils.registry import Registry
from utils.state_dict import extract_state_dict, show_keys, strip_prefixes

__all__ = ["ADAPTERS", "CheckpointAdapter", "PointMAEAdapter", "PointM2AEAdapter", "adapter_for"]

ADAPTERS = Registry("checkpoint adapters")

Source = Literal["student", "ema", "teacher"]
SOURCES = ("student", "ema", "teacher")


class CheckpointAdapter:
    """Base class; an adapter maps checkpoint dictionaries onto its architecture's models.

    Subclasses implement :meth:`encoder_weights` (the canonical encoder state of any known layout) and
    the ``*_keys`` / mapping methods used by the loaders in ``tools/tasks/pretrained.py``.
    """

    arch = ""

    def state(self, ckpt: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
        """The checkpoint's weights with leading ``module.`` / ``base_model.`` removed."""
        return {strip_prefixes(k): v for k, v in extract_state_dict(ckpt, where).items()}

    def guess_architecture(self, keys: Iterable[str]) -> str:
        """A hint for error messages when the keys look like another architecture's."""
        keys = list(keys)
        for name in ADAPTERS.list():
            adapter = ADAPTERS.get(name)()
            if name != self.arch and adapter.recognises(keys):
                return f" It looks like a {adapter.display} checkpoint, which this {self.display} model cannot use."
        if any(k.startswith(("transformer_q.", "dvae.")) for k in keys):
            return " It looks like a Point-BERT / MoCo checkpoint (transformer_q.*)."
        return ""

    display = ""

    def recognises(self, keys: Iterable[str]) -> bool:
        """True when ``keys`` (prefix-stripped) hold this architecture's encoder."""
        raise NotImplementedError

    def encoder_weights(self, ckpt: Mapping[str, Any], *, source: Source = "student", where: str = "<checkpoint>"
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The encoder of any known layout under canonical names, plus ``info`` (``layout``, ``dropped``,
        ``n_encoder``, and ``extra``: non-encoder tensors a fine-tune model may reuse)."""
        raise NotImplementedError

    #: key prefix of a GM3D run's EMA teacher encoder
    TEACHER_PREFIX = ""

    def resolve_source(self, ckpt: Mapping[str, Any], source: str, where: str
                       ) -> tuple[Mapping[str, Any], str, str]:
        """``(checkpoint, source, where)`` to read: ``ema`` becomes the ``model_ema`` weights read as a student
        (or, for a GM3D checkpoint without them, ``teacher``); a one-line error when there are none."""
        if source not in SOURCES:
            raise CheckpointError(f"{where}: encoder source {source!r}; expected one of {', '.join(SOURCES)}")
        if source != "ema":
            return ckpt, source, where
        averaged = ckpt.get("model_ema")
        if isinstance(averaged, Mapping):
            return {"base_model": averaged}, "student", f"{where} [model_ema]"
        if any(k.startswith(self.TEACHER_PREFIX) for k in self.state(ckpt, where)):
            return ckpt, "teacher", where
        raise CheckpointError(f"{where}: source 'ema' needs averaged weights, but the checkpoint has no model_ema "
                              f"entry (pre-train with model_ema.enabled=true) and no GM3D EMA teacher "
                              f"({self.TEACHER_PREFIX}* keys)")

    def _result(self, out, extra, dropped, unknown, layout, sd, where):
        """``(encoder, info)`` of :meth:`encoder_weights`, after refusing keys of an unknown kind."""
        if unknown:
            raise CheckpointError(f"{where} ({layout}): keys of an unknown kind, refusing to guess: "
                                  f"{show_keys(unknown, 10)}.{self.guess_architecture(sd)}")
        info = {"layout": layout, "dropped": {k: v for k, v in dropped.items() if v}, "n_encoder": len(out),
                "extra": extra}
        return out, info

    def is_pretraining(self, state: Mapping[str, torch.Tensor]) -> bool:
        """True for a pre-training layout (prefix-stripped keys)."""
        raise NotImplementedError

    def teacher_state(self, ckpt: Mapping[str, Any], *, where: str = "<checkpoint>", with_decoder: bool = False
                      ) -> dict[str, torch.Tensor]:
        """Weights for this architecture's knowledge teacher (:class:`~models.base.EncoderTeacher`);
        ``with_decoder`` adds the pre-training decoder and point head (GM3D variant B)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- fine-tuning models
    #: key prefixes of the canonical encoder inside this architecture's fine-tuning models
    ENCODER: tuple[str, ...] = ()

    def finetune_state(self, model: torch.nn.Module, ckpt: Mapping[str, Any], *, source: Source = "student",
                       where: str = "<checkpoint>") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights for a fine-tuning model (classifier or segmentation): the canonical encoder, plus the
        file's extra tensors that the model has (a fine-tuned classifier's ``cls_token``, say)."""
        enc, info = self.encoder_weights(ckpt, source=source, where=where)
        own = model.state_dict()
        extra = {k: v for k, v in info.pop("extra").items() if k in own}
        return {**enc, **extra}, info

    def finetune_new_keys(self, model: torch.nn.Module) -> set[str]:
        """The keys of a fine-tuning model that a pre-trained encoder does not provide."""
        return {k for k in model.state_dict() if not k.startswith(self.ENCODER)}


@ADAPTERS.register("point_mae")
class PointMAEAdapter(CheckpointAdapter):
    """Point-MAE: canonical encoder names are those of ``PointMAEEncoder`` (the official fine-tune names)."""

    arch = "point_mae"
    display = "Point-MAE"
    ENCODER = ("encoder.", "pos_embed.", "blocks.blocks.", "norm.")
    CLS = ("cls_token", "cls_pos")
    HEAD = "cls_head_finetune."
    PRETRAIN_ONLY = (
        "mask_token", "decoder_pos_embed.", "MAE_decoder.", "increase_dim.",          # Point-MAE decoder
        "MAE_decoder_loss_pred.", "mask_token_loss_pred", "increase_dim_2.",           # GM3D GC branch
        "gc_content.", "gc_position.", "ema_num_updates",                              # GM3D options
        "ema.", "knowledge_teacher.",                                                  # GM3D teachers
    )
    # keys of a Point-MAE pre-training model that a knowledge teacher never uses
    TEACHER_UNUSED = ("mask_token", "decoder_pos_embed.", "MAE_decoder.", "MAE_decoder_loss_pred.",
                      "mask_token_loss_pred", "increase_dim_2.", "gc_content.", "gc_position.", "ema_num_updates",
                      "ema.", "knowledge_teacher.")

    def recognises(self, keys: Iterable[str]) -> bool:
        return any(k.startswith(("MAE_encoder.", "ema.MAE_encoder.", "blocks.blocks.")) for k in keys)

    TEACHER_PREFIX = "ema.MAE_encoder."

    def encoder_weights(self, ckpt, *, source="student", where="<checkpoint>"):
        ckpt, source, where = self.resolve_source(ckpt, source, where)
        sd = self.state(ckpt, where)
        enc_prefix = "ema.MAE_encoder." if source == "teacher" else "MAE_encoder."
        dropped: dict[str, list[str]] = {"pre-training only": [], "fine-tune head": []}
        out: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        if any(k.startswith(enc_prefix) for k in sd):
            layout = f"pre-training ({enc_prefix}*)"
            unused = self.PRETRAIN_ONLY + (("MAE_encoder.",) if source == "teacher" else ())
            for k, v in sd.items():
                if k.startswith(enc_prefix):
                    out[k[len(enc_prefix):]] = v
                elif k.startswith(unused):
                    dropped["pre-training only"].append(k)
                else:
                    unknown.append(k)
        elif source == "teacher":
            raise CheckpointError(f"{where}: source 'teacher' but the checkpoint has no ema.MAE_encoder.* keys "
                                  f"(it has {show_keys(sd, 10)})")
        elif any(k.startswith(self.ENCODER) for k in sd):
            layout = "fine-tune / encoder-only (encoder.*, blocks.blocks.*)"
            for k, v in sd.items():
                if k.startswith(self.ENCODER):
                    out[k] = v
                elif k in self.CLS:
                    extra[k] = v
                elif k.startswith(self.HEAD):
                    dropped["fine-tune head"].append(k)
                else:
                    unknown.append(k)
        else:
            raise CheckpointError(
                f"{where}: no Point-MAE encoder weights found: expected keys under MAE_encoder.* (pre-training) "
                f"or encoder.* / blocks.blocks.* (fine-tuning), after removing module. / base_model. prefixes. "
                f"The checkpoint has: {show_keys(sd, 10)}.{self.guess_architecture(sd)}")
        return self._result(out, extra, dropped, unknown, layout, sd, where)

    def is_pretraining(self, state):
        return any(k.startswith("MAE_encoder.") for k in state)

    def teacher_state(self, ckpt, *, where: str = "<checkpoint>", with_decoder: bool = False
                      ) -> dict[str, torch.Tensor]:
        """Weights for the Point-MAE knowledge teacher (``MAE_encoder.*`` and ``increase_dim.*`` of a
        pre-training file, plus ``decoder_pos_embed.*`` and ``MAE_decoder.*`` ``with_decoder``); the other
        pre-training keys are dropped, anything else is an error."""
        sd = self.state(ckpt, where)
        if not any(k.startswith("MAE_encoder.") for k in sd):
            raise CheckpointError(f"{where}: a knowledge teacher needs a Point-MAE pre-training checkpoint "
                                  f"(MAE_encoder.* keys); it has {show_keys(sd, 10)}.{self.guess_architecture(sd)}")
        keep = ("MAE_encoder.", "increase_dim.") + (("decoder_pos_embed.", "MAE_decoder.") if with_decoder else ())
        unknown = [k for k in sd if not k.startswith(keep + self.TEACHER_UNUSED)]
        if unknown:
            raise CheckpointError(f"{where}: unexpected keys for a Point-MAE knowledge teacher: {show_keys(unknown)}")
        return {k: v for k, v in sd.items() if k.startswith(keep)}


@ADAPTERS.register("point_m2ae")
class PointM2AEAdapter(CheckpointAdapter):
    """Point-M2AE: canonical encoder names are those of ``HierarchicalEncoder`` under ``h_encoder.``."""

    arch = "point_m2ae"
    display = "Point-M2AE"
    ENCODER = ("h_encoder.",)
    NORMS = "h_encoder.encoder_norms."
    EXTRA = ("norm.",)
    HEAD = "cls_head_finetune."
    PRETRAIN_ONLY = (
        "mask_token", "h_decoder.", "decoder_pos_embeds.", "token_prop.", "decoder_norm.", "rec_head.",  # decoder
        "MAE_decoder_loss_pred.", "mask_token_loss_pred", "increase_dim_2.",                           # GM3D GC
        "gc_content.", "gc_position.", "ema_num_updates",                                              # options
        "ema.", "knowledge_teacher.",                                                                  # teachers
    )

    def recognises(self, keys: Iterable[str]) -> bool:
        return any(k.startswith(("h_encoder.", "ema.h_encoder.")) for k in keys)

    def is_pretraining(self, state):
        # the decoder marks a pre-training file; encoder_norms alone do not (a fine-tuned seg model has them)
        return any(k.startswith(("h_decoder.", "rec_head.", "decoder_norm.", "token_prop.")) or k == "mask_token"
                   for k in state)

    TEACHER_PREFIX = "ema.h_encoder."

    def encoder_weights(self, ckpt, *, source="student", where="<checkpoint>"):
        ckpt, source, where = self.resolve_source(ckpt, source, where)
        sd = self.state(ckpt, where)
        prefix = "ema.h_encoder." if source == "teacher" else "h_encoder."
        if not any(k.startswith(prefix) for k in sd):
            if source == "teacher":
                raise CheckpointError(f"{where}: source 'teacher' but the checkpoint has no ema.h_encoder.* keys "
                                      f"(it has {show_keys(sd, 10)})")
            raise CheckpointError(
                f"{where}: no Point-M2AE encoder weights found: expected keys under h_encoder.* (official "
                f"pre-training and fine-tuning layouts), after removing module. / base_model. prefixes. "
                f"The checkpoint has: {show_keys(sd, 10)}.{self.guess_architecture(sd)}")
        pretraining = self.is_pretraining(sd)
        layout = (f"pre-training ({prefix}*)" if pretraining else "fine-tune / encoder-only (h_encoder.*, norm.*)")
        dropped: dict[str, list[str]] = {"pre-training only": [], "fine-tune head": []}
        out: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        unused = self.PRETRAIN_ONLY + (("h_encoder.",) if source == "teacher" else ())
        for k, v in sd.items():
            if k.startswith(prefix):
                out["h_encoder." + k[len(prefix):]] = v
            elif k.startswith(self.EXTRA):
                extra[k] = v
            elif k.startswith(self.HEAD):
                dropped["fine-tune head"].append(k)
            elif k.startswith(unused) and (pretraining or source == "teacher"):
                dropped["pre-training only"].append(k)
            else:
                unknown.append(k)
        return self._result(out, extra, dropped, unknown, layout, sd, where)

    def finetune_state(self, model, ckpt, *, source="student", where="<checkpoint>"):
        """The encoder for a fine-tuning model; the pre-training ``encoder_norms`` are dropped when the
        model has none (the official fine-tuning models), as the official loader ignores them."""
        enc, info = super().finetune_state(model, ckpt, source=source, where=where)
        own = model.state_dict()
        norms = [k for k in enc if k.startswith(self.NORMS) and k not in own]
        for k in norms:
            del enc[k]
        if norms:
            info["dropped"].setdefault("pre-training encoder_norms (the classifier has its own norm)", []).extend(norms)
            info["n_encoder"] -= len(norms)
        return enc, info

    def teacher_state(self, ckpt, *, where: str = "<checkpoint>", with_decoder: bool = False
                      ) -> dict[str, torch.Tensor]:
        """Weights for the Point-M2AE knowledge teacher: ``h_encoder.*`` (with ``encoder_norms``) of a
        pre-training file; the other pre-training keys are dropped, anything else is an error."""
        sd = self.state(ckpt, where)
        if not any(k.startswith(self.NORMS) for k in sd):
            raise CheckpointError(f"{where}: a knowledge teacher needs a Point-M2AE pre-training checkpoint "
                                  f"(h_encoder.* with h_encoder.encoder_norms.*); it has {show_keys(sd, 10)}."
                                  f"{self.guess_architecture(sd)}")
        unknown = [k for k in sd if not k.startswith(("h_encoder.",) + self.PRETRAIN_ONLY)]
        if unknown:
            raise CheckpointError(f"{where}: unexpected keys for a Point-M2AE knowledge teacher: {show_keys(unknown)}")
        return {k: v for k, v in sd.items() if k.startswith("h_encoder.")}


def adapter_for(model: Any) -> CheckpointAdapter:
    """The adapter of a model (its ``ARCH``); a clear error for a model without one."""
    arch = getattr(model, "ARCH", "")
    if not arch or arch not in ADAPTERS:
        raise CheckpointError(f"{type(model).__name__} declares no checkpoint adapter (ARCH={arch!r}); "
                              f"known: {', '.join(ADAPTERS.list())}")
    return ADAPTERS.get(arch)()
