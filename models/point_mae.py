"""Point-MAE: patch encoder, masked autoencoder pre-training objective.

Module attribute names follow the official ``Point_MAE`` / ``MaskTransformer`` so that ``state_dict``
keys equal the released checkpoints' (``MAE_encoder.blocks.blocks.0.attn.qkv.weight``, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from extensions import Patches, chamfer_l1, chamfer_l2, group
from models.base import EncoderTeacher, MaskedAutoencoder
from models.build import MODELS
from models.layers import PatchEmbed, PosEmbed, TransformerDecoder, TransformerEncoder, at_least_float32
from models.masking import MaskStrategy, build_mask, resolve_mask_config
from utils.errors import ConfigError
from utils.registry import check_kwargs

__all__ = ["TransformerConfig", "PointMAEEncoder", "PointMAE", "PointMAETeacher", "pool_tokens"]


@dataclass
class TransformerConfig:
    """The official ``transformer_config`` block of a Point-MAE model config.

    Args:
        mask_ratio: fraction of patches masked in pre-training (official spelling of ``model.mask.ratio``).
        mask_type: mask strategy name (``rand``/``random``, ``block``, ``gm3d``; official spelling of
            ``model.mask.strategy``).
        trans_dim: token width of the encoder and decoder.
        encoder_dims: output width of the patch embedding (equal to trans_dim in every official config).
        depth: encoder blocks.
        drop_path_rate: stochastic depth of the last encoder / decoder block (linear from 0).
        num_heads: encoder attention heads.
        decoder_depth: reconstruction decoder blocks.
        decoder_num_heads: decoder attention heads.
    """

    mask_ratio: float = 0.6
    mask_type: str = "rand"
    trans_dim: int = 384
    encoder_dims: int = 384
    depth: int = 12
    drop_path_rate: float = 0.1
    num_heads: int = 6
    decoder_depth: int = 4
    decoder_num_heads: int = 6

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "model.transformer_config"):
        d = dict(d or {})
        check_kwargs(cls, d, where)
        return cls(**d)


def _init_trunc_normal(module: nn.Module) -> None:
    """Official encoder init: Linear/Conv1d trunc_normal(0.02) with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _init_xavier(module: nn.Module) -> None:
    """Official decoder init: Linear xavier_uniform with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, G, C) -> (B, C): mean + max over tokens, the linear-SVM feature (docs/METHOD.md, decision 7)."""
    return tokens.mean(1) + tokens.amax(1)


