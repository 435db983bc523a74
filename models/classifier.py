"""Point-MAE fine-tuning classifier: the official ``PointTransformer`` (docs/METHOD.md, section 6.2; keys in section 7.1).

``state_dict`` keys are exactly the official fine-tune model's, so released fine-tuned checkpoints
(``modelnet_1k.pth``, ``scan_*.pth``) load strictly and pre-trained encoders map onto it by renaming
only (:class:`models.adapters.PointMAEAdapter`)::

    cls_token (1, 1, C), cls_pos (1, 1, C)
    encoder.{first_conv,second_conv}.{0,1,3}.*        mini-PointNet patch embedding
    pos_embed.{0,2}.*                                  Linear(3->128) GELU Linear(128->C)
    blocks.blocks.{i}.*                                depth blocks, positions re-added before each
    norm.*                                             final LayerNorm
    cls_head_finetune.{0,1,4,5,8}.*                    Linear(2C->256) BN ReLU Dropout(0.5)
                                                       Linear(256->256) BN ReLU Dropout(0.5) Linear(256->cls_dim)

Forward: group -> embed -> prepend cls token / cls position -> blocks -> LayerNorm ->
``concat(x[:, 0], max(x[:, 1:]))`` (2C) -> head.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from extensions import group
from models.base import Classifier, layers_by_prefix
from models.build import MODELS
from models.layers import PatchEmbed, PosEmbed, TransformerEncoder, at_least_float32
from models.point_mae import _init_trunc_normal
from utils.errors import ConfigError

__all__ = ["PointTransformer"]


@MODELS.register("PointTransformer", "PointMAEClassifier")
class PointTransformer(Classifier):
    """Point-MAE classification model (official flat config keys).

    Args:
        trans_dim: token width C.
        depth: transformer blocks.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        cls_dim: number of classes (the official few-shot config keeps 40 for every episode).
        num_heads: attention heads.
        group_size: points per patch (kNN size).
        num_group: patches per cloud (FPS centres).
        encoder_dims: patch-embedding width (must equal trans_dim, as in every official config).
        label_smoothing: cross-entropy label smoothing (0 = the official plain CE; GM3D's MAE-style
            fine-tuning uses 0.1).
        init: ``trunc_normal`` (Point-MAE's from-scratch init: trunc-normal 0.02 for Linear / Conv1d,
            LayerNorm 1 / 0, cls token and position trunc-normal) or ``pytorch`` (no init call: PyTorch's
            defaults, zero cls token and position, as GM3D's released classifier starts).
    """

    ARCH = "point_mae"

    def __init__(self, trans_dim: int = 384, depth: int = 12, drop_path_rate: float = 0.1, cls_dim: int = 40,
                 num_heads: int = 6, group_size: int = 32, num_group: int = 64, encoder_dims: int = 384,
                 label_smoothing: float = 0.0, init: Literal["trunc_normal", "pytorch"] = "trunc_normal"):
        super().__init__()
        if init not in ("trunc_normal", "pytorch"):
            raise ConfigError(f"PointTransformer: init must be 'trunc_normal' or 'pytorch', got {init!r}")
        if encoder_dims != trans_dim:
            raise ConfigError(f"PointTransformer: encoder_dims ({encoder_dims}) must equal trans_dim ({trans_dim})")
        if cls_dim < 1:
            raise ConfigError(f"PointTransformer: cls_dim must be >= 1, got {cls_dim}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"PointTransformer: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.config = {"trans_dim": trans_dim, "depth": depth, "drop_path_rate": drop_path_rate,
                       "cls_dim": cls_dim, "num_heads": num_heads, "group_size": group_size,
                       "num_group": num_group, "encoder_dims": encoder_dims, "label_smoothing": label_smoothing,
                       "init": init}
        self.trans_dim, self.cls_dim = trans_dim, cls_dim
        self.group_size, self.num_group = group_size, num_group
        self.label_smoothing = label_smoothing
        self.encoder = PatchEmbed(encoder_dims)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, trans_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, trans_dim))
        self.pos_embed = PosEmbed(trans_dim)
        self.blocks = TransformerEncoder(trans_dim, depth, num_heads, drop_path_rate)
        self.norm = nn.LayerNorm(trans_dim)
        self.cls_head_finetune = nn.Sequential(
            nn.Linear(2 * trans_dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, cls_dim))
        if init == "trunc_normal":  # Point-MAE's "from scratch" init
            self.apply(_init_trunc_normal)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.cls_pos, std=0.02)

    # ------------------------------------------------------------------ pieces
    def tokens(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) -> (B, 1 + G, C) normalised tokens, the cls token first."""
        p = group(points, self.num_group, self.group_size)
        x = self.encoder(p.neighborhood)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        pos = torch.cat([self.cls_pos.expand(B, -1, -1), self.pos_embed(p.center)], dim=1)
        return self.norm(self.blocks(x, pos))

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) -> (B, 2C): concat(cls token, max over patch tokens), the official feature."""
        x = self.tokens(points)
        return torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)

    def logits(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) -> (B, cls_dim) class scores (call under ``eval()`` for evaluation)."""
        return self.cls_head_finetune(self.features(points))

    def lr_layers(self) -> tuple[int, dict[str, int]]:
        """Layer-wise lr decay: patch embedding, cls token / position and positional MLP at layer 0,
        block ``j`` at ``j + 1``, the final norm and the head at ``depth``."""
        depth = len(self.blocks.blocks)
        rules = [(p, 0) for p in ("cls_token", "cls_pos", "encoder", "pos_embed")]
        rules += [(f"blocks.blocks.{j}", j + 1) for j in range(depth)] + [("norm", depth), ("cls_head_finetune", depth)]
        return depth, layers_by_prefix(self, rules)

    @torch.no_grad()
    def extract_features(self, points: torch.Tensor) -> torch.Tensor:
        """Linear-SVM feature: mean + max of the patch tokens (docs/METHOD.md, decision 7)."""
        x = self.tokens(points)[:, 1:]
        return x.mean(1) + x.amax(1)

    def loss_acc(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (with label smoothing) and accuracy in percent (official ``get_loss_acc``)."""
        label = label.reshape(-1).long()
        loss = F.cross_entropy(at_least_float32(logits), label, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == label).float().mean() * 100.0
        return loss, acc.detach()
