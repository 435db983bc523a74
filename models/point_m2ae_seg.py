"""Point-M2AE part segmentation: the official ``segmentation/Point_M2AE_SEG.py`` model (docs/SEGMENTATION.md).

``state_dict`` keys are the official ones (``group_dividers`` hold no parameters), so a pre-trained
Point-M2AE encoder (official ``pre-train.pth``, this project's Point-M2AE and GM3D runs) maps onto it through
:class:`models.adapters.PointM2AEAdapter`, ``encoder_norms`` included, and official seg checkpoints load
strictly::

    h_encoder.{token_embed,encoder_pos_embeds,encoder_blocks}.*   the hierarchical encoder (docs/M2AE.md)
    h_encoder.encoder_norms.{s}.*                                 one LayerNorm per stage, kept and applied
    label_conv.{0,1}.*                                            Conv1d(16->64, no bias) BN LeakyReLU(0.2)
    propagations.{s}.mlp_convs.{0,1}.* / mlp_bns.{0,1}.*          per stage: [xyz ; C_s] -> 1536 -> 1024
    convs1, bns1, convs2, bns2, convs3, bns3, convs4              Conv-BN-ReLU-Dropout(0.5), Conv-BN-ReLU,
                                                                  Conv-BN-ReLU, Conv -> part logits

Forward: multi-scale grouping (scale 0 groups the points, scale s > 0 the centres of scale s-1) -> every
token of every scale encoded with the local-attention radii -> each stage's tokens through its own
``encoder_norms[s]``. Each stage's features are propagated from that stage's centres to every point (three
nearest centres, the point's xyz as skip) and the three results concatenated (3 x 1024 = 3072 per point).
Global feature: max + mean over the points of that concatenation (summed, not concatenated) and the
category embedding (64). The head reads ``[global (3072 + 64) ; per-point (3072)]`` (6208 channels; the
global part comes first, unlike the Point-MAE head). The official model returns log-softmax for an NLL
loss; here the logits feed a cross-entropy (the same loss). Initialisation: the encoder's truncated
normal as in the official encoder, PyTorch defaults for the head (the official model applies no init).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from models.base import SegmentationModel
from models.build import MODELS
from models.point_m2ae import HierarchicalEncoder, M2AEConfig, group_multiscale
from models.seg_common import FeaturePropagation, category_one_hot
from utils.errors import ConfigError, DataError

__all__ = ["PointM2AESegmentation"]


@MODELS.register("Point_M2AE_Seg", "PointM2AE_Seg", "Point_M2AE_SEG")
class PointM2AESegmentation(SegmentationModel):
    """Point-M2AE part-segmentation model (official defaults: [16, 8, 8] x [512, 256, 64], widths
    [96, 192, 384], 50 parts).

    Args:
        group_sizes, num_groups, encoder_depths, encoder_dims, local_radius, num_heads, drop_path_rate:
            the encoder (:class:`~models.point_m2ae.M2AEConfig`).
        num_parts: part classes predicted (50 for ShapeNetPart).
        num_categories: object categories of the one-hot label (16 for ShapeNetPart).
        label_dim: width of the category embedding.
        fp_mlp: widths of each stage's feature propagation; null = ``[4 C_top, 1024]`` (official
            ``[1536, 1024]``).
        head_dims: widths of convs1 / convs2 / convs3 (official 1024, 512, 256).
        dropout: dropout after the first head layer.
        mask_ratio, decoder_depths, decoder_dims, decoder_up_blocks: accepted and ignored (pre-training
            keys that configs copy into fine-tuning model blocks).
    """

    ARCH = "point_m2ae"

    def __init__(self, group_sizes: list[int] | None = None, num_groups: list[int] | None = None,
                 encoder_depths: list[int] | None = None, encoder_dims: list[int] | None = None,
                 local_radius: list[float] | None = None, num_heads: int = 6, drop_path_rate: float = 0.1,
                 num_parts: int = 50, num_categories: int = 16, label_dim: int = 64,
                 fp_mlp: Sequence[int] | None = None, head_dims: Sequence[int] = (1024, 512, 256),
                 dropout: float = 0.5, mask_ratio: float | None = None,
                 decoder_depths: list[int] | None = None, decoder_dims: list[int] | None = None,
                 decoder_up_blocks: list[int] | None = None):
        super().__init__()
        cfg = M2AEConfig.from_args("Point_M2AE_Seg", decoder=False, group_sizes=group_sizes, num_groups=num_groups,
                                   encoder_depths=encoder_depths, encoder_dims=encoder_dims,
                                   local_radius=local_radius, num_heads=num_heads, drop_path_rate=drop_path_rate)
        if num_parts < 1 or num_categories < 1:
            raise ConfigError(f"Point_M2AE_Seg: num_parts ({num_parts}) and num_categories ({num_categories}) "
                              f"must be >= 1")
        if len(head_dims) != 3:
            raise ConfigError(f"Point_M2AE_Seg: head_dims must have 3 widths (convs1, convs2, convs3), "
                              f"got {list(head_dims)}")
        fp = [4 * cfg.encoder_dims[-1], 1024] if fp_mlp is None else [int(w) for w in fp_mlp]
        if not fp:
            raise ConfigError("Point_M2AE_Seg: fp_mlp needs at least one width")
        self.cfg, self.num_parts, self.num_categories = cfg, num_parts, num_categories
        enc = {k: v for k, v in asdict(cfg).items() if not k.startswith("decoder") and k != "mask_ratio"}
        self.config = {**enc, "num_parts": num_parts, "num_categories": num_categories, "label_dim": label_dim,
                       "fp_mlp": fp, "head_dims": [int(h) for h in head_dims], "dropout": dropout}
        self.h_encoder = HierarchicalEncoder(cfg, with_norms=True)
        self.label_conv = nn.Sequential(nn.Conv1d(num_categories, label_dim, 1, bias=False),
                                        nn.BatchNorm1d(label_dim), nn.LeakyReLU(0.2))
        self.propagations = nn.ModuleList(FeaturePropagation(3 + d, fp) for d in cfg.encoder_dims)
        feat = sum(p.out_channels for p in self.propagations)
        h1, h2, h3 = (int(h) for h in head_dims)
        self.convs1 = nn.Conv1d(2 * feat + label_dim, h1, 1)
        self.dp1 = nn.Dropout(dropout)
        self.convs2 = nn.Conv1d(h1, h2, 1)
        self.convs3 = nn.Conv1d(h2, h3, 1)
        self.convs4 = nn.Conv1d(h3, num_parts, 1)
        self.bns1 = nn.BatchNorm1d(h1)
        self.bns2 = nn.BatchNorm1d(h2)
        self.bns3 = nn.BatchNorm1d(h3)

    def _check_points(self, points: torch.Tensor) -> None:
        if points.dim() != 3 or points.shape[-1] != 3:
            raise DataError(f"Point_M2AE_Seg: expected (B, N, 3) points, got {tuple(points.shape)}")
        need = max(self.cfg.num_groups[0], self.cfg.group_sizes[0])
        if points.shape[1] < need:
            raise DataError(f"Point_M2AE_Seg: clouds have {points.shape[1]} points, fewer than num_groups[0]="
                            f"{self.cfg.num_groups[0]} / group_sizes[0]={self.cfg.group_sizes[0]}")

    def stage_features(self, points: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, N, 3) -> per stage (finest first) the centres (B, G_s, 3) and the normalised tokens (B, G_s, C_s)."""
        groups = group_multiscale(points, self.cfg.num_groups, self.cfg.group_sizes)
        tokens = self.h_encoder(groups, None, local_attention=True)[0]
        return [g.center for g in groups], tokens

    def seg_logits(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) points, (B,) categories -> (B, N, num_parts) part logits."""
        self._check_points(points)
        B, N, _ = points.shape
        onehot = category_one_hot(category.to(points.device), self.num_categories, points.dtype)
        centers, tokens = self.stage_features(points)
        per_point = torch.cat([prop(points, c, points, t) for prop, c, t in zip(self.propagations, centers, tokens)],
                              dim=1)                                              # (B, 3 fp, N)
        pooled = per_point.amax(2) + per_point.mean(2)
        glob = torch.cat([pooled, self.label_conv(onehot.unsqueeze(-1)).squeeze(-1)], dim=-1)
        x = torch.cat([glob.unsqueeze(-1).expand(B, glob.shape[1], N), per_point], dim=1)
        x = self.dp1(F.relu(self.bns1(self.convs1(x))))
        x = F.relu(self.bns2(self.convs2(x)))
        x = F.relu(self.bns3(self.convs3(x)))
        return self.convs4(x).transpose(1, 2)
