"""Point-MAE part segmentation: the official ``segmentation/models/pt.py`` model (docs/SEGMENTATION.md).

``state_dict`` keys are the official ones, so a pre-trained Point-MAE encoder (official ``pretrain.pth``,
this project's Point-MAE and GM3D runs) maps onto it through :class:`models.adapters.PointMAEAdapter`
and the official seg checkpoints load strictly::

    encoder.{first_conv,second_conv}.{0,1,3}.*     mini-PointNet patch embedding
    pos_embed.{0,2}.*                               Linear(3->128) GELU Linear(128->C)
    blocks.blocks.{i}.*                             depth blocks, positions re-added before each
    norm.*                                          LayerNorm applied to each fetched block output
    label_conv.{0,1}.*                              Conv1d(16->64, no bias) BN LeakyReLU(0.2)
    propagation_0.mlp_convs.{0,1}.* / mlp_bns.{0,1}.*   feature propagation, [xyz ; 3C] -> 4C -> 1024
    convs1, bns1, convs2, bns2, convs3              head: Conv-BN-ReLU-Dropout(0.5), Conv-BN-ReLU, Conv

Forward: group into ``num_group`` patches of ``group_size`` -> embed -> blocks; the outputs of blocks
``fetch_layers`` (3, 7, 11, 0-based) each through the final LayerNorm, concatenated (3C per patch).
Global feature: max and mean over the patches (3C each) and the category embedding (64), broadcast to
every point. Per-point feature: the 3C patch features propagated from the patch centres to every point
(three nearest centres), with the point's xyz as skip. ``[per-point ; global]`` -> head -> part logits.
The official model returns log-softmax for an NLL loss; here the logits feed a cross-entropy (the same
loss). Initialisation: the PyTorch defaults, as the official model (it applies no custom init).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from extensions import group
from models.base import SegmentationModel
from models.build import MODELS
from models.layers import PatchEmbed, PosEmbed, TransformerEncoder
from models.seg_common import FeaturePropagation, category_one_hot
from utils.errors import ConfigError, DataError

__all__ = ["PointMAESegmentation"]


@MODELS.register("PointMAE_Seg", "Point_MAE_Seg", "pt")
class PointMAESegmentation(SegmentationModel):
    """Point-MAE part-segmentation model (official defaults: 384 x 12, 128 patches of 32, 50 parts).

    Args:
        trans_dim: token width C.
        depth: transformer blocks.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        num_heads: attention heads.
        group_size: points per patch.
        num_group: patches per cloud.
        encoder_dims: patch-embedding width (must equal trans_dim).
        num_parts: part classes predicted (50 for ShapeNetPart).
        num_categories: object categories of the one-hot label (16 for ShapeNetPart).
        fetch_layers: 0-based blocks whose outputs feed the head.
        label_dim: width of the category embedding.
        fp_mlp: widths of the feature propagation; null = ``[4 C, 1024]`` (official).
        head_dims: widths of convs1 / convs2 (official 512, 256).
        dropout: dropout after the first head layer.
    """

    ARCH = "point_mae"

    def __init__(self, trans_dim: int = 384, depth: int = 12, drop_path_rate: float = 0.1, num_heads: int = 6,
                 group_size: int = 32, num_group: int = 128, encoder_dims: int = 384, num_parts: int = 50,
                 num_categories: int = 16, fetch_layers: Sequence[int] = (3, 7, 11), label_dim: int = 64,
                 fp_mlp: Sequence[int] | None = None, head_dims: Sequence[int] = (512, 256), dropout: float = 0.5):
        super().__init__()
        if encoder_dims != trans_dim:
            raise ConfigError(f"PointMAE_Seg: encoder_dims ({encoder_dims}) must equal trans_dim ({trans_dim})")
        fetch = tuple(int(i) for i in fetch_layers)
        if not fetch or sorted(set(fetch)) != list(fetch) or fetch[0] < 0 or fetch[-1] >= depth:
            raise ConfigError(f"PointMAE_Seg: fetch_layers must be increasing block indices in 0..{depth - 1}, "
                              f"got {list(fetch_layers)}")
        if num_parts < 1 or num_categories < 1:
            raise ConfigError(f"PointMAE_Seg: num_parts ({num_parts}) and num_categories ({num_categories}) "
                              f"must be >= 1")
        if len(head_dims) != 2:
            raise ConfigError(f"PointMAE_Seg: head_dims must have 2 widths (convs1, convs2), got {list(head_dims)}")
        fp = [4 * trans_dim, 1024] if fp_mlp is None else [int(w) for w in fp_mlp]
        self.trans_dim, self.num_parts, self.num_categories = trans_dim, num_parts, num_categories
        self.group_size, self.num_group, self.fetch_layers = group_size, num_group, fetch
        feat = len(fetch) * trans_dim
        self.encoder = PatchEmbed(encoder_dims)
        self.pos_embed = PosEmbed(trans_dim)
        self.blocks = TransformerEncoder(trans_dim, depth, num_heads, drop_path_rate)
        self.norm = nn.LayerNorm(trans_dim)
        self.label_conv = nn.Sequential(nn.Conv1d(num_categories, label_dim, 1, bias=False),
                                        nn.BatchNorm1d(label_dim), nn.LeakyReLU(0.2))
        self.propagation_0 = FeaturePropagation(3 + feat, fp)
        h1, h2 = int(head_dims[0]), int(head_dims[1])
        self.convs1 = nn.Conv1d(self.propagation_0.out_channels + 2 * feat + label_dim, h1, 1)
        self.dp1 = nn.Dropout(dropout)
        self.convs2 = nn.Conv1d(h1, h2, 1)
        self.convs3 = nn.Conv1d(h2, num_parts, 1)
        self.bns1 = nn.BatchNorm1d(h1)
        self.bns2 = nn.BatchNorm1d(h2)

    def _check_points(self, points: torch.Tensor) -> None:
        if points.dim() != 3 or points.shape[-1] != 3:
            raise DataError(f"PointMAE_Seg: expected (B, N, 3) points, got {tuple(points.shape)}")
        if points.shape[1] < max(self.num_group, self.group_size):
            raise DataError(f"PointMAE_Seg: clouds have {points.shape[1]} points, fewer than num_group="
                            f"{self.num_group} / group_size={self.group_size}")

    def patch_features(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 3) -> patch centres (B, G, 3) and the normalised fetched block outputs (B, G, L*C)."""
        p = group(points, self.num_group, self.group_size)
        x = self.encoder(p.neighborhood)
        outs = self.blocks(x, self.pos_embed(p.center), return_layers=self.fetch_layers)
        return p.center, torch.cat([self.norm(o) for o in outs], dim=-1)

    def seg_logits(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) points, (B,) categories -> (B, N, num_parts) part logits."""
        self._check_points(points)
        B, N, _ = points.shape
        onehot = category_one_hot(category.to(points.device), self.num_categories, points.dtype)
        center, f = self.patch_features(points)
        glob = torch.cat([f.amax(1), f.mean(1), self.label_conv(onehot.unsqueeze(-1)).squeeze(-1)], dim=-1)
        per_point = self.propagation_0(points, center, points, f)                 # (B, fp, N)
        x = torch.cat([per_point, glob.unsqueeze(-1).expand(B, glob.shape[1], N)], dim=1)
        x = self.dp1(F.relu(self.bns1(self.convs1(x))))
        x = F.relu(self.bns2(self.convs2(x)))
        return self.convs3(x).transpose(1, 2)
