"""Building blocks shared by every Point-MAE style backbone.

Attribute names follow the official Point-MAE modules so that ``state_dict`` keys match the released
checkpoints (``first_conv.{0,1,3}``, ``blocks.blocks.{i}.attn.qkv``, ``pos_embed.{0,2}``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchEmbed", "PosEmbed", "Block", "TransformerEncoder", "TransformerDecoder", "DropPath"]


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as it is when it is already float64 (losses and scores are computed in at least
    float32 under bf16 / fp16 autocast, and stay float64 in a float64 model)."""
    return x if x.dtype == torch.float64 else x.float()


def _pointwise(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Apply a kernel-size-1 Conv1d to channels-last ``x`` (..., C_in) as a matmul."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def _bn_relu_channels_last(x: torch.Tensor, bn: nn.BatchNorm1d, negative_slope: float = 0.0) -> torch.Tensor:
    """ReLU(BatchNorm1d) over the last dim of ``x`` (..., C): same statistics as BN on (N, C, L).

    ``negative_slope`` > 0 makes it a LeakyReLU. The activation runs in place on the BatchNorm output
    before it is reshaped back (in place on the reshaped view would make autograd copy the whole
    activation in backward).
    """
    shape = x.shape
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or not bn.track_running_stats
    y = F.batch_norm(x.reshape(-1, shape[-1]), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                     use_batch_stats, momentum, bn.eps)
    y = F.leaky_relu(y, negative_slope, inplace=True) if negative_slope else F.relu(y, inplace=True)
    return y.view(shape)


def _folded_pointwise(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(W, b)`` of the kernel-size-1 ``conv`` followed by ``bn`` when ``bn`` is a fixed affine map
    (eval mode with running statistics), else None: ``bn(W x + b) = (s W) x + s (b - mean) + beta``
    with ``s = gamma / sqrt(var + eps)``. Same values up to float rounding, one pass fewer."""
    if bn.training or not bn.track_running_stats or bn.running_mean is None:
        return None
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = (conv.bias - bn.running_mean) * scale + bn.bias
    return conv.weight.squeeze(-1) * scale[:, None], bias


def _first_pointwise(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``_pointwise`` for the 3-channel input layer: the weight is passed to the matmul as a contiguous
    (3, C_out) matrix, so that autograd computes its gradient as ``x^T g`` ((3, N) @ (N, C_out)); with the
    (C_out, 3)-strided weight it computes ``(g^T x)^T``, an N-long product with 3 output columns that
    MKL runs ~6x slower (110 ms vs 20 ms at N = 65,536 on one AVX2 core)."""
    w_t = conv.weight.squeeze(-1).t().contiguous()
    shape = x.shape
    return torch.addmm(conv.bias, x.reshape(-1, shape[-1]), w_t).view(*shape[:-1], w_t.shape[1])


def _max_pool(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Max over ``dim``. With autograd: ``max`` (its backward routes the gradient to one arg-max, as
    the official ``torch.max``, and is ~2.5x cheaper than ``amax``'s tie-splitting backward on CPU);
    without: ``amax`` (same values, ~5x faster than ``max``, which also computes indices)."""
    if x.requires_grad and torch.is_grad_enabled():
        return x.max(dim=dim, keepdim=keepdim)[0]
    return x.amax(dim=dim, keepdim=keepdim)


class PatchEmbed(nn.Module):
    """Mini-PointNet that turns each point patch into one token (official ``Encoder``).

    conv(3->128) BN ReLU conv(128->256), max-pool, concat [global, local] (512), conv(512->512) BN ReLU
    conv(512->C), max-pool. Implemented channels-last with matmuls (no transposes); parameters and
    buffers are ordinary Conv1d / BatchNorm1d modules, so keys and numerics match the official model
    (up to float rounding: the concat is folded into conv3, see ``forward``; in eval mode each
    BatchNorm is folded into the conv before it, see :func:`_folded_pointwise`; max-pools see
    :func:`_max_pool`).

    Args:
        encoder_channel: output token width C.
    """

    def __init__(self, encoder_channel: int = 384):
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
            nn.Conv1d(512, encoder_channel, 1))

    def forward(self, point_groups: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G, K, 3) centre-relative patches -> (B, G, C) tokens.

        With ``keep`` ((B, G) bool, the same count n in every row) -> (B, n, C), the tokens of the kept
        patches in increasing index: the official "embed every patch, then select". Every patch goes
        through the layers up to the second BatchNorm, whose batch statistics (training) cover all G
        patches; the last conv and max-pool, whose outputs nobody reads for the others, run on the
        kept patches only (same values, 54 % of the FLOPs skipped for the dropped patches).
        """
        c1, bn1, _, c2 = self.first_conv
        c3, bn2, _, c4 = self.second_conv
        fold1, fold2 = _folded_pointwise(c1, bn1), _folded_pointwise(c3, bn2)
        if fold1 is None:
            x = _bn_relu_channels_last(_first_pointwise(point_groups, c1), bn1)
        else:
            x = F.linear(point_groups, *fold1).relu_()
        x = _pointwise(x, c2)                                    # (B, G, K, 256)
        glob = _max_pool(x, -2, keepdim=True)                    # (B, G, 1, 256)
        # conv3 on [global ; local] = W[:, :256] @ global + W[:, 256:] @ local + b: the global half is
        # computed once per patch instead of once per point (-26 % FLOPs, no (B, G, K, 512) concat).
        w3, b3 = fold2 if fold2 is not None else (c3.weight.squeeze(-1), c3.bias)
        half = glob.shape[-1]
        x = F.linear(x, w3[:, half:]).add_(F.linear(glob, w3[:, :half], b3))
        x = _bn_relu_channels_last(x, bn2) if fold2 is None else x.relu_()
        if keep is not None:
            B, _, K, D = x.shape
            x = x[keep].view(B, -1, K, D)
        x = _pointwise(x, c4)                                    # (B, G, K, C)
        return _max_pool(x, -2)


class PosEmbed(nn.Sequential):
    """Linear(3->hidden) GELU Linear(hidden->dim); official keys ``.0`` and ``.2``."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, dim))


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias (official), fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int = 6, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, n_query: int = 0) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); with ``n_query`` only the last ``n_query`` tokens are queries
        (every token is still a key and value) and the output is (B, n_query, C)."""
        B, N, C = x.shape
        h = self.num_heads
        if n_query:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, -n_query:], w[:C], None if b is None else b[:C])
            q = q.view(B, n_query, h, C // h).transpose(1, 2)
            kv = F.linear(x, w[C:], None if b is None else b[C:]).view(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
            if attn_mask is not None:
                attn_mask = attn_mask[..., -n_query:, :]
            N = n_query
        else:
            q, k, v = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block; submodule names match timm / Point-MAE."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn = Attention(dim, num_heads)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, n_query: int = 0) -> torch.Tensor:
        """(B, N, C) -> (B, N, C), or (B, n_query, C): the last ``n_query`` tokens only (all tokens
        are attended to; the other rows' outputs, which nobody reads, are not computed)."""
        y = self.attn(self.norm1(x), attn_mask, n_query)
        x = (x[:, -n_query:] if n_query else x) + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _drop_rates(drop_path_rate: float, depth: int) -> list[float]:
    return [float(r) for r in torch.linspace(0, drop_path_rate, depth)] if depth else []


class TransformerEncoder(nn.Module):
    """Stack of blocks with the positional embedding re-added before every block (official)."""

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, drop_path=r) for r in _drop_rates(drop_path_rate, depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, return_layers: tuple[int, ...] = ()):
        """(B, N, C) tokens + (B, N, C) positions -> (B, N, C), or a list of the requested layers."""
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x + pos)
            if i in return_layers:
                outs.append(x)
        return outs if return_layers else x


class TransformerDecoder(nn.Module):
    """Official ``TransformerDecoder``: ``blocks`` is the ModuleList itself, then ``norm``."""

    def __init__(self, embed_dim: int = 384, depth: int = 4, num_heads: int = 6,
                 drop_path_rate: float = 0.1):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, drop_path=r) for r in _drop_rates(drop_path_rate, depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor, pos: torch.Tensor, return_token_num: int = 0) -> torch.Tensor:
        """Run all blocks; return the last ``return_token_num`` tokens normalised (all if 0).

        With ``return_token_num`` the last block computes only those rows (same values).
        """
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x + pos, n_query=return_token_num if i == last else 0)
        if return_token_num and last < 0:
            x = x[:, -return_token_num:]
        return self.head(self.norm(x))
