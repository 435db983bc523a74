"""The backbone contract: what the engine, GM3D, the heads and the evaluators may call on a model.

Three roles, one base class each. A new backbone implements :class:`MaskedAutoencoder` (its pre-training
objective) and :class:`Classifier` (its fine-tuning model) in one file, plus a checkpoint adapter
(:mod:`models.adapters`); everything else (the engine, GM3D, the linear SVM, fine-tuning, voting, few-shot)
works through the methods below and nothing else. ``docs/ARCHITECTURE.md`` walks through an example.

* :class:`TrainHooks`: the engine's explicit hooks, no-ops by default (``on_epoch_start``, ``after_step``,
  ``extra_metrics``). Every model of the project derives from it; the engine calls the hooks on any
  model that does, and never probes attributes.
* :class:`MaskedAutoencoder`: group a cloud into patches, encode with an optional visible mask, decode
  and reconstruct the masked patches. GM3D (:mod:`models.gm3d`) wraps any implementation: it needs the
  mask-scale centres, the tokens at that scale, the decoder positions, the per-masked-token
  reconstruction loss and the decoded mask tokens, and a frozen copy of the encoder as knowledge teacher.
  "Mask scale" is the scale at which the mask is decided: the only scale of Point-MAE, the coarsest of
  a multi-scale backbone (Point-M2AE), which then propagates the mask to its finer scales itself.
* :class:`Classifier`: logits, the pooled feature and the loss / accuracy of a fine-tuning model.
* :class:`SegmentationModel`: per-point part logits from points and the object category.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import at_least_float32
from models.masking import MaskStrategy
from utils.errors import DataError

__all__ = ["TrainHooks", "MaskedAutoencoder", "Classifier", "SegmentationModel", "EncoderTeacher", "layers_by_prefix"]


class TrainHooks:
    """Hooks the engine calls on every model (no-ops here)."""

    def on_epoch_start(self, epoch: int, max_epoch: int) -> None:
        """Called before the first step of ``epoch`` (0-based) of ``max_epoch``."""

    def after_step(self) -> None:
        """Called after every optimizer step (an EMA update, for instance)."""

    def extra_metrics(self) -> dict[str, float]:
        """Floats added to the epoch's log as ``train/<name>``; reset by the model at epoch start."""
        return {}

    def lr_layers(self) -> tuple[int, dict[str, int]]:
        """Depth of each parameter for layer-wise lr decay (``optimizer.layer_decay``, tools/optim.py).

        Returns ``(L, {parameter name: layer})``: layer 0 = the embeddings (patch embedding, cls token,
        positional embeddings), ``j + 1`` = transformer block ``j`` counted over the whole encoder (over
        all stages, in order, for a hierarchical one), ``L`` = everything after the last block (final
        norm, head). A model that does not implement it cannot use layer-wise decay.
        """
        raise NotImplementedError


def layers_by_prefix(model: nn.Module, rules: list[tuple[str, int]]) -> dict[str, int]:
    """``{parameter name: layer}`` for :meth:`TrainHooks.lr_layers` from ``(prefix, layer)`` rules: a
    parameter takes the layer of the longest prefix equal to its name or to a leading run of its dotted
    parts; one that no rule covers raises (a new module must be placed, not silently put at the top)."""
    out, missing = {}, []
    for name, _ in model.named_parameters():
        hits = [(len(p), layer) for p, layer in rules if name == p or name.startswith(p + ".")]
        if hits:
            out[name] = max(hits)[1]
        else:
            missing.append(name)
    if missing:
        raise NotImplementedError(f"{type(model).__name__}.lr_layers places no layer for {', '.join(missing[:5])}")
    return out


