"""Batch transforms: exact formulas against per-sample reference loops fed the same random draws."""

import math

import numpy as np
import pytest
import torch

from datasets.transforms import (
    TRANSFORMS,
    Compose,
    Jitter,
    RandomDropout,
    RotatePerturbation,
    RotateY,
    Scale,
    ScaleAndTranslate,
    Translate,
    build_transforms,
    pc_norm,
)
from utils.errors import ConfigError, DataError

B, N, SEED = 5, 64, 1234


def _points(b: int = B, n: int = N, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)


def _gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rot_x(a: float) -> np.ndarray:
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _rot_y(a: float) -> np.ndarray:
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _rot_z(a: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def _close(out: torch.Tensor, ref: np.ndarray) -> None:
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_scale_and_translate_matches_official_loop():
    pc = _points()
    out = ScaleAndTranslate()(pc, _gen())
    g = _gen()
    scale = (2 / 3 + (3 / 2 - 2 / 3) * torch.rand(B, 3, generator=g)).double().numpy()
    shift = (-0.2 + 0.4 * torch.rand(B, 3, generator=g)).double().numpy()
    ref = pc.double().numpy().copy()
    for i in range(B):
        ref[i] = ref[i] * scale[i] + shift[i]
    _close(out, ref)


@pytest.mark.parametrize("anisotropic", [False, True])
def test_scale_matches_loop(anisotropic):
    pc = _points()
    out = Scale(0.8, 1.25, anisotropic=anisotropic)(pc, _gen())
    draws = (0.8 + 0.45 * torch.rand(B, 3 if anisotropic else 1, generator=_gen())).double().numpy()
    ref = np.stack([pc[i].double().numpy() * draws[i] for i in range(B)])
    _close(out, ref)
    if not anisotropic:  # isotropic: the ratio of coordinates is unchanged
        torch.testing.assert_close(out / out[:, :1, :1], pc / pc[:, :1, :1], rtol=1e-4, atol=1e-4)


def test_translate_matches_loop():
    pc = _points()
    out = Translate(range=0.3)(pc, _gen())
    shift = (-0.3 + 0.6 * torch.rand(B, 3, generator=_gen())).double().numpy()
    _close(out, np.stack([pc[i].double().numpy() + shift[i] for i in range(B)]))


def test_rotate_y_matches_official_loop():
    pc = _points()
    out = RotateY()(pc, _gen())
    angles = (2 * math.pi * torch.rand(B, generator=_gen())).double().numpy()
    _close(out, np.stack([pc[i].double().numpy() @ _rot_y(angles[i]) for i in range(B)]))
    torch.testing.assert_close(out[..., 1], pc[..., 1])  # the up axis is untouched
    torch.testing.assert_close(out.norm(dim=-1), pc.norm(dim=-1))


def test_rotate_perturbation_matches_pointnet2_loop():
    pc = _points()
    out = RotatePerturbation(angle_sigma=0.3, angle_clip=0.4)(pc, _gen())
    angles = (0.3 * torch.randn(B, 3, generator=_gen())).double().numpy().clip(-0.4, 0.4)
    assert np.abs(angles).max() == pytest.approx(0.4)  # sigma large enough that clipping is exercised
    ref = []
    for i in range(B):
        rot = _rot_z(angles[i, 2]) @ _rot_y(angles[i, 1]) @ _rot_x(angles[i, 0])
        ref.append(pc[i].double().numpy() @ rot)
    _close(out, np.stack(ref))


def test_jitter_matches_official():
    pc = _points()
    out = Jitter(sigma=0.05, clip=0.06)(pc, _gen())
    noise = (0.05 * torch.randn(B, N, 3, generator=_gen())).clamp(-0.06, 0.06)
    torch.testing.assert_close(out, pc + noise)
    assert (out - pc).abs().max() <= 0.06 + 1e-6


def test_random_dropout_matches_loop_and_keeps_n():
    pc = _points(n=200)
    out = RandomDropout(max_dropout_ratio=0.875)(pc, _gen())
    assert out.shape == pc.shape
    g = _gen()
    ratio = 0.875 * torch.rand(B, 1, generator=g)
    draws = torch.rand(B, 200, generator=g)
    ref = pc.clone()
    for i in range(B):
        idx = torch.nonzero(draws[i] <= ratio[i]).flatten()
        if len(idx) > 0:
            ref[i, idx] = pc[i, 0].repeat(len(idx), 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    same = (out == pc).all(-1)
    first = (out == pc[:, :1]).all(-1)
    assert bool((same | first).all())  # every point is either kept or the first point
    assert int((~same).sum()) > 0


def test_dropout_zero_ratio_is_identity():
    pc = _points()
    torch.testing.assert_close(RandomDropout(0.0)(pc, _gen()), pc, rtol=0, atol=0)


ALL = [
    ScaleAndTranslate(),
    Scale(),
    Scale(anisotropic=True),
    Translate(),
    RotateY(),
    RotatePerturbation(),
    Jitter(),
    RandomDropout(),
]


@pytest.mark.parametrize("t", ALL, ids=lambda t: repr(t))
def test_seeded_reproducibility(t):
    pc = _points()
    a, b = t(pc, _gen(1)), t(pc, _gen(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(t(pc, _gen(1)), t(pc, _gen(2)))
    g = _gen(1)
    assert not torch.equal(t(pc, g), t(pc, g))  # the generator advances


@pytest.mark.parametrize("t", ALL, ids=lambda t: repr(t))
def test_dtype_and_device_preserved(t):
    pc32 = _points()
    out32 = t(pc32, _gen())
    out64 = t(pc32.double(), _gen())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert out32.device == pc32.device and out32.shape == pc32.shape
    torch.testing.assert_close(out64.float(), out32, rtol=1e-5, atol=1e-5)  # same draws for every dtype
    assert torch.equal(pc32, _points())  # the input is not modified


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", ALL, ids=lambda t: repr(t))
def test_cuda_matches_cpu_with_cpu_generator(t):
    pc = _points()
    out = t(pc.cuda(), _gen())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), t(pc, _gen()), rtol=1e-5, atol=1e-5)
    assert t(pc.cuda(), torch.Generator(device="cuda").manual_seed(0)).is_cuda


def test_no_generator_uses_torch_global_rng():
    pc = _points()
    torch.manual_seed(3)
    a = ScaleAndTranslate()(pc)
    torch.manual_seed(3)
    torch.testing.assert_close(ScaleAndTranslate()(pc), a, rtol=0, atol=0)


def test_compose_applies_in_order_with_one_generator():
    pc = _points()
    out = Compose([RotateY(), Jitter()])(pc, _gen())
    g = _gen()
    torch.testing.assert_close(out, Jitter()(RotateY()(pc, g), g), rtol=0, atol=0)
    assert len(Compose([])) == 0 and torch.equal(Compose([])(pc, _gen()), pc)


def test_build_transforms_names_and_mappings():
    t = build_transforms(
        [
            "RotateY",
            {"NAME": "ScaleAndTranslate", "translate_range": 0.1},
            {"NAME": "Translate", "range": 0.05},
            {"NAME": "PointcloudJitter", "sigma": 0.02},
        ]
    )
    assert [type(x) for x in t.transforms] == [RotateY, ScaleAndTranslate, Translate, Jitter]
    assert t.transforms[1].translate_range == 0.1 and t.transforms[3].sigma == 0.02
    pc = _points()
    torch.testing.assert_close(t(pc, _gen()), t(pc, _gen()), rtol=0, atol=0)
    assert len(build_transforms(None)) == 0 and len(build_transforms([])) == 0
    assert "RandomDropout" in TRANSFORMS.list()


@pytest.mark.parametrize(
    "spec, match",
    [
        (["NoSuchTransform"], "NoSuchTransform"),
        ([{"NAME": "Jitter", "sigmaa": 0.1}], "sigmaa"),
        ([{"NAME": "Jitter", "sigma": "big"}], "sigma"),
        ([{"sigma": 0.1}], "NAME"),
        ([3], "transforms\\[0\\]"),
        ("RotateY", "list"),
        ({"NAME": "RotateY"}, "list"),
    ],
)
def test_build_transforms_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_transforms(spec)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ScaleAndTranslate(scale_low=2.0, scale_high=1.0),
        lambda: Scale(lo=1.5, hi=1.0),
        lambda: Translate(range=-0.1),
        lambda: Jitter(sigma=-1.0),
        lambda: RandomDropout(max_dropout_ratio=1.0),
        lambda: RotatePerturbation(angle_clip=float("nan")),
    ],
)
def test_bad_parameters_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize(
    "bad", [torch.zeros(10, 3), torch.zeros(2, 10, 4), torch.zeros(2, 10, 3, dtype=torch.long)]
)
def test_bad_points_raise_data_error(bad):
    with pytest.raises(DataError):
        Jitter()(bad, _gen())


def test_pc_norm_numpy_and_torch():
    pc = _points(dtype=torch.float64) * 3 + 5
    out = pc_norm(pc)
    ref = []
    for i in range(B):
        centred = pc[i].numpy() - pc[i].numpy().mean(axis=0)
        ref.append(centred / np.max(np.sqrt((centred**2).sum(axis=1))))
    np.testing.assert_allclose(out.numpy(), np.stack(ref), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pc_norm(pc.numpy()), np.stack(ref), rtol=1e-12, atol=1e-12)
    single = pc_norm(pc[0].float().numpy())
    assert single.dtype == np.float32 and single.shape == (N, 3)
    assert abs(float(np.linalg.norm(single, axis=1).max()) - 1.0) < 1e-6
    assert pc_norm(pc.float()).dtype == torch.float32
    flat = pc_norm(torch.ones(4, 3))
    assert torch.equal(flat, torch.zeros(4, 3))  # degenerate cloud: centred, no NaN
    with pytest.raises(TypeError):
        pc_norm([[0.0, 0.0, 0.0]])
