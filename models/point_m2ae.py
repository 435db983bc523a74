"""Point-M2AE: the multi-scale masked autoencoder, checkpoint-compatible with the official release.

Module attribute names follow the official ``Point_M2AE`` / ``H_Encoder`` so that ``state_dict`` keys and
shapes equal the released ``pre-train.pth`` (after ``module.`` is removed)::

    h_encoder.token_embed.{s}.{first_conv,second_conv}.{0,1,3}.*   stage 0: 3->C0 mini-PointNet;
                                                                  stage s>0: token merging C(s-1)->Cs
    h_encoder.encoder_pos_embeds.{s}.{0,2}.*                     Linear(3->Cs) GELU Linear(Cs->Cs)
    h_encoder.encoder_blocks.{s}.blocks.{i}.*                     encoder_depths[s] blocks per stage
    h_encoder.encoder_norms.{s}.*                                 one LayerNorm per stage
    mask_token (1, decoder_dims[0])                               2-D, unlike Point-MAE's (1, 1, C)
    h_decoder.{d}.blocks.{i}.*, decoder_pos_embeds.{d}.{0,2}.*    coarse -> fine decoder stages
    token_prop.{d-1}.fuse.net.{0,1}.*                             feature propagation (3-NN interpolation,
    token_prop.{d-1}.extraction.operation.{j}.{net1,net2}.{0,1}.*  Conv-BN-GELU fuse, residual blocks)
    decoder_norm.*, rec_head (Conv1d decoder_dims[-1] -> 3 * group_sizes[0])

The method, the official behaviour and every choice made here are in docs/M2AE.md. In short: three
scales of FPS + kNN groups, each scale grouping the previous scale's centres; the mask is drawn at the
coarsest scale and propagated down (a finer token is visible iff it is in the kNN group of a visible
coarser token); each stage encodes only its visible tokens (samples differ in their visible count, so
they are padded; ``official_padding`` picks the official attention mask over the padding or masks it
out); the decoder goes back up two scales and
reconstructs, for every masked token of the second scale, ``group_sizes[0]`` points against the
``group_sizes[1]`` first-scale centres of its group (Chamfer-L2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from extensions import Patches, chamfer_l2, gather, group, knn
from models.base import EncoderTeacher, MaskedAutoencoder
from models.build import MODELS
from models.layers import (Block, PatchEmbed, _bn_relu_channels_last, _drop_rates, _max_pool, _pointwise,
                           at_least_float32)
from models.masking import MaskStrategy, build_mask, resolve_mask_config
from models.point_mae import _init_trunc_normal, _init_xavier, pool_tokens
from utils.errors import ConfigError

__all__ = ["M2AEConfig", "TokenMerge", "StageBlocks", "HierarchicalEncoder", "FeaturePropagation",
           "M2AEEncoded", "PointM2AE", "PointM2AETeacher", "propagate_mask", "group_multiscale",
           "local_attention_bias", "official_padding_bias"]

#: additive attention bias of a masked-out pair (the official value)
NEG_BIAS = -100000.0


@dataclass
class M2AEConfig:
    """The official Point-M2AE model keys (``cfgs/pre-training/point-m2ae.yaml``), validated.

    Args:
        group_sizes: kNN size per scale (finest first).
        num_groups: FPS centres per scale (finest first); scale s > 0 groups the centres of scale s-1.
        encoder_depths: transformer blocks per encoder stage.
        encoder_dims: token width per stage.
        local_radius: local-attention radius per stage (a pair of tokens farther apart than the radius
            does not attend; <= 0 turns it off for that stage).
        num_heads: attention heads of every block.
        drop_path_rate: stochastic depth, linear from 0 over all encoder (and, separately, decoder) blocks.
        mask_ratio: fraction of the coarsest-scale tokens masked (official spelling of ``mask.ratio``).
        decoder_depths: blocks per decoder stage (coarsest first).
        decoder_dims: token width per decoder stage (coarsest first; equal to the encoder's widths).
        decoder_up_blocks: residual blocks of each feature-propagation module.
    """

    group_sizes: list[int] = field(default_factory=lambda: [16, 8, 8])
    num_groups: list[int] = field(default_factory=lambda: [512, 256, 64])
    encoder_depths: list[int] = field(default_factory=lambda: [5, 5, 5])
    encoder_dims: list[int] = field(default_factory=lambda: [96, 192, 384])
    local_radius: list[float] = field(default_factory=lambda: [0.32, 0.64, 1.28])
    num_heads: int = 6
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.8
    decoder_depths: list[int] = field(default_factory=lambda: [1, 1])
    decoder_dims: list[int] = field(default_factory=lambda: [384, 192])
    decoder_up_blocks: list[int] = field(default_factory=lambda: [1, 1])

    @classmethod
    def from_args(cls, where: str = "model", decoder: bool = True, **kwargs) -> M2AEConfig:
        """A validated config from a model's constructor arguments (None = the official default)."""
        given = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items() if v is not None}
        return cls(**given).validate(where, decoder)

    def validate(self, where: str = "model", decoder: bool = True) -> M2AEConfig:
        S = len(self.num_groups)
        for name in ("group_sizes", "encoder_depths", "encoder_dims", "local_radius"):
            if len(getattr(self, name)) != S:
                raise ConfigError(f"{where}.{name} has {len(getattr(self, name))} entries but num_groups has {S} "
                                  f"(one entry per scale expected)")
        if S < 2:
            raise ConfigError(f"{where}.num_groups: Point-M2AE needs at least 2 scales, got {self.num_groups}")
        for s in range(1, S):
            if self.num_groups[s] > self.num_groups[s - 1] or self.group_sizes[s] > self.num_groups[s - 1]:
                raise ConfigError(f"{where}: scale {s} groups the {self.num_groups[s - 1]} centres of scale {s - 1}, "
                                  f"so num_groups[{s}]={self.num_groups[s]} and group_sizes[{s}]="
                                  f"{self.group_sizes[s]} must not exceed it")
        for d in self.encoder_dims + (self.decoder_dims if decoder else []):
            if d % self.num_heads:
                raise ConfigError(f"{where}: width {d} is not divisible by num_heads={self.num_heads}")
        if decoder:
            D = len(self.decoder_dims)
            if D != S - 1:
                raise ConfigError(f"{where}.decoder_dims: {D} decoder stages for {S} scales; the decoder goes from "
                                  f"the coarsest scale up to the second scale, so {S - 1} are expected")
            if len(self.decoder_depths) != D or len(self.decoder_up_blocks) < D - 1:
                raise ConfigError(f"{where}: decoder_depths ({self.decoder_depths}) needs {D} entries and "
                                  f"decoder_up_blocks ({self.decoder_up_blocks}) at least {D - 1}")
            want = list(reversed(self.encoder_dims))[:D]
            if list(self.decoder_dims) != want:
                raise ConfigError(f"{where}.decoder_dims={self.decoder_dims} must equal the encoder widths from the "
                                  f"coarsest scale up, {want}")
        return self