class PointMAEEncoder(nn.Module):
    """Official ``MaskTransformer``: patch embedding + positional MLP + 12 blocks + LayerNorm.

    Args:
        trans_dim: token width.
        encoder_dims: patch-embedding width (must equal trans_dim).
        depth: number of blocks.
        num_heads: attention heads.
        drop_path_rate: stochastic depth of the last block.
        embed_visible_only: embed only the visible patches (saves ~60 % of the mini-PointNet cost at
            mask ratio 0.6; BatchNorm statistics are then taken over visible patches only). False
            reproduces the official "embed all, then select".
    """

    def __init__(self, trans_dim: int = 384, encoder_dims: int = 384, depth: int = 12, num_heads: int = 6,
                 drop_path_rate: float = 0.1, embed_visible_only: bool = True):
        super().__init__()
        if encoder_dims != trans_dim:
            raise ValueError(f"encoder_dims ({encoder_dims}) must equal trans_dim ({trans_dim})")
        self.trans_dim = trans_dim
        self.embed_visible_only = embed_visible_only
        self.encoder = PatchEmbed(encoder_dims)
        self.pos_embed = PosEmbed(trans_dim)
        self.blocks = TransformerEncoder(trans_dim, depth, num_heads, drop_path_rate)
        self.norm = nn.LayerNorm(trans_dim)
        self.apply(_init_trunc_normal)

    def forward(self, neighborhood: torch.Tensor, center: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the visible patches.

        Args:
            neighborhood: (B, G, K, 3) centre-relative patches.
            center: (B, G, 3) patch centres.
            mask: optional (B, G) bool, True = masked (dropped); every row has the same count.

        Returns:
            (B, G_vis, C) normalised tokens of the visible patches, in increasing patch index.
        """
        B, G, K, _ = neighborhood.shape
        if mask is None:
            tokens = self.encoder(neighborhood)
            vis_center = center
        else:
            keep = ~mask
            n_vis = int(keep[0].sum())
            if self.embed_visible_only:
                tokens = self.encoder(neighborhood[keep].view(B, n_vis, K, 3))
            else:
                tokens = self.encoder(neighborhood, keep)  # BN statistics over all G patches
            vis_center = center[keep].view(B, n_vis, 3)
        x = self.blocks(tokens, self.pos_embed(vis_center))
        return self.norm(x)


class PointMAETeacher(EncoderTeacher):
    """Frozen pre-trained Point-MAE encoder (+ its point head, used by GM3D variant B only).

    Keys mirror the official pre-training checkpoint (``MAE_encoder.*``, ``increase_dim.0.*``), so the
    official ``pretrain.pth`` loads into it through the Point-MAE adapter without renaming.
    """

    ARCH = "point_mae"

    def __init__(self, tc: TransformerConfig, group_size: int, with_decoder: bool = False):
        super().__init__()
        self.MAE_encoder = PointMAEEncoder(tc.trans_dim, tc.encoder_dims, tc.depth, tc.num_heads, 0.0,
                                           embed_visible_only=False)
        if with_decoder:  # variant B: the pre-training decoder, as in the official checkpoint
            self.decoder_pos_embed = PosEmbed(tc.trans_dim)
            self.MAE_decoder = TransformerDecoder(tc.trans_dim, tc.decoder_depth, tc.decoder_num_heads, 0.0)
        self.increase_dim = nn.Sequential(nn.Conv1d(tc.trans_dim, 3 * group_size, 1))
        self.token_dim = tc.trans_dim
        self.with_decoder = with_decoder
        self.freeze()

    def encode_full(self, groups: Patches) -> torch.Tensor:
        return self.MAE_encoder(groups.neighborhood, groups.center)

    def point_head_loss(self, groups: Patches, mask: torch.Tensor, f_hat: torch.Tensor, f_full: torch.Tensor,
                        loss_fn) -> torch.Tensor:
        if not self.with_decoder:
            raise ConfigError("the Point-MAE knowledge teacher was built without its decoder "
                              "(build_knowledge_teacher(..., with_decoder=True)), which variant B needs")
        B, M, C = f_hat.shape
        center = groups.center
        head = self.increase_dim
        K = head[0].out_channels // 3
        dtype = head[0].weight.dtype
        # the student's decoded mask tokens through the teacher's decoder, at the masked centres ...
        pos_m = self.decoder_pos_embed(center[mask].view(B, M, 3))
        rec_s = self.MAE_decoder(f_hat.to(dtype), pos_m, M)
        # ... against the teacher's complete-cloud features through the same decoder, at every centre
        G = f_full.shape[1]
        rec_t = self.MAE_decoder(f_full, self.decoder_pos_embed(center), G)[mask].view(B, M, C)
        pred_pts = head(rec_s.transpose(1, 2))
        kt_pts = head(rec_t.transpose(1, 2))
        return loss_fn(at_least_float32(pred_pts.transpose(1, 2).reshape(B * M, K, 3)),
                       at_least_float32(kt_pts.transpose(1, 2).reshape(B * M, K, 3)), reduction="none").view(B, M)


@MODELS.register("PointMAE", "Point_MAE")
class PointMAE(MaskedAutoencoder):
    """Point-MAE pre-training model: mask patches, encode the visible ones, reconstruct the rest.

    Args:
        group_size: points per patch (kNN size).
        num_group: patches per cloud (FPS centres).
        loss: Chamfer flavour for the reconstruction, ``cdl2`` (official default) or ``cdl1``.
        transformer_config: the official nested block, see :class:`TransformerConfig`.
        embed_visible_only: see :class:`PointMAEEncoder`.
        mask: the ``model.mask`` block (:class:`~models.masking.MaskConfig`); the official
            ``transformer_config.mask_ratio`` / ``mask_type`` fill it too.
    """

    ARCH = "point_mae"

    def __init__(self, group_size: int = 32, num_group: int = 64, loss: Literal["cdl1", "cdl2"] = "cdl2",
                 transformer_config: dict | None = None, embed_visible_only: bool = False,
                 mask: dict | None = None):
        super().__init__()
        tc = TransformerConfig.from_dict(transformer_config)
        mcfg = resolve_mask_config(mask, transformer_config)
        tc.mask_ratio, tc.mask_type = mcfg.ratio, mcfg.strategy
        self.config = {"group_size": group_size, "num_group": num_group, "loss": loss,
                       "transformer_config": asdict(tc), "mask": asdict(mcfg)}
        self.group_size, self.num_group, self.tc = group_size, num_group, tc
        self.token_dim = tc.trans_dim
        self.MAE_encoder = PointMAEEncoder(tc.trans_dim, tc.encoder_dims, tc.depth, tc.num_heads,
                                           tc.drop_path_rate, embed_visible_only)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, tc.trans_dim))
        self.decoder_pos_embed = PosEmbed(tc.trans_dim)
        self.MAE_decoder = TransformerDecoder(tc.trans_dim, tc.decoder_depth, tc.decoder_num_heads,
                                              tc.drop_path_rate)
        self.MAE_decoder.apply(_init_xavier)
        self.increase_dim = nn.Sequential(nn.Conv1d(tc.trans_dim, 3 * group_size, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.masker: MaskStrategy = build_mask(mcfg)
        if self.masker.needs_scores:
            raise ConfigError(f"model: mask strategy {mcfg.strategy!r} needs GC scores, which plain Point-MAE "
                              f"does not compute; use model.NAME: Point_MAE_GM3D (GM3D wraps this model)")
        self.loss_fn = chamfer_l2 if loss == "cdl2" else chamfer_l1

    # ------------------------------------------------------------------ pieces
    def group(self, points: torch.Tensor) -> Patches:
        """(B, N, 3) -> Patches with (B, G, K, 3) neighbourhoods and (B, G, 3) centres."""
        return group(points, self.num_group, self.group_size)

    def decode(self, x_vis: torch.Tensor, center: torch.Tensor, mask: torch.Tensor,
               mask_token: torch.Tensor, decoder: nn.Module, return_token_num: int = 0) -> torch.Tensor:
        """[visible tokens ; mask tokens] with the decoder positions -> (B, G, C), visible first.

        ``return_token_num`` > 0 returns only the last that many tokens (B, n, C), the decoded mask
        tokens when it equals the masked count; the decoder then skips the other rows' last block.
        """
        B, n_vis, C = x_vis.shape
        n_mask = mask.shape[1] - n_vis
        pos = self._decoder_pos(center, mask)
        x = torch.cat([x_vis, mask_token.to(x_vis.dtype).expand(B, n_mask, C)], 1)
        return decoder(x, pos, return_token_num)

    def reconstruct(self, decoded_masked: torch.Tensor) -> torch.Tensor:
        """(B, M, C) decoded mask tokens -> (B, M, K, 3) predicted patches."""
        B, M, C = decoded_masked.shape
        pred = self.increase_dim(decoded_masked.transpose(1, 2))        # (B, 3K, M)
        return pred.transpose(1, 2).reshape(B, M, self.group_size, 3)

    @torch.no_grad()
    def extract_features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) complete clouds -> (B, C) mean+max pooled encoder tokens (linear-SVM feature)."""
        p = self.group(points)
        return pool_tokens(self.MAE_encoder(p.neighborhood, p.center))

    # ------------------------------------------------------------------ the backbone contract
    def mask_centers(self, groups: Patches) -> torch.Tensor:
        return groups.center

    def encode(self, groups: Patches, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.MAE_encoder(groups.neighborhood, groups.center, mask)

    def mask_scale_tokens(self, encoded: torch.Tensor) -> torch.Tensor:
        return encoded

    def decoder_positions(self, groups: Patches, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._decoder_pos(groups.center, mask)

    def _decoder_pos(self, center: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return self.decoder_pos_embed(center)
        B, G, _ = center.shape
        n_vis = G - int(mask[0].sum())
        return self.decoder_pos_embed(torch.cat([center[~mask].view(B, n_vis, 3),
                                                 center[mask].view(B, G - n_vis, 3)], 1))

    def decode_masked(self, groups: Patches, mask: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        return self.decode(encoded, groups.center, mask, self.mask_token, self.MAE_decoder, int(mask[0].sum()))

    def reconstruct_masked(self, groups: Patches, mask: torch.Tensor, encoded: torch.Tensor):
        B, M, K = mask.shape[0], int(mask[0].sum()), self.group_size
        f_hat = self.decode_masked(groups, mask, encoded)
        pred = at_least_float32(self.reconstruct(f_hat).reshape(B * M, K, 3))
        target = at_least_float32(groups.neighborhood[mask].view(B * M, K, 3))
        return f_hat, self.loss_fn(pred, target, reduction="none").view(B, M)

    def decoder_spec(self) -> dict[str, float]:
        return {"num_heads": self.tc.decoder_num_heads, "drop_path_rate": self.tc.drop_path_rate}

    def mask_scale_patches(self, groups: Patches) -> torch.Tensor:
        return groups.neighborhood

    def build_knowledge_teacher(self, teacher_model: dict | None = None,
                                with_decoder: bool = False) -> PointMAETeacher:
        tc = TransformerConfig.from_dict(teacher_model, "model.gm3d.teacher_model") if teacher_model else self.tc
        return PointMAETeacher(tc, self.group_size, with_decoder)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder weights under the official pre-training key names (``MAE_encoder.*``)."""
        return {f"MAE_encoder.{k}": v for k, v in self.MAE_encoder.state_dict().items()}

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor, *, epoch: int = 0,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One pre-training step's losses.

        Args:
            batch: dict with ``points`` (B, N, 3) (already augmented), or the tensor itself.
            epoch: current epoch (used by curriculum mask strategies).
            generator: RNG for the mask.

        Returns:
            ``loss`` (scalar, differentiable) and detached terms for logging.
        """
        points = batch["points"] if isinstance(batch, dict) else batch
        p = self.group(points)
        mask = self.masker(p.center, generator=generator, epoch=epoch)
        x_vis = self.MAE_encoder(p.neighborhood, p.center, mask)
        n_mask = int(mask[0].sum())
        decoded = self.decode(x_vis, p.center, mask, self.mask_token, self.MAE_decoder, n_mask)
        pred = self.reconstruct(decoded)
        B = points.shape[0]
        target = p.neighborhood[mask].view(B, n_mask, self.group_size, 3)
        loss = self.loss_fn(at_least_float32(pred.reshape(-1, self.group_size, 3)),
                            at_least_float32(target.reshape(-1, self.group_size, 3)))
        return {"loss": loss, f"chamfer_{'l2' if self.loss_fn is chamfer_l2 else 'l1'}": loss.detach()}
