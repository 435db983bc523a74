"""GeoMask3D (GM3D) pre-training for Point-MAE (SPEC.md; decisions 1-5).

One step, as data flows (patches are grouped once and shared by all three networks)::

    points -> group -> Patches
      EMA teacher (no_grad, eval): embed all -> encode all -> GC decoder -> scores (B, G)
      gm3d mask strategy(scores, epoch) -> mask (B, G), the N_sel top-scored patches always masked
      student: encode visible -> decoder [+ mask tokens] -> f_hat (masked) -> point head -> l_p (B, M)
                              \\-> GC decoder [+ its own mask tokens] -> g_hat (masked)
      knowledge teacher (frozen, no_grad): encode all -> f_t at the masked patches -> l_f (B, M)
      loss = lambda_feat * mean(l_f) + lambda_point * mean(l_p) + lambda_gc * rank(g_hat, sg(l_f + l_p))
    backward -> step -> EMA update (foreach lerp)

Variants (``gm3d.variant``): ``C`` (default, the paper's figure): student point head with Chamfer to
the real patch, feature KD, GC ranking. ``A``: no KD (GC target = l_p). ``B``: the released code path,
where the point term compares the knowledge teacher's point head applied to the student's decoded
features and to its own complete-cloud features under no_grad, so it carries no gradient (our
reading of SPEC 3.4; the student's own point head receives no gradient).

Module names of the GC branch follow the official GM3D code (``MAE_decoder_loss_pred``,
``mask_token_loss_pred``, ``increase_dim_2``); the EMA teacher lives under ``ema.`` and the frozen
knowledge teacher under ``knowledge_teacher.`` in the state dict.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from extensions import chamfer_l1, chamfer_l2
from models.build import MODELS
from models.layers import TransformerDecoder
from models.losses import gc_ranking_loss, normalized_mse, spearman_per_row
from models.masking import GM3DMask
from models.point_mae import PointMAE, PointMAEEncoder, TransformerConfig, _init_xavier
from tools import checkpoint as ckpt_io
from utils.registry import check_kwargs

log = logging.getLogger(__name__)

__all__ = ["GM3DConfig", "PointMAEGM3D", "KnowledgeTeacher", "GCHead"]


@dataclass
class GM3DConfig:
    """The ``model.gm3d`` block.

    Args:
        variant: loss variant, ``A`` (no KD), ``B`` (released code), ``C`` (paper figure, default).
        lambda_point: weight of the point-space Chamfer term.
        lambda_feat: weight of the feature-distillation term.
        lambda_gc: weight of the GC ranking loss.
        weight_warmup_epochs: epochs during which lambda_point and lambda_feat are both 1 (variant B's
            released schedule uses 15; 0 = off).
        alpha_max: final share of GC-selected masked patches.
        curriculum: ``linear`` over all epochs or ``mid`` (alpha_max at mid-training).
        gc_decoder_depth: blocks of the GC decoder (12 = the reported "MODIFIED_2" run; 4 is cheaper).
        ema_decay_start: EMA decay at epoch 0.
        ema_decay_end: EMA decay after the ramp.
        ema_ramp_epochs: epochs of the linear decay ramp.
        teacher_ckpt: knowledge-teacher checkpoint (official Point-MAE ``pretrain.pth`` or this
            project's); null turns KD off (variant A) with a warning.
        teacher_model: ``transformer_config`` of the knowledge teacher (default: the student's).
    """

    variant: Literal["A", "B", "C"] = "C"
    lambda_point: float = 1000.0
    lambda_feat: float = 13.889
    lambda_gc: float = 1.0
    weight_warmup_epochs: int = 0
    alpha_max: float = 0.5
    curriculum: Literal["linear", "mid"] = "linear"
    gc_decoder_depth: int = 12
    ema_decay_start: float = 0.999
    ema_decay_end: float = 0.9999
    ema_ramp_epochs: int = 100
    teacher_ckpt: str | None = None
    teacher_model: dict | None = None


class GCHead(nn.Module):
    """Official ``increase_dim_2``: Conv(C->1024) BN LeakyReLU(0.2) Conv(1024->C), then channel mean."""

    def __init__(self, dim: int, hidden: int = 1024):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(dim, hidden, 1), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
                                 nn.Conv1d(hidden, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, C) decoded tokens -> (B, G) scores."""
        return self.net(x.transpose(1, 2)).mean(1)


class KnowledgeTeacher(nn.Module):
    """Frozen pre-trained Point-MAE encoder (+ its point head, used by variant B only).

    Keys mirror the official pre-training checkpoint (``MAE_encoder.*``, ``increase_dim.0.*``) so the
    official ``pretrain.pth`` loads without renaming.
    """

    EXPECTED_UNUSED_PREFIXES = ("mask_token", "decoder_pos_embed.", "MAE_decoder.", "MAE_decoder_loss_pred.",
                                "mask_token_loss_pred", "increase_dim_2.", "ema.", "knowledge_teacher.")

    def __init__(self, tc: TransformerConfig, group_size: int):
        super().__init__()
        self.MAE_encoder = PointMAEEncoder(tc.trans_dim, tc.encoder_dims, tc.depth, tc.num_heads, 0.0,
                                           embed_visible_only=False)
        self.increase_dim = nn.Sequential(nn.Conv1d(tc.trans_dim, 3 * group_size, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen, BatchNorm in eval

    def load_checkpoint(self, path: str) -> None:
        """Strict load from an official or project checkpoint; nothing may be missing."""
        state = ckpt_io.extract_state_dict(ckpt_io.load_file(path), path)
        ckpt_io.load_state_dict_checked(self, state, allowed_missing=(),
                                        allowed_unexpected_prefixes=self.EXPECTED_UNUSED_PREFIXES,
                                        what=f"knowledge-teacher checkpoint {path}")


@MODELS.register("PointMAE_GM3D", "Point_MAE_GM3D")
class PointMAEGM3D(PointMAE):
    """Point-MAE + GeoMask3D pre-training model.

    Args:
        group_size: points per patch.
        num_group: patches per cloud.
        loss: Chamfer flavour of the point term (``cdl2`` as in GM3D).
        transformer_config: the Point-MAE block; ``mask_type`` is forced to ``gm3d``.
        embed_visible_only: see :class:`~models.point_mae.PointMAEEncoder`.
        gm3d: the :class:`GM3DConfig` block.
    """

    def __init__(self, group_size: int = 32, num_group: int = 64, loss: Literal["cdl1", "cdl2"] = "cdl2",
                 transformer_config: dict | None = None, embed_visible_only: bool = True,
                 gm3d: dict | None = None):
        tc_dict = dict(transformer_config or {})
        tc_dict["mask_type"] = "gm3d"
        g = dict(gm3d or {})
        check_kwargs(GM3DConfig, g, "model.gm3d")
        self.gcfg = GM3DConfig(**g)
        super().__init__(group_size, num_group, loss, tc_dict, embed_visible_only)
        gc, tc = self.gcfg, self.tc
        if gc.variant in ("B", "C") and not gc.teacher_ckpt:
            log.warning("model.gm3d.teacher_ckpt is not set: knowledge distillation is OFF, running "
                        "variant A (GC target = point error only)")
            gc.variant = "A"
        self.config["gm3d"] = asdict(gc)
        self.mask_token_loss_pred = nn.Parameter(torch.zeros(1, 1, tc.trans_dim))
        self.MAE_decoder_loss_pred = TransformerDecoder(tc.trans_dim, gc.gc_decoder_depth,
                                                        tc.decoder_num_heads, tc.drop_path_rate)
        self.MAE_decoder_loss_pred.apply(_init_xavier)
        self.increase_dim_2 = GCHead(tc.trans_dim)
        nn.init.trunc_normal_(self.mask_token_loss_pred, std=0.02)
        if gc.variant != "A":
            kt_tc = TransformerConfig.from_dict(gc.teacher_model, "model.gm3d.teacher_model") \
                if gc.teacher_model else tc
            self.knowledge_teacher = KnowledgeTeacher(kt_tc, group_size)
            self.knowledge_teacher.load_checkpoint(gc.teacher_ckpt)
            if kt_tc.trans_dim != tc.trans_dim:
                raise ValueError(f"knowledge teacher width {kt_tc.trans_dim} != student width {tc.trans_dim}")
        else:
            self.knowledge_teacher = None
        # EMA teacher: a momentum copy of the whole student (not the knowledge teacher).
        kt, self.knowledge_teacher = self.knowledge_teacher, None
        self.ema = copy.deepcopy(self)
        self.knowledge_teacher = kt
        self.ema.requires_grad_(False)
        self.ema.eval()
        self.ema_decay = gc.ema_decay_start
        self._stats: dict[str, float] = {}
        self._n_stats = 0

    def build_masker(self, tc: TransformerConfig) -> GM3DMask:
        g = self.gcfg
        return GM3DMask(tc.mask_ratio, alpha_max=g.alpha_max, schedule=g.curriculum)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "ema", None) is not None:
            self.ema.eval()
        return self

    # ------------------------------------------------------------------ engine hooks
    def on_epoch_start(self, epoch: int, max_epoch: int) -> None:
        g = self.gcfg
        self.masker.set_total_epochs(max_epoch)
        if epoch < g.ema_ramp_epochs:
            self.ema_decay = g.ema_decay_start + epoch / g.ema_ramp_epochs * (g.ema_decay_end - g.ema_decay_start)
        else:
            self.ema_decay = g.ema_decay_end
        self._stats, self._n_stats = {}, 0
        self._n_sel = self.masker.num_selected(epoch, self.num_group)

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update of every float parameter and buffer; integer buffers are copied."""
        student = [t for n, t in self._student_tensors()]
        teacher = [t for n, t in self.ema._student_tensors()]
        floats = [(e, s) for e, s in zip(teacher, student) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [s.detach() for _, s in floats], 1.0 - self.ema_decay)
        for e, s in zip(teacher, student):
            if not e.is_floating_point():
                e.copy_(s)

    def _student_tensors(self):
        """(name, tensor) of the student's parameters and buffers, excluding both teachers."""
        skip = ("ema.", "knowledge_teacher.")
        for name, t in self.state_dict(keep_vars=True).items():
            if not name.startswith(skip):
                yield name, t

    def extra_metrics(self) -> dict[str, float]:
        out = {k: v / max(self._n_stats, 1) for k, v in self._stats.items()}
        out["n_sel"] = float(getattr(self, "_n_sel", 0))
        out["ema_decay"] = float(self.ema_decay)
        return out

    # ------------------------------------------------------------------ forward pieces
    def gc_scores_all(self, x_all: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """GC scores of a complete cloud (no mask tokens): (B, G, C) tokens -> (B, G)."""
        x = self.MAE_decoder_loss_pred(x_all, self.decoder_pos_embed(center))
        return self.increase_dim_2(x)

    @torch.no_grad()
    def teacher_scores(self, neighborhood: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """The EMA teacher's GC score per patch of the complete cloud, (B, G)."""
        t = self.ema
        return t.gc_scores_all(t.MAE_encoder(neighborhood, center), center).float()

    def per_patch_terms(self, p, mask: torch.Tensor, x_vis: torch.Tensor):
        """The student's per-masked-patch losses for grouped clouds ``p`` under ``mask`` (B, G).

        Returns ``f_hat`` (B, M, C) decoded mask tokens, ``l_p`` (B, M) point term, ``l_f`` (B, M)
        feature-KD term (None for variant A) and ``gc_target`` (B, M), the detached error that the GC
        decoder learns to rank (``l_p`` for variant A, ``l_p + l_f`` for B and C).
        """
        g = self.gcfg
        B, M, K = mask.shape[0], int(mask[0].sum()), self.group_size
        f_hat = self.decode(x_vis, p.center, mask, self.mask_token, self.MAE_decoder, M)           # (B, M, C)
        target = p.neighborhood[mask].view(B * M, K, 3).float()
        chamfer = chamfer_l2 if self.loss_fn is chamfer_l2 else chamfer_l1
        if g.variant == "B":
            with torch.no_grad():
                kt_all = self.knowledge_teacher.MAE_encoder(p.neighborhood, p.center)
                f_t = kt_all[mask].view(B, M, -1)
                head = self.knowledge_teacher.increase_dim
                pred_pts = head(f_hat.detach().float().transpose(1, 2).to(head[0].weight.dtype))
                kt_pts = head(f_t.transpose(1, 2))
                l_p = chamfer(pred_pts.transpose(1, 2).reshape(B * M, K, 3).float(),
                              kt_pts.transpose(1, 2).reshape(B * M, K, 3).float(), reduction="none").view(B, M)
        else:
            pred = self.reconstruct(f_hat).reshape(B * M, K, 3).float()
            l_p = chamfer(pred, target, reduction="none").view(B, M)
        if g.variant == "A":
            l_f = None
            gc_target = l_p.detach()
        else:
            if g.variant == "C":
                with torch.no_grad():
                    f_t = self.knowledge_teacher.MAE_encoder(p.neighborhood, p.center)[mask].view(B, M, -1)
            l_f = normalized_mse(f_hat, f_t)                                                      # (B, M)
            gc_target = (l_f + l_p).detach()
        return f_hat, l_p, l_f, gc_target

    def loss_weights(self, epoch: int) -> tuple[float, float, float]:
        g = self.gcfg
        if epoch < g.weight_warmup_epochs:
            return 1.0, 1.0, g.lambda_gc
        return g.lambda_point, g.lambda_feat, g.lambda_gc

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor, *, epoch: int = 0,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        points = batch["points"] if isinstance(batch, dict) else batch
        p = self.group(points)
        G = p.center.shape[1]
        n_sel = self.masker.num_selected(epoch, G)
        scores = self.teacher_scores(p.neighborhood, p.center) if n_sel > 0 or self.training else None
        mask = self.masker(p.center, generator=generator, epoch=epoch, scores=scores)
        M = int(mask[0].sum())

        x_vis = self.MAE_encoder(p.neighborhood, p.center, mask)
        _, l_p, l_f, gc_target = self.per_patch_terms(p, mask, x_vis)
        gc_tokens = self.decode(x_vis, p.center, mask, self.mask_token_loss_pred, self.MAE_decoder_loss_pred)
        g_hat = self.increase_dim_2(gc_tokens)[:, -M:]                                            # (B, M)
        l_gc = gc_ranking_loss(g_hat.float(), gc_target)
        w_point, w_feat, w_gc = self.loss_weights(epoch)
        loss_point = l_p.mean()
        loss = w_point * loss_point + w_gc * l_gc
        out = {"loss_point": loss_point.detach(), "loss_gc": l_gc.detach()}
        if l_f is not None:
            loss_feat = l_f.mean()
            loss = loss + w_feat * loss_feat
            out["loss_feat"] = loss_feat.detach()
        out["loss"] = loss
        if self.training:
            self._record(scores, mask, gc_target, M)
        return out

    @torch.no_grad()
    def _record(self, scores: torch.Tensor | None, mask: torch.Tensor, gc_target: torch.Tensor, M: int) -> None:
        """Rank correlation between the teacher's scores and the student's actual per-patch errors."""
        if scores is None:
            return
        B = mask.shape[0]
        t_masked = scores[mask].view(B, M)
        rho = spearman_per_row(t_masked, gc_target).mean().item()
        self._stats["gc_rank_corr"] = self._stats.get("gc_rank_corr", 0.0) + rho
        self._n_stats += 1