# ---------------------------------------------------------------------- multi-scale structure
def group_multiscale(points: torch.Tensor, num_groups, group_sizes) -> list[Patches]:
    """Official multi-scale grouping: scale 0 groups the points, scale s > 0 the centres of scale s-1.

    ``groups[s].idx`` (B, G_s, K_s) indexes the tokens of scale s-1 (the points for s = 0);
    ``groups[s].neighborhood`` holds those tokens' centres relative to the scale-s centre.
    """
    out, xyz = [], points
    for g, k in zip(num_groups, group_sizes):
        p = group(xyz, int(g), int(k))
        out.append(p)
        xyz = p.center
    return out


def propagate_mask(coarse_mask: torch.Tensor, groups: list[Patches], official_index0: bool = False
                   ) -> list[torch.Tensor]:
    """The coarsest-scale mask pushed down to every scale (finest first).

    A token of scale s-1 is visible iff it is in the kNN group of a visible token of scale s. With
    ``official_index0`` the official scatter quirk is reproduced: the groups of masked tokens are
    zeroed and scattered too, which unmasks the first token of the first sample of the batch at every
    finer scale whenever any coarse token is masked.
    """
    masks = [coarse_mask]
    for s in range(len(groups) - 1, 0, -1):
        idx = groups[s].idx                                        # (B, G_s, K_s) into scale s-1
        B, G, K = idx.shape
        n_fine = groups[s - 1].center.shape[1]
        vis = (~masks[0]).unsqueeze(-1).expand(B, G, K)
        hits = torch.zeros(B, n_fine, dtype=torch.int32, device=idx.device).scatter_add_(
            1, idx.reshape(B, -1), vis.reshape(B, -1).to(torch.int32))
        fine_mask = hits == 0
        if official_index0 and bool(masks[0].any()):
            fine_mask[0, 0] = False
        masks.insert(0, fine_mask)
    return masks


