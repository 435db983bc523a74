"""Point-M2AE fine-tuning classifiers: the official ``Point_M2AE_ModelNet40`` / ``Point_M2AE_ScanObjectNN``.

``state_dict`` keys are the official fine-tune models' (docs/M2AE.md), so released fine-tuned files load
strictly and pre-trained encoders map onto them through :class:`models.adapters.PointM2AEAdapter`::

    h_encoder.{token_embed,encoder_pos_embeds,encoder_blocks}.*   the hierarchical encoder, no encoder_norms
    norm.*                                                        LayerNorm on the last stage's tokens
    cls_head_finetune.{0,1,4,5,8}.*                               Linear(F->256) BN ReLU Dropout(0.5)
                                                                  Linear(256->256) BN ReLU Dropout(0.5)
                                                                  Linear(256->cls_dim)

Forward: multi-scale grouping -> every token of every scale encoded, with the local-attention radii ->
``norm`` -> pooled feature -> head. ModelNet40 pools ``mean + max`` (F = C) and trains with the official
label-smoothing loss (``smooth`` 0.3); ScanObjectNN pools ``concat(mean, max)`` (F = 2C) with plain
cross-entropy. The official ScanObjectNN max skips the first token (a leftover of a cls-token design;
M2AE has none): ``official_max_skip: true`` reproduces it, the default pools over every token.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Classifier, layers_by_prefix
from models.build import MODELS
from models.layers import at_least_float32
from models.point_m2ae import HierarchicalEncoder, M2AEConfig, group_multiscale
from utils.errors import ConfigError

__all__ = ["PointM2AEClassifier", "PointM2AEModelNet40", "PointM2AEScanObjectNN", "smooth_ce"]


def smooth_ce(logits: torch.Tensor, label: torch.Tensor, eps: float) -> torch.Tensor:
    """Official M2AE smoothed cross-entropy: target ``1 - eps`` on the label and ``eps / (n - 1)`` on
    each other class (not torch's ``label_smoothing``, which spreads ``eps / n`` over all classes)."""
    n = logits.shape[1]
    one_hot = torch.zeros_like(logits).scatter_(1, label.view(-1, 1), 1.0)
    target = one_hot * (1 - eps) + (1 - one_hot) * eps / max(n - 1, 1)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


class PointM2AEClassifier(Classifier):
    """Point-M2AE classification model (official config keys).

    Args:
        group_sizes, num_groups, encoder_depths, encoder_dims, local_radius, num_heads, drop_path_rate:
            the encoder (:class:`~models.point_m2ae.M2AEConfig`).
        cls_dim: classes (official: 40 ModelNet40, 15 ScanObjectNN, hard-coded there).
        pooling: ``sum`` (mean + max, ModelNet40) or ``concat`` (concat(mean, max), ScanObjectNN).
        smooth: label smoothing of the official smoothed CE (0 = plain cross-entropy).
        official_max_skip: with ``concat`` pooling, skip the first token in the max as the official code.
        mask_ratio, decoder_depths, decoder_dims, decoder_up_blocks: accepted and ignored (pre-training
            keys that official configs copy into fine-tuning model blocks).
    """

    ARCH = "point_m2ae"

    def __init__(self, group_sizes: list[int] | None = None, num_groups: list[int] | None = None,
                 encoder_depths: list[int] | None = None, encoder_dims: list[int] | None = None,
                 local_radius: list[float] | None = None, num_heads: int = 6, drop_path_rate: float = 0.1,
                 cls_dim: int = 40, pooling: Literal["sum", "concat"] = "sum", smooth: float = 0.0,
                 official_max_skip: bool = False, mask_ratio: float | None = None,
                 decoder_depths: list[int] | None = None, decoder_dims: list[int] | None = None,
                 decoder_up_blocks: list[int] | None = None):
        super().__init__()
        cfg = M2AEConfig.from_args(decoder=False, group_sizes=group_sizes, num_groups=num_groups,
                                   encoder_depths=encoder_depths, encoder_dims=encoder_dims,
                                   local_radius=local_radius, num_heads=num_heads, drop_path_rate=drop_path_rate)
        if cls_dim < 1:
            raise ConfigError(f"{type(self).__name__}: cls_dim must be >= 1, got {cls_dim}")
        if pooling not in ("sum", "concat"):
            raise ConfigError(f"{type(self).__name__}: pooling must be 'sum' or 'concat', got {pooling!r}")
        if not 0.0 <= smooth < 1.0:
            raise ConfigError(f"{type(self).__name__}: smooth must be in [0, 1), got {smooth}")
        self.cfg, self.cls_dim, self.pooling, self.smooth = cfg, cls_dim, pooling, float(smooth)
        self.official_max_skip = bool(official_max_skip)
        enc = {k: v for k, v in asdict(cfg).items() if not k.startswith("decoder") and k != "mask_ratio"}
        self.config = {**enc, "cls_dim": cls_dim, "pooling": pooling, "smooth": smooth,
                       "official_max_skip": official_max_skip}
        self.num_group = cfg.num_groups[-1]
        C = cfg.encoder_dims[-1]
        self.h_encoder = HierarchicalEncoder(cfg, with_norms=False)
        self.norm = nn.LayerNorm(C)
        feat = C if pooling == "sum" else 2 * C
        self.cls_head_finetune = nn.Sequential(
            nn.Linear(feat, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, cls_dim))

    # ------------------------------------------------------------------ pieces
    def tokens(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) -> (B, G_top, C) normalised coarsest-scale tokens (every token, radii on)."""
        groups = group_multiscale(points, self.cfg.num_groups, self.cfg.group_sizes)
        return self.norm(self.h_encoder(groups, None, local_attention=True)[0][-1])

    def features(self, points: torch.Tensor) -> torch.Tensor:
        x = self.tokens(points)
        if self.pooling == "sum":
            return x.mean(1) + x.amax(1)
        return torch.cat([x.mean(1), (x[:, 1:] if self.official_max_skip else x).amax(1)], -1)

    def logits(self, points: torch.Tensor) -> torch.Tensor:
        return self.cls_head_finetune(self.features(points))

    def lr_layers(self) -> tuple[int, dict[str, int]]:
        """Layer-wise lr decay: the encoder's blocks counted over its stages, then ``norm`` and the head."""
        depth, rules = self.h_encoder.lr_rules("h_encoder.")
        return depth, layers_by_prefix(self, rules + [("norm", depth), ("cls_head_finetune", depth)])

    @torch.no_grad()
    def extract_features(self, points: torch.Tensor) -> torch.Tensor:
        """Linear-SVM feature of the (fine-tuned) encoder: mean + max of the coarsest tokens."""
        x = self.tokens(points)
        return x.mean(1) + x.amax(1)

    def loss_acc(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Official ``get_loss_acc``: smoothed CE (ModelNet40) or CE, and accuracy in percent."""
        label = label.reshape(-1).long()
        logits = at_least_float32(logits)
        loss = smooth_ce(logits, label, self.smooth) if self.smooth > 0 else F.cross_entropy(logits, label)
        acc = (logits.argmax(-1) == label).float().mean() * 100.0
        return loss, acc.detach()


@MODELS.register("Point_M2AE_ModelNet40", "PointM2AE_ModelNet40")
class PointM2AEModelNet40(PointM2AEClassifier):
    """Official ``Point_M2AE_ModelNet40``: mean + max pooling, smoothed CE (smooth 0.3), 40 classes."""

    def __init__(self, cls_dim: int = 40, pooling: Literal["sum", "concat"] = "sum", smooth: float = 0.3, **kw):
        super().__init__(cls_dim=cls_dim, pooling=pooling, smooth=smooth, **kw)


@MODELS.register("Point_M2AE_ScanObjectNN", "PointM2AE_ScanObjectNN")
class PointM2AEScanObjectNN(PointM2AEClassifier):
    """Official ``Point_M2AE_ScanObjectNN``: concat(mean, max) pooling, plain CE, 15 classes."""

    def __init__(self, cls_dim: int = 15, pooling: Literal["sum", "concat"] = "concat", smooth: float = 0.0, **kw):
        super().__init__(cls_dim=cls_dim, pooling=pooling, smooth=smooth, **kw)


def _with_defaults(cls, **defaults):
    """Give ``cls`` the parent's full signature with ``defaults`` (so config keys are checked by name)."""
    sig = inspect.signature(PointM2AEClassifier)
    cls.__signature__ = sig.replace(parameters=[p.replace(default=defaults.get(n, p.default))
                                                for n, p in sig.parameters.items()])
    return cls


_with_defaults(PointM2AEModelNet40, cls_dim=40, pooling="sum", smooth=0.3)
_with_defaults(PointM2AEScanObjectNN, cls_dim=15, pooling="concat", smooth=0.0)