class MaskedAutoencoder(TrainHooks, nn.Module):
    """A backbone's masked-autoencoder pre-training objective.

    Subclasses set :attr:`ARCH` (the checkpoint adapter that reads their files), :attr:`token_dim` (width
    of the mask-scale tokens) and :attr:`masker` (the mask strategy, built from the model's mask block),
    and implement the methods that raise ``NotImplementedError``. ``forward`` returns the pre-training
    loss dict (``loss`` plus detached terms). ``groups`` below is whatever :meth:`group` returns (a
    :class:`~extensions.Patches` for one scale, a list of them for several); only the model reads it.
    """

    ARCH: ClassVar[str] = ""
    token_dim: int
    num_group: int
    masker: MaskStrategy

    def group(self, points: torch.Tensor) -> Any:
        """(B, N, 3) clouds -> the backbone's patches (computed once per batch, shared by teachers)."""
        raise NotImplementedError

    def mask_centers(self, groups: Any) -> torch.Tensor:
        """(B, G, 3) centres of the mask-scale patches; a mask is a (B, G) bool over them."""
        raise NotImplementedError

    def mask_scale_patches(self, groups: Any) -> torch.Tensor:
        """(B, G, K, 3) centre-relative points of the mask-scale patches (GM3D's content scorer and its
        patch-size normalisation read them). Optional."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its mask-scale patch points "
                                  f"(mask_scale_patches), which gm3d.gc_scorer: content and gc_chamfer_norm need")

    def encode(self, groups: Any, mask: torch.Tensor | None = None) -> Any:
        """Encode the visible patches (all of them when ``mask`` is None); the result is opaque."""
        raise NotImplementedError

    def mask_scale_tokens(self, encoded: Any) -> torch.Tensor:
        """(B, G_vis, C) normalised encoder tokens at the mask scale, visible ones in increasing index."""
        raise NotImplementedError

    def decoder_positions(self, groups: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G, C) decoder positional embeddings of the mask-scale patches: in patch order without a
        mask, ``[visible ; masked]`` (each in increasing index) with one."""
        raise NotImplementedError

    def reconstruct_masked(self, groups: Any, mask: torch.Tensor, encoded: Any
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and reconstruct the masked patches.

        Returns:
            ``f_hat`` (B, M, C) decoded mask tokens at the mask scale and ``l_p`` (B, M) the per-token
            reconstruction loss (Chamfer), both in increasing patch index of the masked patches.
        """
        raise NotImplementedError

    def decode_masked(self, groups: Any, mask: torch.Tensor, encoded: Any) -> torch.Tensor:
        """``f_hat`` of :meth:`reconstruct_masked` without the point head (GM3D variant B). Optional."""
        raise NotImplementedError

    def extract_features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) complete clouds -> (B, C) pooled feature of the frozen encoder (linear SVM)."""
        raise NotImplementedError

    def decoder_spec(self) -> dict[str, float]:
        """``num_heads`` and ``drop_path_rate`` for decoders over the mask-scale tokens (GM3D's GC decoder)."""
        raise NotImplementedError

    #: parameter-name prefixes that the pre-training loss never reads by design (kept for checkpoint
    #: compatibility, e.g. Point-M2AE's finest-scale encoder norm); they get no gradient
    PARAMS_WITHOUT_GRAD: ClassVar[tuple[str, ...]] = ()

    def params_without_grad(self) -> tuple[str, ...]:
        return self.PARAMS_WITHOUT_GRAD

    def build_knowledge_teacher(self, teacher_model: dict | None = None, with_decoder: bool = False
                                ) -> EncoderTeacher:
        """A frozen, weightless copy of this backbone's encoder (its weights come from a checkpoint
        through the adapter, outside the model). ``teacher_model`` overrides the architecture;
        ``with_decoder`` adds the pre-training decoder and point head (GM3D variant B)."""
        raise NotImplementedError


class EncoderTeacher(nn.Module):
    """A frozen encoder used as GM3D's knowledge teacher: always in eval mode, no gradients.

    Implementations provide :meth:`encode_full`. ``loaded`` turns True once a state dict has been loaded
    into it (through :func:`torch.nn.Module.load_state_dict` on it or on any parent).
    """

    def __init__(self) -> None:
        super().__init__()
        self.loaded = False

    def freeze(self) -> EncoderTeacher:
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if any(k.startswith(prefix) for k in state_dict):
            self.loaded = True

    token_dim: int

    def encode_full(self, groups: Any) -> torch.Tensor:
        """(B, G, C) mask-scale tokens of the complete cloud."""
        raise NotImplementedError

    def point_head_loss(self, groups: Any, mask: torch.Tensor, f_hat: torch.Tensor, f_full: torch.Tensor,
                        loss_fn) -> torch.Tensor:
        """GM3D variant B's point term, (B, M): the teacher's decoder and point head applied to the
        student's decoded mask tokens ``f_hat`` (B, M, C), against the same decoder and head applied to
        its own complete-cloud features ``f_full`` (B, G, C), taken at the masked patches. Optional."""
        raise NotImplementedError


class Classifier(TrainHooks, nn.Module):
    """A fine-tuning classification model.

    ``forward(batch)`` with ``points`` and ``label`` gives ``{"loss", "acc"}``; a bare (B, N, 3) tensor gives
    the logits. :attr:`ARCH` names the checkpoint adapter that maps pre-trained encoders onto it.
    """

    ARCH: ClassVar[str] = ""
    cls_dim: int

    def logits(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extract_features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, C) linear-SVM feature of the (fine-tuned) encoder."""
        raise NotImplementedError

    def loss_acc(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor, *, epoch: int = 0,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        """Engine contract: a batch dict with ``points`` (already sampled and augmented) and ``label``
        gives ``{"loss", "acc"}``; a bare (B, N, 3) tensor gives the logits."""
        if isinstance(batch, torch.Tensor):
            return self.logits(batch)
        if "label" not in batch:
            raise KeyError(f"{type(self).__name__}.forward: the batch has no 'label'")
        logits = self.logits(batch["points"])
        label = batch["label"]
        if int(label.min()) < 0 or int(label.max()) >= self.cls_dim:
            raise DataError(f"labels span [{int(label.min())}, {int(label.max())}] but the head has "
                            f"cls_dim={self.cls_dim} classes (check model.cls_dim against the data set)")
        loss, acc = self.loss_acc(logits, label)
        return {"loss": loss, "acc": acc}


class SegmentationModel(TrainHooks, nn.Module):
    """A part-segmentation model: ``seg_logits(points (B,N,3), category (B,)) -> (B, N, num_parts)``."""

    ARCH: ClassVar[str] = ""
    num_parts: int

    def seg_logits(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_acc(self, logits: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over all points (= the official NLL of log-softmax) and point accuracy in percent."""
        seg = seg.long()
        loss = F.cross_entropy(at_least_float32(logits).reshape(-1, self.num_parts), seg.reshape(-1))
        acc = (logits.argmax(-1) == seg).float().mean() * 100.0
        return loss, acc.detach()

    def forward(self, batch: dict[str, torch.Tensor], *, epoch: int = 0,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Engine contract: ``points`` (B, N, 3), ``seg`` (B, N), ``category`` (B,) -> ``{"loss", "acc"}``."""
        for key in ("points", "seg", "category"):
            if key not in batch:
                raise KeyError(f"{type(self).__name__}.forward: the batch has no '{key}'")
        seg = batch["seg"]
        if int(seg.min()) < 0 or int(seg.max()) >= self.num_parts:
            raise DataError(f"part labels span [{int(seg.min())}, {int(seg.max())}] but the model predicts "
                            f"num_parts={self.num_parts} (check model.num_parts against the data set)")
        logits = self.seg_logits(batch["points"], batch["category"])
        loss, acc = self.loss_acc(logits, seg)
        return {"loss": loss, "acc": acc}