def local_attention_bias(center: torch.Tensor, radius: float, valid: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """(B, 1, L, L) additive attention bias: -1e5 for pairs at distance >= ``radius`` and for pairs
    involving a padding token (``valid`` False); 0 elsewhere. ``radius <= 0``: padding only."""
    B, L, _ = center.shape
    blocked = torch.zeros(B, L, L, dtype=torch.bool, device=center.device)
    if radius > 0:
        blocked |= torch.cdist(center.float(), center.float()) >= radius
    if valid is not None:
        blocked |= ~(valid.unsqueeze(2) & valid.unsqueeze(1))
    return (blocked.float() * NEG_BIAS).unsqueeze(1)


def official_padding_bias(center: torch.Tensor, radius: float, valid: torch.Tensor,
                          dist: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The official pre-training attention mask, ``mask_radius * mask_vis``, as a (B, 1, L, L) additive bias.

    ``mask_vis`` is 1 for every pair that involves a padding slot, ``mask_radius`` is 1 for pairs at
    distance >= ``radius`` (padding centres sit at the origin); their product blocks a (valid, padding)
    pair only where the valid centre is at least ``radius`` from the origin, never blocks a
    (padding, padding) pair, and never blocks a (valid, valid) pair (the radius is cancelled).
    ``radius <= 0``: ``mask_vis`` alone (padding fully blocked). ``dist`` is the official cache: the
    previous stage's distance matrix is reused when its size equals this stage's padded length.
    Returns the bias and the distance matrix to pass to the next stage.
    """
    pad = ~(valid.unsqueeze(2) & valid.unsqueeze(1))
    if radius > 0:
        if dist is None or dist.shape[1] != center.shape[1]:
            dist = torch.cdist(center, center)
        blocked = pad & (dist >= radius)
    else:
        blocked = pad
    return (blocked.to(center.dtype) * NEG_BIAS).unsqueeze(1), dist


# ---------------------------------------------------------------------- modules
class TokenMerge(nn.Module):
    """Official ``Token_Embed(in_c > 3)``: the stage embedding over the kNN groups of the previous
    stage's tokens. conv(in->in) BN ReLU conv(in->in), max-pool, concat [global, local] (2 in),
    conv(2in->out) BN ReLU conv(out->out), max-pool (channels-last matmuls, official keys)."""

    def __init__(self, in_c: int, out_c: int):
        super().__init__()
        self.in_c, self.out_c = in_c, out_c
        self.first_conv = nn.Sequential(nn.Conv1d(in_c, in_c, 1), nn.BatchNorm1d(in_c), nn.ReLU(inplace=True),
                                        nn.Conv1d(in_c, in_c, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(2 * in_c, out_c, 1), nn.BatchNorm1d(out_c),
                                         nn.ReLU(inplace=True), nn.Conv1d(out_c, out_c, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """(B, G, K, in_c) grouped tokens -> (B, G, out_c)."""
        c1, bn1, _, c2 = self.first_conv
        c3, bn2, _, c4 = self.second_conv
        x = _pointwise(_bn_relu_channels_last(_pointwise(groups, c1), bn1), c2)
        glob = _max_pool(x, -2, keepdim=True)
        w3 = c3.weight.squeeze(-1)
        x = F.linear(x, w3[:, self.in_c:]).add_(F.linear(glob, w3[:, :self.in_c], c3.bias))
        x = _pointwise(_bn_relu_channels_last(x, bn2), c4)
        return _max_pool(x, -2)


class StageBlocks(nn.Module):
    """Official ``Encoder_Block`` / ``Decoder_Block``: ``blocks`` ModuleList, positions re-added before
    every block, an optional additive attention bias."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path: list[float]):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, drop_path=drop_path[i]) for i in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is not None:
            bias = bias.to(x.dtype)
        for block in self.blocks:
            x = block(x + pos, bias)
        return x


def _pos_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))


