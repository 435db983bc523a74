"""The fast code paths of the mini-PointNet and the GC head against the plain official formulas.

The references below are the official modules' forward passes, written with the same parameters:
Conv1d on the (B*G, C, K) layout with the [global ; local] concat and "embed every patch, then
select" for the patch embedding; Conv1d(C -> 1024) BN LeakyReLU Conv1d(1024 -> C) then the channel
mean for the GC head. A whole GM3D training forward and backward with the official semantics
(``embed_visible_only: false``) is compared in float64 (equal to 1e-10: the same math) and in float32
(equal up to float rounding).
"""

import copy

import pytest
import torch

from models.gm3d import GCHead, PointMAEGM3D
from models.layers import PatchEmbed
from models.point_mae import PointMAE
from tests.helpers import TINY_TC
from tools.engine.builders import load_knowledge_teacher
from tools.engine.checkpoint import atomic_save


def reference_patch_embed(pe: PatchEmbed, point_groups, keep=None):
    """Official ``Encoder.forward``, then the official ``x[~mask]`` selection of the kept tokens."""
    B, G, K, _ = point_groups.shape
    x = point_groups.reshape(B * G, K, 3).transpose(2, 1)
    f = pe.first_conv(x)
    f_global = torch.max(f, dim=2, keepdim=True)[0]
    f = pe.second_conv(torch.cat([f_global.expand(-1, -1, K), f], dim=1))
    tokens = torch.max(f, dim=2)[0].reshape(B, G, -1)
    return tokens if keep is None else tokens[keep].view(B, -1, tokens.shape[-1])


def reference_gc_head(head: GCHead, x):
    """Official ``increase_dim_2(x.transpose(1, 2)).mean(1)``."""
    return head.net(x.transpose(1, 2)).mean(1)


class RefPatchEmbed(PatchEmbed):
    def forward(self, point_groups, keep=None):
        return reference_patch_embed(self, point_groups, keep)


class RefGCHead(GCHead):
    def forward(self, x):
        return reference_gc_head(self, x)


def to_reference(model):
    """Swap every PatchEmbed / GCHead of ``model`` for the official formula (same parameters)."""
    for m in model.modules():
        if type(m) is PatchEmbed:
            m.__class__ = RefPatchEmbed
        elif type(m) is GCHead:
            m.__class__ = RefGCHead
    return model


def randomise_bn(module, seed=0):
    """Non-trivial BatchNorm affine parameters and running statistics (so eval-mode folding is tested)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol):
    """Every gradient equal to ``rtol`` of its own largest entry. Biases get a floor (``rtol`` of the
    largest gradient overall) for those right before a training-mode BatchNorm, whose exact gradient
    is 0 and which hold only rounding noise."""
    assert a.keys() == b.keys()
    floor = max(float(g.abs().max()) for g in b.values())
    for name in a:
        scale = float(b[name].abs().max())
        if name.endswith("bias"):
            scale = max(scale, floor)
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("train", [True, False])
def test_patch_embed_with_keep_equals_embed_all_then_select(dtype, rtol, train):
    torch.manual_seed(0)
    pe = PatchEmbed(32).to(dtype)
    randomise_bn(pe)
    pe.train(train)
    ref = copy.deepcopy(pe)
    x = torch.randn(3, 10, 8, 3, dtype=dtype)
    keep = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(i)) < 4 for i in range(3)])
    out, want = pe(x, keep), reference_patch_embed(ref, x, keep)
    assert out.shape == (3, 4, 32)
    torch.testing.assert_close(out, want, rtol=rtol, atol=rtol)
    torch.testing.assert_close(pe(x), reference_patch_embed(ref, x), rtol=rtol, atol=rtol)
    # BatchNorm running statistics (training: batch statistics over all 10 patches, not the 4 kept)
    for (n, a), (_, b) in zip(pe.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=n)
    w = torch.randn(out.shape, dtype=dtype)
    (pe(x, keep) * w).sum().backward()
    (reference_patch_embed(ref, x, keep) * w).sum().backward()
    assert_grads_close(grads(pe), grads(ref), rtol)
    assert all(p.grad.abs().sum() > 0 for n, p in pe.named_parameters() if "first_conv.0.bias" not in n)


@pytest.mark.parametrize("train", [True, False])
def test_gc_head_equals_conv_then_channel_mean(train):
    torch.manual_seed(0)
    head = GCHead(16, hidden=40).double()
    randomise_bn(head)
    head.train(train)
    ref = copy.deepcopy(head)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    out, want = head(x), reference_gc_head(ref, x)
    assert out.shape == (3, 7)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(3, 7, dtype=torch.float64)
    (head(x) * w).sum().backward()
    (reference_gc_head(ref, x) * w).sum().backward()
    assert_grads_close(grads(head), grads(ref), 1e-10)


@pytest.fixture
def teacher_ckpt(tmp_path):
    torch.manual_seed(0)
    mae = PointMAE(group_size=8, num_group=16, transformer_config=TINY_TC)
    randomise_bn(mae, seed=3)
    path = tmp_path / "pretrain.pth"
    atomic_save({"base_model": mae.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_gm3d_step_official_semantics_equals_official_formulas(teacher_ckpt, dtype, rtol):
    """Loss, every gradient and every BatchNorm statistic of one GM3D step: fast paths == references."""
    torch.manual_seed(1)
    m = PointMAEGM3D(group_size=8, num_group=16, transformer_config=TINY_TC, embed_visible_only=False,
                     gm3d={"variant": "C", "gc_decoder_depth": 2, "teacher_ckpt": teacher_ckpt},
                     mask={"alpha_max": 0.5})
    load_knowledge_teacher(m.knowledge_teacher, teacher_ckpt)
    randomise_bn(m.ema, seed=5)  # the EMA teacher runs in eval mode: its BatchNorms get folded
    m = m.to(dtype).train()
    m.on_epoch_start(1, 4)
    assert m._n_sel > 0
    ref = to_reference(copy.deepcopy(m))
    points = torch.randn(4, 128, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    outs = []
    for model in (m, ref):
        torch.manual_seed(7)  # drop path
        out = model({"points": points}, epoch=1, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        outs.append(out)
    for key in ("loss", "loss_point", "loss_feat", "loss_gc"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=rtol, atol=0, msg=key)
    assert_grads_close(grads(m), grads(ref), rtol)
    assert len(grads(m)) == sum(p.requires_grad for p in m.parameters())
    for (n, a), (_, b) in zip(m.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=n)
