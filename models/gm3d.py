"""GeoMask3D (GM3D): a pre-training wrapper over any backbone's masked autoencoder (docs/METHOD.md).

One step, as data flows (patches are grouped once and shared by all three networks)::

    points -> student.group -> groups
      EMA teacher (no_grad, eval): encode all -> GC decoder -> scores (B, G) at the mask scale
      gm3d mask strategy(scores, epoch) -> mask (B, G), the N_sel top-scored patches always masked
      student: encode visible -> reconstruct_masked -> f_hat (B, M, C), l_p (B, M)
                              \\-> GC decoder [visible tokens ; its own mask tokens] -> g_hat (B, M)
      knowledge teacher (frozen, no_grad): encode all -> f_t at the masked patches -> l_f (B, M)
      loss = lambda_feat * mean(l_f) + lambda_point * mean(l_p) + lambda_gc * rank(g_hat, sg(l_f + l_p))
    backward -> step -> EMA update (foreach lerp)

:class:`GM3D` needs nothing from the student but the :class:`~models.base.MaskedAutoencoder` contract, so
one registration per backbone (:class:`PointMAEGM3D` below) adds GM3D to it. The student's modules are
adopted under their own names, so a GM3D state dict is the student's (for Point-MAE: the official
pre-training keys) plus the GC branch (official GM3D names ``MAE_decoder_loss_pred``,
``mask_token_loss_pred``, ``increase_dim_2``), the EMA teacher under ``ema.`` and the frozen knowledge
teacher under ``knowledge_teacher.``.

The knowledge teacher's weights never come from a file here: the model builds a weightless teacher
(or takes one passed in) and ``tools/engine/builders.py`` loads ``gm3d.teacher_ckpt`` into it through the
backbone's checkpoint adapter (a run checkpoint carries the teacher's weights too).

Variants (``gm3d.variant``): ``C`` (default, the paper's figure): student point head with Chamfer to
the real patch, feature KD, GC ranking. ``A``: no KD (GC target = l_p). ``B``: the released code path,
where the point term compares the knowledge teacher's point head applied to the student's decoded
features and to its own complete-cloud features under no_grad, so it carries no gradient.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import EncoderTeacher, MaskedAutoencoder
from models.build import MODELS
from models.ema import ema_update_, ramp_decay, warmup_decay
from models.layers import TransformerDecoder, _bn_relu_channels_last, _pointwise, at_least_float32
from models.losses import gc_ranking_loss, normalized_mse, spearman_per_row
from models.masking import GM3DMask, build_mask, resolve_mask_config
from models.point_mae import PointMAE, _init_xavier
from utils.errors import CheckpointError, ConfigError
from utils.registry import check_kwargs

log = logging.getLogger(__name__)

__all__ = ["GM3DConfig", "GM3D", "PointMAEGM3D", "GCHead"]


@dataclass
class GM3DConfig:
    """The ``model.gm3d`` block (the mask and its curriculum live in ``model.mask``).

    Args:
        variant: loss variant, ``A`` (no KD), ``B`` (released code), ``C`` (paper figure, default).
        lambda_point: weight of the point-space Chamfer term.
        lambda_feat: weight of the feature-distillation term.
        lambda_gc: weight of the GC ranking loss.
        weight_warmup_epochs: epochs during which lambda_point and lambda_feat are both 1 (variant B's
            released schedule uses 15; 0 = off).
        gc_decoder_depth: blocks of the GC decoder (12 = the reported "MODIFIED_2" run; 4 is cheaper).
        ema_decay_start: EMA decay at epoch 0.
        ema_decay_end: EMA decay after the ramp.
        ema_ramp_epochs: epochs of the linear decay ramp.
        teacher_ckpt: knowledge-teacher checkpoint (official pre-training file or this project's),
            loaded by the builder; null turns KD off (variant A) with a warning.
        teacher_model: architecture of the knowledge teacher (the backbone's ``transformer_config``;
            default: the student's).
        ema_bn: BatchNorm running statistics of the EMA teacher: ``average`` (official: EMA-averaged
            like the weights, so a short run keeps much of the initial running_var of 1) or ``copy``
            (copied from the student after every step).
        ema_warmup: use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (off = official), so a
            short run's teacher does not keep its random initialisation.
        gc_target: what the GC scorer learns to rank: ``sum`` (official: ``l_p + l_f``), ``zscore``
            (each term z-scored over a sample's masked patches, then summed) or ``weighted``
            (``lambda_point l_p + lambda_feat l_f``, the terms' weights in the loss).
        gc_chamfer_norm: divide the point term of the GC target by the patch's size (mean squared
            distance of its points to the centre), so that it measures shape, not scale.
        gc_scorer: who scores the patches: ``decoder`` (official: the GC transformer decoder at mask
            tokens, which never sees the masked patch), ``content`` (a small PointNet on the patch's own
            points, trained on the masked patches), ``position`` (an MLP of the patch centre: the
            position-only baseline) or ``oracle`` (the student's true per-patch error, measured with
            extra no-grad passes under complementary random masks; no GC loss).
        official_init: the official GM3D initialisation (the encoder keeps PyTorch's default init, the
            mask tokens start at zero) instead of the project's trunc-normal / Point-MAE init.
    """

    variant: Literal["A", "B", "C"] = "C"
    lambda_point: float = 1000.0
    lambda_feat: float = 13.889
    lambda_gc: float = 1.0
    weight_warmup_epochs: int = 0
    gc_decoder_depth: int = 12
    ema_decay_start: float = 0.999
    ema_decay_end: float = 0.9999
    ema_ramp_epochs: int = 100
    teacher_ckpt: str | None = None
    teacher_model: dict | None = None
    ema_bn: Literal["average", "copy"] = "average"
    ema_warmup: bool = False
    gc_target: Literal["sum", "zscore", "weighted"] = "sum"
    gc_chamfer_norm: bool = False
    gc_scorer: Literal["decoder", "content", "position", "oracle"] = "decoder"
    official_init: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "model.gm3d") -> GM3DConfig:
        d = dict(d or {})
        moved = [k for k in ("alpha_max", "curriculum") if k in d]
        if moved:
            raise ConfigError(f"{where}: {', '.join(moved)} moved to the mask block: write "
                              + ", ".join(f"model.mask.{k}: {d[k]!r}" for k in moved))
        check_kwargs(cls, d, where)
        return cls(**d)


class GCHead(nn.Module):
    """Official ``increase_dim_2``: Conv(C->1024) BN LeakyReLU(0.2) Conv(1024->C), then channel mean."""

    def __init__(self, dim: int, hidden: int = 1024):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(dim, hidden, 1), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
                                 nn.Conv1d(hidden, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, C) decoded tokens -> (B, G) scores (channels-last matmuls, no transposes).

        The channel mean of the last conv is one linear map, ``mean_c(W h + b) = mean_c(W) h + mean(b)``:
        a (1024 -> 1) product instead of (1024 -> C). Same values and gradients up to float rounding.
        """
        conv1, bn, act, conv2 = self.net
        h = _bn_relu_channels_last(_pointwise(x, conv1), bn, act.negative_slope)
        w = conv2.weight.squeeze(-1).mean(0, keepdim=True)
        return F.linear(h, w, conv2.bias.mean(0, keepdim=True)).squeeze(-1)


class ContentScorer(nn.Module):
    """A patch's score from its own points: shared point MLP 3-64-128, max-pool, MLP 128-64-1.

    It sees only the centre-relative points of the patch (never its position), so the score moves with
    the patch's content; it is trained on the masked patches' true points against the GC target."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.point = nn.Sequential(nn.Linear(3, 64), nn.GELU(), nn.Linear(64, hidden))
        self.head = nn.Sequential(nn.Linear(hidden, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, G, K, 3) centre-relative points -> (B, G) scores."""
        return self.head(self.point(patches).amax(2)).squeeze(-1)


class PositionScorer(nn.Module):
    """The position-only baseline: an MLP 3-64-64-1 of the patch centre."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, centers: torch.Tensor) -> torch.Tensor:
        """(B, G, 3) patch centres -> (B, G) scores."""
        return self.net(centers).squeeze(-1)


def _zscore_rows(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each row of (B, M) standardised to mean 0 and std 1."""
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + eps)


class GM3D(MaskedAutoencoder):
    """GeoMask3D pre-training over a :class:`~models.base.MaskedAutoencoder` student.

    Args:
        student: the backbone's masked autoencoder (its own mask strategy is replaced by GM3D's).
        mask: the ``model.mask`` block; the strategy is ``gm3d`` whatever it says.
        gm3d: the :class:`GM3DConfig` block.
        knowledge_teacher: a frozen encoder of the same backbone (variants B and C); None builds a
            weightless one from the student (``student.build_knowledge_teacher``) whose weights the
            caller loads, from ``gm3d.teacher_ckpt`` or from a run checkpoint.
        transformer_config: the student's official config block (only its mask keys are read here).
    """

    def __init__(self, student: MaskedAutoencoder, *, mask: dict | None = None, gm3d: dict | None = None,
                 knowledge_teacher: EncoderTeacher | None = None, transformer_config: dict | None = None):
        super().__init__()
        self.gcfg = gc = GM3DConfig.from_dict(gm3d)
        tc_mask = {k: v for k, v in (transformer_config or {}).items() if k in ("mask_ratio", "mask_type")}
        strategy = (mask or {}).get("strategy")
        if strategy not in (None, "gm3d"):
            raise ConfigError(f"model.mask.strategy is {strategy!r}, but a GM3D model always masks with 'gm3d' "
                              f"(for another strategy use the plain backbone, e.g. model.NAME: Point_MAE)")
        tc_mask["mask_type"] = "gm3d"  # the official key is forced, as in the official GM3D code
        mcfg = resolve_mask_config({**dict(mask or {}), "strategy": "gm3d"}, tc_mask)
        self._adopt(student)
        self.masker: GM3DMask = build_mask(mcfg)
        self.token_dim = C = student.token_dim
        if gc.variant in ("B", "C") and not gc.teacher_ckpt and knowledge_teacher is None:
            log.warning("model.gm3d.teacher_ckpt is not set: knowledge distillation is OFF, running "
                        "variant A (GC target = point error only)")
            gc.variant = "A"
        self.config = {**getattr(student, "config", {}), "mask": asdict(mcfg), "gm3d": asdict(gc)}
        if gc.gc_scorer == "decoder":  # the official GC branch (its key names)
            self.mask_token_loss_pred = nn.Parameter(torch.zeros(1, 1, C))
            spec = student.decoder_spec()
            self.MAE_decoder_loss_pred = TransformerDecoder(C, gc.gc_decoder_depth, int(spec["num_heads"]),
                                                            float(spec["drop_path_rate"]))
            self.MAE_decoder_loss_pred.apply(_init_xavier)
            self.increase_dim_2 = GCHead(C)
            if not gc.official_init:
                nn.init.trunc_normal_(self.mask_token_loss_pred, std=0.02)
        elif gc.gc_scorer == "content":
            self.gc_content = ContentScorer()
        elif gc.gc_scorer == "position":
            self.gc_position = PositionScorer()
        if gc.official_init:
            self.official_init()
        if gc.variant != "A":
            kt = knowledge_teacher if knowledge_teacher is not None else \
                student.build_knowledge_teacher(gc.teacher_model, **({"with_decoder": True}
                                                                     if gc.variant == "B" else {}))
            if not isinstance(kt, EncoderTeacher):
                raise ConfigError(f"knowledge_teacher must be an EncoderTeacher, got {type(kt).__name__}")
            if kt.token_dim != C:
                raise ConfigError(f"knowledge teacher width {kt.token_dim} != student width {C}")
            if gc.variant == "B" and (type(kt).point_head_loss is EncoderTeacher.point_head_loss
                                      or type(student).decode_masked is MaskedAutoencoder.decode_masked):
                raise ConfigError(f"gm3d.variant B needs a knowledge teacher with a point head and a student "
                                  f"with decode_masked; {type(kt).__name__} / {type(student).__name__} lack one "
                                  f"(use variant C)")
            self.knowledge_teacher: EncoderTeacher | None = kt.freeze()
        else:
            self.knowledge_teacher = None
        # EMA teacher: a momentum copy of the whole student and GC branch (not the knowledge teacher).
        kt, self.knowledge_teacher = self.knowledge_teacher, None
        self.ema = copy.deepcopy(self)
        self.knowledge_teacher = kt
        self.ema.requires_grad_(False)
        self.ema.eval()
        if gc.ema_warmup:  # the update count, saved with the run so that a resumed run continues it
            self.register_buffer("ema_num_updates", torch.zeros((), dtype=torch.long))
        self.ema_decay = gc.ema_decay_start
        self._stats: dict[str, torch.Tensor | float] = {}  # summed on the device, read once per epoch
        self._n_stats = 0
        self._n_sel = 0
        self._epoch = 0

    def official_init(self) -> None:
        """The official GM3D initialisation; backbones that define one override this."""
        raise ConfigError(f"model.gm3d.official_init: no official GM3D initialisation is defined for "
                          f"{type(self.student).__name__}")

    # ------------------------------------------------------------------ the student, adopted
    def _adopt(self, student: MaskedAutoencoder) -> None:
        """Register the student's parameters and sub-modules under their own names (flat keys)."""
        if student._buffers:
            raise TypeError(f"{type(student).__name__} has top-level buffers; GM3D cannot adopt it")
        object.__setattr__(self, "student", student)
        for name, p in student._parameters.items():
            self.register_parameter(name, p)
        for name, child in student._modules.items():
            self.add_module(name, child)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for name in self.student._parameters:       # keep the student's own parameters the same objects
            self.student._parameters[name] = self._parameters[name]
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.training = mode
        if getattr(self, "ema", None) is not None:
            self.ema.eval()
        return self

    def averaged_module(self) -> MaskedAutoencoder:
        """What ``model_ema`` averages (models/ema.py): the student, so that the average has the plain
        backbone's pre-training keys (the GC branch and both teachers are left out)."""
        return self.student

    # ------------------------------------------------------------------ the contract, delegated
    def group(self, points):
        return self.student.group(points)

    def mask_centers(self, groups):
        return self.student.mask_centers(groups)

    def encode(self, groups, mask=None):
        return self.student.encode(groups, mask)

    def mask_scale_tokens(self, encoded):
        return self.student.mask_scale_tokens(encoded)

    def decoder_positions(self, groups, mask=None):
        return self.student.decoder_positions(groups, mask)

    def reconstruct_masked(self, groups, mask, encoded):
        return self.student.reconstruct_masked(groups, mask, encoded)

    @torch.no_grad()
    def extract_features(self, points):
        return self.student.extract_features(points)

    def decoder_spec(self):
        return self.student.decoder_spec()

    def params_without_grad(self):
        # variant B trains no student point head (the released code path): Point-MAE's increase_dim
        return self.student.params_without_grad() + (("increase_dim.",) if self.gcfg.variant == "B" else ())

    def build_knowledge_teacher(self, teacher_model=None):
        return self.student.build_knowledge_teacher(teacher_model)

    # ------------------------------------------------------------------ engine hooks
    def on_epoch_start(self, epoch: int, max_epoch: int) -> None:
        g = self.gcfg
        self.masker.set_total_epochs(max_epoch)
        self.ema_decay = ramp_decay(epoch, g.ema_decay_start, g.ema_decay_end, g.ema_ramp_epochs)
        self._stats, self._n_stats = {}, 0
        self._n_sel = self.masker.num_selected(epoch, self.student.num_group)

    def current_ema_decay(self) -> float:
        """The decay of the next EMA update: the epoch's ramp value, capped by the warm-up if on."""
        if not self.gcfg.ema_warmup:
            return self.ema_decay
        return warmup_decay(self.ema_decay, int(self.ema_num_updates))

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update of every float parameter and buffer; integer buffers are copied, and so are the
        BatchNorm running statistics with ``ema_bn: copy``."""
        decay = self.current_ema_decay()
        copy_bn = self.gcfg.ema_bn == "copy"
        avg_t, cur_t = [], []
        for (name, s), (_, e) in zip(self._student_tensors(), self.ema._student_tensors()):
            if copy_bn and name.endswith(("running_mean", "running_var")):
                e.copy_(s)
            else:
                avg_t.append(e)
                cur_t.append(s.detach())
        ema_update_(avg_t, cur_t, decay)  # the model-EMA rule (models/ema.py): lerp floats, copy integers
        if self.gcfg.ema_warmup:
            self.ema_num_updates += 1

    def _student_tensors(self):
        """(name, tensor) of the student's parameters and buffers, excluding both teachers."""
        skip = ("ema.", "knowledge_teacher.", "ema_num_updates")
        for name, t in self.state_dict(keep_vars=True).items():
            if not name.startswith(skip):
                yield name, t

    def extra_metrics(self) -> dict[str, float]:
        out = {k: float(v) / max(self._n_stats, 1) for k, v in self._stats.items()}
        out["n_sel"] = float(self._n_sel)
        out["ema_decay"] = float(self.current_ema_decay())
        return out

    # ------------------------------------------------------------------ forward pieces
    def gc_scores_all(self, tokens: torch.Tensor, groups) -> torch.Tensor:
        """GC scores of a complete cloud (no mask tokens): (B, G, C) mask-scale tokens -> (B, G)."""
        x = self.MAE_decoder_loss_pred(tokens, self.student.decoder_positions(groups))
        return self.increase_dim_2(x)

    @torch.no_grad()
    def teacher_scores(self, groups) -> torch.Tensor:
        """The EMA teacher's GC score per mask-scale patch of the complete cloud, (B, G)."""
        t, scorer = self.ema, self.gcfg.gc_scorer
        if scorer == "content":
            return at_least_float32(t.gc_content(self.student.mask_scale_patches(groups)))
        if scorer == "position":
            return at_least_float32(t.gc_position(self.student.mask_centers(groups)))
        if scorer == "oracle":
            return self.oracle_scores(groups)
        return at_least_float32(t.gc_scores_all(t.student.mask_scale_tokens(t.student.encode(groups)), groups))

    @torch.no_grad()
    def mean_target(self, groups, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The GC target (:meth:`per_patch_terms`) of every mask-scale patch, averaged over the masks
        (S, B, G) that hide it, in the model's current mode: ``target`` (B, G), 0 where no mask hides the
        patch, and ``count`` (B, G), how many masks hide it."""
        total = torch.zeros(masks.shape[1:], dtype=torch.float64, device=masks.device)
        dtype = torch.float32
        for mask in masks:
            target = self.per_patch_terms(groups, mask, self.student.encode(groups, mask))[3]
            total[mask] += target.reshape(-1).double()
            dtype = at_least_float32(target).dtype      # float32, or float64 in a float64 model
        count = masks.double().sum(0)
        return (total / count.clamp_min(1)).to(dtype), count

    @torch.no_grad()
    def oracle_scores(self, groups, generator: torch.Generator | None = None) -> torch.Tensor:
        """The student's own GC target for every patch, (B, G): the patches of each sample are split by a
        random permutation into ``ceil(G / M)`` masks of the training count ``M`` (the last one wraps
        around), the student (in eval mode) reconstructs each, and a patch's score is its mean target."""
        centers = self.student.mask_centers(groups)
        B, G = centers.shape[:2]
        M = self.masker.num_masked(G)
        perm = torch.rand(B, G, generator=generator, device=centers.device).argsort(1)
        masks = torch.zeros(-(-G // M), B, G, dtype=torch.bool, device=centers.device)
        for k, mask in enumerate(masks):
            mask.scatter_(1, perm[:, (k * M + torch.arange(M, device=centers.device)) % G], True)
        was_training = self.student.training
        self.student.train(False)
        try:
            return self.mean_target(groups, masks)[0]
        finally:
            self.student.train(was_training)

    def student_scores(self, groups, mask: torch.Tensor, encoded) -> torch.Tensor | None:
        """The student's GC scores at the masked patches, (B, M) in increasing masked-patch index (None for
        the oracle, which learns nothing). The decoder scores mask tokens; the content and position
        scorers see the masked patches' own points or centres (data, so no gradient reaches the student)."""
        scorer = self.gcfg.gc_scorer
        if scorer == "oracle":
            return None
        B, M = mask.shape[0], int(mask[0].sum())
        if scorer == "content":
            patches = self.student.mask_scale_patches(groups)
            return self.gc_content(patches[mask].view(B, M, *patches.shape[2:]))
        if scorer == "position":
            return self.gc_position(self.student.mask_centers(groups)[mask].view(B, M, -1))
        x_vis = self.student.mask_scale_tokens(encoded)
        B, n_vis, C = x_vis.shape
        M = mask.shape[1] - n_vis
        x = torch.cat([x_vis, self.mask_token_loss_pred.to(x_vis.dtype).expand(B, M, C)], 1)
        tokens = self.MAE_decoder_loss_pred(x, self.student.decoder_positions(groups, mask))
        return self.increase_dim_2(tokens)[:, -M:]

    def _check_teacher(self) -> None:
        kt = self.knowledge_teacher
        if kt is not None and not kt.loaded:
            raise CheckpointError(
                "the knowledge teacher has no weights: build the model with tools.engine.builders.build_model_from_cfg "
                "(it loads model.gm3d.teacher_ckpt) or load a checkpoint that holds knowledge_teacher.* keys")

    def per_patch_terms(self, groups, mask: torch.Tensor, encoded):
        """The student's per-masked-patch losses for ``groups`` under ``mask`` (B, G).

        Returns ``f_hat`` (B, M, C) decoded mask tokens, ``l_p`` (B, M) point term, ``l_f`` (B, M)
        feature-KD term (None for variant A) and ``gc_target`` (B, M), the detached error that the GC
        scorer learns to rank (official: ``l_p`` for variant A, ``l_p + l_f`` for B and C; see
        :meth:`gc_target`).
        """
        g = self.gcfg
        self._check_teacher()
        B, M = mask.shape[0], int(mask[0].sum())
        if g.variant == "B":  # the point term comes from the knowledge teacher's head: no student point head
            f_hat = self.student.decode_masked(groups, mask, encoded)
            with torch.no_grad():
                f_full = self.knowledge_teacher.encode_full(groups)
                f_t = f_full[mask].view(B, M, -1)
                l_p = self.knowledge_teacher.point_head_loss(groups, mask, f_hat.detach(), f_full,
                                                             self.student.loss_fn)
        else:
            f_hat, l_p = self.student.reconstruct_masked(groups, mask, encoded)
            if g.variant == "A":
                return f_hat, l_p, None, self.gc_target(groups, mask, l_p, None)
            with torch.no_grad():
                f_t = self.knowledge_teacher.encode_full(groups)[mask].view(B, M, -1)
        l_f = normalized_mse(f_hat, f_t)                                                      # (B, M)
        return f_hat, l_p, l_f, self.gc_target(groups, mask, l_p, l_f)

    @torch.no_grad()
    def gc_target(self, groups, mask: torch.Tensor, l_p: torch.Tensor, l_f: torch.Tensor | None,
                  epoch: int | None = None) -> torch.Tensor:
        """The detached per-masked-patch error (B, M) that the GC scorer ranks (``gc_target`` and
        ``gc_chamfer_norm`` options; the defaults give the official ``l_p (+ l_f)``)."""
        g = self.gcfg
        l_p = at_least_float32(l_p.detach())
        if g.gc_chamfer_norm:
            patches = self.student.mask_scale_patches(groups)
            B, M = l_p.shape
            size = at_least_float32(patches[mask].view(B, M, -1, 3)).pow(2).sum(-1).mean(-1)
            l_p = l_p / (size + 1e-8)
        if l_f is None:
            return _zscore_rows(l_p) if g.gc_target == "zscore" else l_p
        l_f = at_least_float32(l_f.detach())
        if g.gc_target == "zscore":
            return _zscore_rows(l_p) + _zscore_rows(l_f)
        if g.gc_target == "weighted":
            w_point, w_feat, _ = self.loss_weights(self._epoch if epoch is None else epoch)
            return w_point * l_p + w_feat * l_f
        return l_f + l_p

    def loss_weights(self, epoch: int) -> tuple[float, float, float]:
        g = self.gcfg
        if epoch < g.weight_warmup_epochs:
            return 1.0, 1.0, g.lambda_gc
        return g.lambda_point, g.lambda_feat, g.lambda_gc

    def masked_view(self, groups, *, epoch: int, generator: torch.Generator | None = None, need_scores=None):
        """The teacher's scores (or None) and the GM3D mask for ``groups`` at ``epoch``."""
        centers = self.student.mask_centers(groups)
        n_sel = self.masker.num_selected(epoch, centers.shape[1])
        want = (n_sel > 0 or self.training) if need_scores is None else need_scores
        scores = self.teacher_scores(groups) if want else None
        mask = self.masker(centers, generator=generator, epoch=epoch, scores=scores)
        return scores, mask

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor, *, epoch: int = 0,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        points = batch["points"] if isinstance(batch, dict) else batch
        self._epoch = epoch
        groups = self.student.group(points)
        scores, mask = self.masked_view(groups, epoch=epoch, generator=generator)
        M = int(mask[0].sum())
        encoded = self.student.encode(groups, mask)
        _, l_p, l_f, gc_target = self.per_patch_terms(groups, mask, encoded)
        g_hat = self.student_scores(groups, mask, encoded)                                     # (B, M)
        w_point, w_feat, w_gc = self.loss_weights(epoch)
        loss_point = l_p.mean()
        if g_hat is None:  # the oracle learns no scorer
            l_gc = loss_point.new_zeros(())
            loss = w_point * loss_point
        else:
            l_gc = gc_ranking_loss(at_least_float32(g_hat), gc_target)
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
        rho = spearman_per_row(t_masked, gc_target).mean().detach().double()  # no host read per step
        self._stats["gc_rank_corr"] = self._stats.get("gc_rank_corr", 0.0) + rho
        self._n_stats += 1


@MODELS.register("PointMAE_GM3D", "Point_MAE_GM3D")
class PointMAEGM3D(GM3D):
    """Point-MAE + GeoMask3D: :class:`GM3D` over :class:`~models.point_mae.PointMAE` (same arguments,
    plus ``gm3d`` and an optional pre-built ``knowledge_teacher``)."""

    ARCH = "point_mae"

    def __init__(self, group_size: int = 32, num_group: int = 64, loss: Literal["cdl1", "cdl2"] = "cdl2",
                 transformer_config: dict | None = None, embed_visible_only: bool = False,
                 mask: dict | None = None, gm3d: dict | None = None,
                 knowledge_teacher: EncoderTeacher | None = None):
        tc = {k: v for k, v in (transformer_config or {}).items() if k != "mask_type"}
        student_mask = {k: v for k, v in (mask or {}).items() if k in ("ratio", "count")}
        student = PointMAE(group_size, num_group, loss, tc, embed_visible_only, mask=student_mask)
        super().__init__(student, mask=mask, gm3d=gm3d, knowledge_teacher=knowledge_teacher,
                         transformer_config=transformer_config)

    def official_init(self) -> None:
        """The official GM3D code applies no init to its encoder (PyTorch defaults) and starts the mask
        tokens at zero; the reconstruction and GC decoders keep xavier."""
        for m in self.MAE_encoder.modules():
            if m is not self.MAE_encoder and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.zeros_(self.mask_token)
        if hasattr(self, "mask_token_loss_pred"):
            nn.init.zeros_(self.mask_token_loss_pred)