class _FuseBlock(nn.Module):
    """Official ``ConvBNReLU1D``: ``net`` = Conv1d BN GELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout), nn.GELU())

    def forward(self, x):
        return self.net(x)


class _ResBlock(nn.Module):
    """Official ``ConvBNReLURes1D`` (groups=1, expansion 1): GELU(net2(net1(x)) + x)."""

    def __init__(self, c: int):
        super().__init__()
        self.net1 = nn.Sequential(nn.Conv1d(c, c, 1), nn.BatchNorm1d(c), nn.GELU())
        self.net2 = nn.Sequential(nn.Conv1d(c, c, 1), nn.BatchNorm1d(c))

    def forward(self, x):
        return F.gelu(self.net2(self.net1(x)) + x)


class _Extraction(nn.Module):
    def __init__(self, c: int, blocks: int):
        super().__init__()
        self.operation = nn.Sequential(*[_ResBlock(c) for _ in range(blocks)])

    def forward(self, x):
        return self.operation(x)


class FeaturePropagation(nn.Module):
    """Official ``PointNetFeaturePropagation`` of the M2AE decoder.

    Coarse features are interpolated onto the fine centres from their 3 nearest coarse centres
    (weights ``1 / (d^2 + 1e-8)``, normalised), concatenated after the fine skip features
    ``[skip ; interpolated]``, then fused (Conv-BN-GELU) and refined by residual Conv-BN blocks.
    """

    def __init__(self, in_channel: int, out_channel: int, blocks: int = 1):
        super().__init__()
        self.fuse = _FuseBlock(in_channel, out_channel)
        self.extraction = _Extraction(out_channel, blocks)

    def forward(self, xyz_fine: torch.Tensor, xyz_coarse: torch.Tensor, skip: torch.Tensor | None,
                coarse: torch.Tensor) -> torch.Tensor:
        """(B, N, 3), (B, S, 3), (B, N, D1) or None, (B, S, D2) -> (B, N, out)."""
        B, N, _ = xyz_fine.shape
        S = xyz_coarse.shape[1]
        if S == 1:
            interp = coarse.expand(B, N, coarse.shape[-1])
        else:
            k = min(3, S)
            with torch.no_grad():
                nn_ = knn(at_least_float32(xyz_fine), at_least_float32(xyz_coarse), k)
                w = 1.0 / (nn_.dist.square() + 1e-8)
                w = w / w.sum(-1, keepdim=True)
            interp = (gather(coarse, nn_.idx) * w.unsqueeze(-1).to(coarse.dtype)).sum(2)
        x = interp if skip is None else torch.cat([skip, interp], -1)
        x = self.extraction(self.fuse(x.transpose(1, 2)))
        return x.transpose(1, 2)


class HierarchicalEncoder(nn.Module):
    """Official ``H_Encoder``: per stage a token embedding (stage 0) or token merging (s > 0), a
    positional MLP, ``encoder_depths[s]`` blocks and (pre-training layout) a LayerNorm.

    Args:
        cfg: the validated :class:`M2AEConfig`.
        with_norms: keep ``encoder_norms`` (the pre-training model has them; the official fine-tuning
            models do not, they have one top-level ``norm`` instead).
    """

    def __init__(self, cfg: M2AEConfig, with_norms: bool = True):
        super().__init__()
        dims = cfg.encoder_dims
        self.dims, self.local_radius = list(dims), [float(r) for r in cfg.local_radius]
        self.token_embed = nn.ModuleList(
            PatchEmbed(dims[0]) if s == 0 else TokenMerge(dims[s - 1], dims[s]) for s in range(len(dims)))
        self.encoder_pos_embeds = nn.ModuleList(_pos_mlp(d) for d in dims)
        dpr = _drop_rates(cfg.drop_path_rate, sum(cfg.encoder_depths))
        self.encoder_blocks = nn.ModuleList()
        start = 0
        for d, depth in zip(dims, cfg.encoder_depths):
            self.encoder_blocks.append(StageBlocks(d, depth, cfg.num_heads, dpr[start:start + depth]))
            start += depth
        self.encoder_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims) if with_norms else None
        self.apply(_init_trunc_normal)

    def lr_rules(self, prefix: str) -> tuple[int, list[tuple[str, int]]]:
        """Layer-wise lr decay (:meth:`models.base.TrainHooks.lr_layers`): blocks are counted over the
        stages in order (block ``k`` of stage ``s`` is layer ``1 + k + sum(depths[:s])``); a stage's token
        embedding / merging and positional MLP sit at the layer of the block just before that stage (0
        for stage 0); a stage's norm at the layer of its last block. Returns ``(total blocks, rules)``."""
        rules, start = [], 0
        for s, stage in enumerate(self.encoder_blocks):
            rules += [(f"{prefix}token_embed.{s}", start), (f"{prefix}encoder_pos_embeds.{s}", start)]
            rules += [(f"{prefix}encoder_blocks.{s}.blocks.{k}", start + k + 1) for k in range(len(stage.blocks))]
            start += len(stage.blocks)
            if self.encoder_norms is not None:
                rules.append((f"{prefix}encoder_norms.{s}", start))
        return start, rules

    def forward(self, groups: list[Patches], masks: list[torch.Tensor] | None = None,
                local_attention: bool = True, official_padding: bool = False
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Encode every scale.

        Args:
            groups: :func:`group_multiscale` output.
            masks: per-scale (B, G_s) bool, True = masked (:func:`propagate_mask`); None = every token.
            local_attention: apply the radius bias (off: the official pre-training, where only the
                padding is masked out).
            official_padding: with ``local_attention`` off, use the official pre-training mask
                (:func:`official_padding_bias`: padding slots take part in attention with the valid
                tokens near the origin) instead of masking every padding pair out.

        Returns:
            ``tokens`` per stage, (B, L_s, C_s): the visible tokens in increasing index, zero-padded to
            the batch's longest (L_s = G_s without masks), normalised when the encoder has norms;
            ``valid`` (B, L_s) bool (False = padding) and ``index`` (B, L_s) int64 into G_s per stage.
        """
        tokens_out, valid_out, index_out = [], [], []
        prev, dist = None, None
        S = len(groups)
        for s in range(S):
            g = groups[s]
            tok = self.token_embed[s](g.neighborhood if s == 0 else gather(prev, g.idx))  # (B, G, C)
            B, G, C = tok.shape
            radius = self.local_radius[s] if local_attention else 0.0
            if masks is None:
                index = torch.arange(G, device=tok.device).expand(B, G)
                valid = torch.ones(B, G, dtype=torch.bool, device=tok.device)
                center, x_in = g.center, tok
                bias = local_attention_bias(center, radius) if radius > 0 else None
            else:
                vis = ~masks[s]
                counts = vis.sum(1)
                L = int(counts.max())
                # visible indices first, each in increasing order; padding rows after them
                index = masks[s].to(torch.uint8).argsort(dim=1, stable=True)[:, :L]
                valid = torch.arange(L, device=tok.device).unsqueeze(0) < counts.unsqueeze(1)
                keep = valid.unsqueeze(-1)
                x_in = gather(tok, index) * keep
                center = gather(g.center, index) * keep
                if official_padding and not local_attention:
                    bias, dist = official_padding_bias(center, self.local_radius[s], valid, dist)
                else:
                    bias = None if bool(valid.all()) and radius <= 0 else local_attention_bias(center, radius, valid)
            x = self.encoder_blocks[s](x_in, self.encoder_pos_embeds[s](center), bias)
            if s < S - 1:  # token merging input: transformer outputs at the visible slots, embeddings elsewhere
                if masks is None:
                    prev = x
                else:
                    prev = tok.clone()
                    prev[~masks[s]] = x[valid].to(prev.dtype)
            tokens_out.append(x)
            valid_out.append(valid)
            index_out.append(index)
        if self.encoder_norms is not None:
            tokens_out = [norm(t) for norm, t in zip(self.encoder_norms, tokens_out)]
        return tokens_out, valid_out, index_out


@dataclass
class M2AEEncoded:
    """What :meth:`PointM2AE.encode` returns: per-scale padded tokens, their validity and indices,
    and the per-scale masks (finest first)."""

    tokens: list[torch.Tensor]
    valid: list[torch.Tensor]
    index: list[torch.Tensor]
    masks: list[torch.Tensor]


# ---------------------------------------------------------------------- the pre-training model
@MODELS.register("Point_M2AE", "PointM2AE")
class PointM2AE(MaskedAutoencoder):
    """Point-M2AE pre-training model (official keys; see the module docstring and docs/M2AE.md).

    Args:
        group_sizes, num_groups, encoder_depths, encoder_dims, local_radius, num_heads, drop_path_rate,
        mask_ratio, decoder_depths, decoder_dims, decoder_up_blocks: the official keys (:class:`M2AEConfig`).
        mask: the ``model.mask`` block (strategy ``random`` / ``block`` decided at the coarsest scale; the
            count rule defaults to the official ``int(ratio * G)``: 51 of 64 masked at 0.8).
        local_attention_in_pretrain: apply the local-attention radii during pre-training. The official
            code builds the radius mask but multiplies it with the padding mask, which cancels it: False
            (default) keeps that behaviour; True masks out pairs beyond the radius as fine-tuning does.
        official_index0: reproduce the official mask-propagation quirk that always unmasks the first
            token of the batch's first sample at every finer scale (default False: fixed).
        official_padding: reproduce the official pre-training attention mask ``mask_radius * mask_vis``
            (:func:`official_padding_bias`; matters at batch size >= 2, where samples are padded to the
            longest visible count): padding slots attend and are attended to by valid tokens within the
            local radius of the origin. Default False: padding is always masked out.
    """

    ARCH = "point_m2ae"
    # the official loss reads the finest-scale tokens only through the decoder skips, never through its norm
    PARAMS_WITHOUT_GRAD = ("h_encoder.encoder_norms.0.",)

    def __init__(self, group_sizes: list[int] | None = None, num_groups: list[int] | None = None,
                 encoder_depths: list[int] | None = None, encoder_dims: list[int] | None = None,
                 local_radius: list[float] | None = None, num_heads: int = 6, drop_path_rate: float = 0.1,
                 mask_ratio: float | None = None, decoder_depths: list[int] | None = None,
                 decoder_dims: list[int] | None = None, decoder_up_blocks: list[int] | None = None,
                 mask: dict | None = None, local_attention_in_pretrain: bool = False,
                 official_index0: bool = False, official_padding: bool = False):
        super().__init__()
        cfg = M2AEConfig.from_args(group_sizes=group_sizes, num_groups=num_groups, encoder_depths=encoder_depths,
                                   encoder_dims=encoder_dims, local_radius=local_radius,
                                   decoder_depths=decoder_depths, decoder_dims=decoder_dims,
                                   decoder_up_blocks=decoder_up_blocks, num_heads=num_heads,
                                   drop_path_rate=drop_path_rate)
        tc = {} if mask_ratio is None else {"mask_ratio": mask_ratio}
        m = dict(mask or {})
        if mask_ratio is None and "ratio" not in m:
            m["ratio"] = 0.8  # the official Point-M2AE ratio (MaskConfig's own default is Point-MAE's 0.6)
        mcfg = resolve_mask_config(m, tc, official_prefix="")
        cfg.mask_ratio = mcfg.ratio
        self.cfg = cfg
        self.local_attention_in_pretrain = bool(local_attention_in_pretrain)
        self.official_index0 = bool(official_index0)
        self.official_padding = bool(official_padding)
        if self.official_padding and self.local_attention_in_pretrain:
            raise ConfigError("model: official_padding: true reproduces the official pre-training mask, in which "
                              "the local radii are cancelled; it cannot be combined with "
                              "local_attention_in_pretrain: true (set one of them to false)")
        self.config = {**asdict(cfg), "mask": asdict(mcfg), "local_attention_in_pretrain": local_attention_in_pretrain,
                       "official_index0": official_index0, "official_padding": official_padding}
        self.num_group = cfg.num_groups[-1]
        self.token_dim = cfg.encoder_dims[-1]
        self.h_encoder = HierarchicalEncoder(cfg, with_norms=True)
        ddims = cfg.decoder_dims
        self.mask_token = nn.Parameter(torch.zeros(1, ddims[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        dpr = _drop_rates(cfg.drop_path_rate, sum(cfg.decoder_depths))
        self.h_decoder, self.decoder_pos_embeds, self.token_prop = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        start = 0
        for d, (dim, depth) in enumerate(zip(ddims, cfg.decoder_depths)):
            stage = StageBlocks(dim, depth, cfg.num_heads, dpr[start:start + depth])
            stage.apply(_init_xavier)
            self.h_decoder.append(stage)
            start += depth
            self.decoder_pos_embeds.append(_pos_mlp(dim))
            if d > 0:
                self.token_prop.append(FeaturePropagation(dim + ddims[d - 1], dim, cfg.decoder_up_blocks[d - 1]))
        self.decoder_norm = nn.LayerNorm(ddims[-1])
        self.rec_head = nn.Conv1d(ddims[-1], 3 * cfg.group_sizes[0], 1)
        self.masker: MaskStrategy = build_mask(mcfg)
        if self.masker.needs_scores:
            raise ConfigError(f"model: mask strategy {mcfg.strategy!r} needs GC scores, which plain Point-M2AE does "
                              f"not compute; use model.NAME: Point_M2AE_GM3D (GM3D wraps this model)")
        self.loss_fn = chamfer_l2

    # ------------------------------------------------------------------ pieces
    def group(self, points: torch.Tensor) -> list[Patches]:
        """(B, N, 3) -> one :class:`~extensions.Patches` per scale, finest first."""
        return group_multiscale(points, self.cfg.num_groups, self.cfg.group_sizes)

    def scale_masks(self, groups: list[Patches], mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Per-scale masks (finest first) from a coarsest-scale mask (None: nothing masked at the top,
        the official evaluation path, which still drops finer tokens covered by no group)."""
        if mask is None:
            B, G = groups[-1].center.shape[:2]
            mask = torch.zeros(B, G, dtype=torch.bool, device=groups[-1].center.device)
        return propagate_mask(mask, groups, self.official_index0)

    def mask_centers(self, groups: list[Patches]) -> torch.Tensor:
        return groups[-1].center

    def mask_scale_patches(self, groups: list[Patches]) -> torch.Tensor:
        """The coarsest scale's members (finer-scale centres, relative to the coarse centre)."""
        return groups[-1].neighborhood

    def encode(self, groups: list[Patches], mask: torch.Tensor | None = None) -> M2AEEncoded:
        masks = self.scale_masks(groups, mask)
        tokens, valid, index = self.h_encoder(groups, masks, self.local_attention_in_pretrain, self.official_padding)
        return M2AEEncoded(tokens, valid, index, masks)

    def mask_scale_tokens(self, encoded: M2AEEncoded) -> torch.Tensor:
        return encoded.tokens[-1]

    def decoder_positions(self, groups: list[Patches], mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder_pos_embeds[0](self._coarse_order(groups[-1].center, mask))

    @staticmethod
    def _coarse_order(center: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return center
        B, G, _ = center.shape
        n_vis = G - int(mask[0].sum())
        return torch.cat([center[~mask].view(B, n_vis, 3), center[mask].view(B, G - n_vis, 3)], 1)

    def decode(self, groups: list[Patches], encoded: M2AEEncoded, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hierarchical decoder.

        Returns:
            ``f_hat`` (B, M, C) the first stage's outputs at the coarse mask tokens and ``x`` (B, G_1, C')
            the last stage's normalised tokens at the second scale, in token order.
        """
        S = len(groups)
        x_vis = encoded.tokens[-1]
        B, n_vis, C = x_vis.shape
        M = mask.shape[1] - n_vis
        prev_center = self._coarse_order(groups[-1].center, mask)
        x = torch.cat([x_vis, self.mask_token.to(x_vis.dtype).expand(B, M, C)], 1)
        x = self.h_decoder[0](x, self.decoder_pos_embeds[0](prev_center))
        f_hat = x[:, n_vis:]
        for d in range(1, len(self.h_decoder)):
            s = S - 1 - d
            center = groups[s].center
            enc = encoded.tokens[s]
            skip = enc.new_zeros(B, center.shape[1], enc.shape[-1])
            skip[~encoded.masks[s]] = enc[encoded.valid[s]]
            x = self.token_prop[d - 1](center, prev_center, skip, x)
            x = self.h_decoder[d](x, self.decoder_pos_embeds[d](center))
            prev_center = center
        return f_hat, self.decoder_norm(x)

    def fine_token_loss(self, groups: list[Patches], encoded: M2AEEncoded, x: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token Chamfer-L2 at the second scale: ``group_sizes[0]`` predicted points per masked token
        against its ``group_sizes[1]`` first-scale centres. Returns (L,) losses of the masked tokens (all
        samples, token order) and the (B, G_1) mask they belong to."""
        fine_mask = encoded.masks[1]
        rec = x[fine_mask]                                              # (L, C')
        L = rec.shape[0]
        pred = self.rec_head(rec.unsqueeze(-1)).reshape(L, -1, 3)
        gt = groups[1].neighborhood[fine_mask].reshape(L, -1, 3)
        return self.loss_fn(at_least_float32(pred), at_least_float32(gt), reduction="none"), fine_mask

    def reconstruct_masked(self, groups: list[Patches], mask: torch.Tensor, encoded: M2AEEncoded):
        """``f_hat`` (B, M, C) decoded coarse mask tokens; ``l_p`` (B, M): for each masked coarse token the
        mean Chamfer of the masked second-scale tokens in its group (0 when its whole group is visible
        through other groups; docs/M2AE.md)."""
        f_hat, x = self.decode(groups, encoded, mask)
        per_tok, fine_mask = self.fine_token_loss(groups, encoded, x)
        B, G1 = fine_mask.shape
        loss_map = per_tok.new_zeros(B, G1)
        loss_map[fine_mask] = per_tok
        member = self.coarse_membership(groups)                        # (B, G, G_1) float 0/1
        m = member * fine_mask.unsqueeze(1).to(member.dtype)
        l_all = (m * loss_map.unsqueeze(1)).sum(-1) / m.sum(-1).clamp_min(1.0)
        M = int(mask[0].sum())
        return f_hat, l_all[mask].view(B, M)

    @staticmethod
    def coarse_membership(groups: list[Patches]) -> torch.Tensor:
        """(B, G_top, G_1) 0/1: which second-scale tokens lie in the (chained) group of each coarse token."""
        S = len(groups)
        B = groups[-1].idx.shape[0]
        if S == 2:
            G = groups[1].center.shape[1]
            return torch.eye(G, device=groups[1].idx.device).expand(B, G, G)
        member = None
        for s in range(S - 1, 1, -1):
            idx = groups[s].idx                                          # (B, G_s, K) into scale s-1
            n_fine = groups[s - 1].center.shape[1]
            hop = torch.zeros(B, idx.shape[1], n_fine, device=idx.device).scatter_(2, idx, 1.0)
            member = hop if member is None else (torch.bmm(member, hop) > 0).float()
        return member

    @torch.no_grad()
    def extract_features(self, points: torch.Tensor) -> torch.Tensor:
        """Official linear-SVM feature: the unmasked hierarchy, last stage normalised, mean + max."""
        enc = self.encode(self.group(points))
        return pool_tokens(enc.tokens[-1])

    def decoder_spec(self) -> dict[str, float]:
        return {"num_heads": self.cfg.num_heads, "drop_path_rate": self.cfg.drop_path_rate}

    def build_knowledge_teacher(self, teacher_model: dict | None = None,
                                with_decoder: bool = False) -> PointM2AETeacher:
        if with_decoder:
            raise ConfigError("model.gm3d.variant B needs a knowledge teacher with a decoder and point head, "
                              "which the Point-M2AE teacher does not have (use variant C)")
        if teacher_model:
            d = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in teacher_model.items()}
            unknown = set(d) - set(M2AEConfig.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"model.gm3d.teacher_model: unknown keys {sorted(unknown)}; expected Point-M2AE keys "
                                  f"{sorted(M2AEConfig.__dataclass_fields__)}")
            base = asdict(self.cfg)
            base.update(d)
            cfg = M2AEConfig(**base).validate("model.gm3d.teacher_model", decoder=False)
        else:
            cfg = self.cfg
        return PointM2AETeacher(cfg, self.local_attention_in_pretrain, self.official_index0, self.official_padding)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor, *, epoch: int = 0,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Official pre-training loss: Chamfer-L2 averaged over every masked second-scale token."""
        points = batch["points"] if isinstance(batch, dict) else batch
        groups = self.group(points)
        mask = self.masker(groups[-1].center, generator=generator, epoch=epoch)
        encoded = self.encode(groups, mask)
        _, x = self.decode(groups, encoded, mask)
        per_tok, _ = self.fine_token_loss(groups, encoded, x)
        loss = per_tok.mean()
        return {"loss": loss, "chamfer_l2": loss.detach()}


class PointM2AETeacher(EncoderTeacher):
    """Frozen pre-trained Point-M2AE encoder (GM3D's knowledge teacher), official keys ``h_encoder.*``.

    ``encode_full`` is the official evaluation path of the pre-training model: nothing masked at the
    coarsest scale, tokens (B, G_top, C) after the last stage's LayerNorm.
    """

    ARCH = "point_m2ae"

    def __init__(self, cfg: M2AEConfig, local_attention: bool = False, official_index0: bool = False,
                 official_padding: bool = False):
        super().__init__()
        c = M2AEConfig(**{**asdict(cfg), "drop_path_rate": 0.0})
        self.h_encoder = HierarchicalEncoder(c, with_norms=True)
        self.local_attention, self.official_index0 = local_attention, official_index0
        self.official_padding = official_padding
        self.token_dim = c.encoder_dims[-1]
        self.freeze()

    def encode_full(self, groups: list[Patches]) -> torch.Tensor:
        B, G = groups[-1].center.shape[:2]
        none = torch.zeros(B, G, dtype=torch.bool, device=groups[-1].center.device)
        masks = propagate_mask(none, groups, self.official_index0)
        return self.h_encoder(groups, masks, self.local_attention, self.official_padding)[0][-1]


# ---------------------------------------------------------------------- GeoMask3D on Point-M2AE
from models.gm3d import GM3D  # noqa: E402  (gm3d imports point_mae only; no cycle)


@MODELS.register("Point_M2AE_GM3D", "PointM2AE_GM3D")
class PointM2AEGM3D(GM3D):
    """Point-M2AE + GeoMask3D (docs/M2AE.md): :class:`GM3D` over :class:`PointM2AE`.

    GC scores and the easy-to-hard curriculum act on the coarsest scale; the mask then propagates down
    by Point-M2AE's rule; the GC target of a masked coarse token is the mean Chamfer of the masked
    second-scale tokens in its group (plus the feature-KD error at the coarse scale); the knowledge
    teacher is a frozen pre-trained Point-M2AE encoder (:class:`PointM2AETeacher`). Same arguments as
    :class:`PointM2AE`, plus ``gm3d`` and an optional pre-built ``knowledge_teacher``.
    """

    ARCH = "point_m2ae"

    def __init__(self, group_sizes: list[int] | None = None, num_groups: list[int] | None = None,
                 encoder_depths: list[int] | None = None, encoder_dims: list[int] | None = None,
                 local_radius: list[float] | None = None, num_heads: int = 6, drop_path_rate: float = 0.1,
                 mask_ratio: float | None = None, decoder_depths: list[int] | None = None,
                 decoder_dims: list[int] | None = None, decoder_up_blocks: list[int] | None = None,
                 mask: dict | None = None, local_attention_in_pretrain: bool = False,
                 official_index0: bool = False, official_padding: bool = False, gm3d: dict | None = None,
                 knowledge_teacher: EncoderTeacher | None = None):
        m = dict(mask or {})
        ratio = mask_ratio if mask_ratio is not None else m.get("ratio", 0.8)
        m.setdefault("ratio", ratio)
        if mask_ratio is not None and m["ratio"] != mask_ratio:
            raise ConfigError(f"model: mask_ratio={mask_ratio!r} disagrees with mask.ratio={m['ratio']!r}; "
                              f"set it in one place")
        student_mask = {k: v for k, v in m.items() if k in ("ratio", "count")}
        student = PointM2AE(group_sizes, num_groups, encoder_depths, encoder_dims, local_radius, num_heads,
                            drop_path_rate, None, decoder_depths, decoder_dims, decoder_up_blocks,
                            mask=student_mask, local_attention_in_pretrain=local_attention_in_pretrain,
                            official_index0=official_index0, official_padding=official_padding)
        super().__init__(student, mask=m, gm3d=gm3d, knowledge_teacher=knowledge_teacher)
