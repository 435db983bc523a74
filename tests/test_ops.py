"""Point ops against slow, obviously correct references (Python loops / brute force in float64)."""

from __future__ import annotations

import itertools
import logging
import sys

import pytest
import torch

from extensions import Patches, backends, chamfer_l1, chamfer_l2, emd, fps, gather, group, knn
from extensions.pointops import dispatch, reference
from utils.errors import ConfigError, DataError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", "accelerator"])
def formulation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the CPU formulations and, on the CPU, with the fewest-kernel accelerator ones."""
    if request.param == "accelerator":
        monkeypatch.setattr(reference, "launch_bound", lambda x: True)
    return request.param


def _cloud(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive_fps(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """FPS by Python loops in float64: start at 0, strict '>' so ties keep the lowest index."""
    x = xyz.double().tolist()
    out = []
    for cloud in x:
        dist = [float("inf")] * len(cloud)
        far, chosen = 0, []
        for _ in range(npoint):
            chosen.append(far)
            c = cloud[far]
            for i, p in enumerate(cloud):
                dist[i] = min(dist[i], sum((p[j] - c[j]) ** 2 for j in range(3)))
            best = 0
            for i in range(1, len(cloud)):
                if dist[i] > dist[best]:
                    best = i
            far = best
        out.append(chosen)
    return torch.tensor(out, dtype=torch.long).reshape(len(x), npoint)


def brute_sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.double()[:, :, None] - b.double()[:, None]) ** 2).sum(-1)


def brute_chamfer(a: torch.Tensor, b: torch.Tensor, reduction: str, l1: bool) -> torch.Tensor:
    d = brute_sqdist(a, b) if a.dtype != torch.float64 else ((a[:, :, None] - b[:, None]) ** 2).sum(-1)
    d1, d2 = d.min(2)[0], d.min(1)[0]
    if l1:
        d1, d2 = d1.sqrt(), d2.sqrt()
    value = d1.mean() + d2.mean() if reduction == "mean" else d1.mean(1) + d2.mean(1)
    return value / 2 if l1 else value


def lattice(side: int) -> torch.Tensor:
    """(1, side**3, 3) integer lattice: many exactly tied distances."""
    r = torch.arange(float(side))
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(1, -1, 3)


# ----------------------------------------------------------------------------------------- fps
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("n", [7, 64, 300])
@pytest.mark.parametrize("m", [1, 5, 32])
def test_fps_matches_naive_loop(b: int, n: int, m: int, formulation: str) -> None:
    x = _cloud(b, n, 3, seed=n + m)
    if m > n:
        with pytest.raises(DataError, match="npoint=32 must lie in"):
            fps(x, m)
        return
    idx = fps(x, m)
    assert idx.dtype == torch.long and idx.shape == (b, m)
    assert torch.equal(idx, naive_fps(x, m))
    assert torch.equal(reference.fps(x, m, max_elements=1), idx)  # without the distance matrix
    assert torch.equal(idx[:, 0], torch.zeros(b, dtype=torch.long))


def test_fps_ties_go_to_lowest_index(formulation: str) -> None:
    x = lattice(4)
    assert torch.equal(fps(x, 64), naive_fps(x, 64))
    assert torch.equal(reference.fps(x, 64, max_elements=1), naive_fps(x, 64))  # no distance matrix
    assert torch.equal(fps(x.double(), 40), naive_fps(x, 40))


def test_fps_duplicate_points(formulation: str) -> None:
    base = _cloud(2, 10, 3, seed=3)
    x = base.repeat(1, 3, 1)
    idx = fps(x, 15)
    assert torch.equal(idx, naive_fps(x, 15))
    assert bool((idx[:, :10] < 10).all())  # the first copy of each point wins the tie
    assert bool((idx[:, 10:] == 0).all())  # all distances 0: argmax returns index 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_fps_dtypes(dtype: torch.dtype) -> None:
    x = _cloud(2, 100, 3, seed=5).to(dtype)
    assert torch.equal(fps(x, 16), naive_fps(x.float(), 16))


def test_fps_edge_cases() -> None:
    x = _cloud(2, 9, 3)
    assert fps(x, 0).shape == (2, 0)
    assert sorted(fps(x, 9)[0].tolist()) == list(range(9))
    assert fps(x.transpose(1, 2).contiguous().transpose(1, 2), 4).shape == (2, 4)
    with pytest.raises(DataError, match=r"shape \(B, N, 3\)"):
        fps(_cloud(2, 9, 2), 3)
    with pytest.raises(DataError, match="floating-point"):
        fps(torch.zeros(1, 4, 3, dtype=torch.long), 2)


# ----------------------------------------------------------------------------------------- knn
@pytest.mark.parametrize("b,m,n,k", [(1, 1, 7, 1), (3, 5, 64, 8), (2, 32, 300, 32), (2, 4, 6, 6)])
def test_knn_matches_brute_force_sort(b: int, m: int, n: int, k: int, formulation: str) -> None:
    ref = _cloud(b, n, 3, seed=1)
    query = _cloud(b, m, 3, seed=2)
    dist, idx = knn(query, ref, k)
    full = brute_sqdist(query, ref).sqrt()
    want_dist, want_idx = full.sort(-1)
    assert idx.dtype == torch.long and idx.shape == (b, m, k)
    assert torch.equal(idx.sort(-1)[0], want_idx[..., :k].sort(-1)[0])
    torch.testing.assert_close(dist.double(), want_dist[..., :k], rtol=1e-5, atol=1e-6)
    assert bool((dist[..., 1:] >= dist[..., :-1]).all())
    unsorted = knn(query, ref, k, sorted=False)
    assert torch.equal(unsorted.idx.sort(-1)[0], idx.sort(-1)[0])


def test_knn_query_in_ref_comes_first_at_zero(formulation: str) -> None:
    ref = _cloud(2, 200, 3, seed=4) * 10 + 50  # far from the origin: matmul distances would fail
    dist, idx = knn(ref[:, :20], ref, 4)
    assert torch.equal(idx[..., 0], torch.arange(20).expand(2, 20))
    assert bool((dist[..., 0] == 0).all())


def test_knn_chunked_equals_dense_and_dist_grad(formulation: str) -> None:
    ref = _cloud(3, 50, 3, seed=6)
    query = _cloud(3, 20, 3, seed=7)
    dense = reference.knn(query, ref, 5)
    for budget in (2000, 60):  # batch chunks, then row chunks
        chunked = reference.knn(query, ref, 5, max_elements=budget)
        assert torch.equal(chunked.idx, dense.idx)
        torch.testing.assert_close(chunked.dist, dense.dist)
    q = query.double().requires_grad_()
    r = ref.double().requires_grad_()
    knn(q, r, 5).dist.sum().backward()
    q2 = query.double().requires_grad_()
    r2 = ref.double().requires_grad_()
    full = (q2[:, :, None] - r2[:, None]).square().sum(-1).sqrt()
    full.gather(2, dense.idx).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(r.grad, r2.grad)
    with pytest.raises(DataError, match=r"k=51 must lie in \[1, N=50\]"):
        knn(query, ref, 51)


# -------------------------------------------------------------------------------------- gather
def test_gather_matches_indexing_and_is_differentiable(formulation: str) -> None:
    x = _cloud(3, 10, 4, seed=8, dtype=torch.float64).requires_grad_()
    idx = torch.randint(0, 10, (3, 5, 2), generator=torch.Generator().manual_seed(0))
    out = gather(x, idx)
    assert out.shape == (3, 5, 2, 4)
    want = torch.stack([x[i][idx[i]] for i in range(3)])
    assert torch.equal(out, want)
    assert torch.equal(gather(x, idx.int()), want)
    assert torch.autograd.gradcheck(lambda t: gather(t, idx), (x,))
    with pytest.raises(DataError, match="idx"):
        gather(x, idx[:2])


# --------------------------------------------------------------------------------------- group
def test_group_shapes_and_relative_neighbourhoods(formulation: str) -> None:
    xyz = _cloud(2, 128, 3, seed=9)
    patches = group(xyz, 16, 8)
    assert isinstance(patches, Patches)
    assert patches.neighborhood.shape == (2, 16, 8, 3)
    assert patches.center.shape == (2, 16, 3)
    assert patches.idx.shape == (2, 16, 8) and patches.idx.dtype == torch.long
    centre_idx = naive_fps(xyz, 16)
    assert torch.equal(patches.center, torch.stack([xyz[i][centre_idx[i]] for i in range(2)]))
    assert torch.equal(patches.idx[..., 0], centre_idx)  # first neighbour is the centre itself
    assert bool((patches.neighborhood[..., 0, :] == 0).all())
    absolute = torch.stack([xyz[i][patches.idx[i]] for i in range(2)])
    torch.testing.assert_close(patches.neighborhood, absolute - patches.center[:, :, None])
    want = brute_sqdist(patches.center, xyz).sort(-1)[1][..., :8]
    assert torch.equal(patches.idx.sort(-1)[0], want.sort(-1)[0])


def test_group_gradient_flows_to_points() -> None:
    xyz = _cloud(1, 40, 3, seed=10).requires_grad_()
    patches = group(xyz, 4, 6)
    (patches.neighborhood.sum() + patches.center.sum()).backward()
    assert xyz.grad is not None and bool(torch.isfinite(xyz.grad).all())


@pytest.mark.parametrize(
    "xyz,num_group,group_size,message",
    [
        (torch.zeros(2, 64, 2), 8, 4, r"group: xyz must have shape \(B, N, 3\), got \(2, 64, 2\)"),
        (torch.zeros(64, 3), 8, 4, r"must have shape \(B, N, 3\), got \(64, 3\)"),
        (torch.zeros(2, 64, 3, dtype=torch.int64), 8, 4, "floating-point tensor, got dtype torch.int64"),
        (torch.zeros(2, 6, 3), 8, 4, "N=6 points, fewer than num_group=8"),
        (torch.zeros(2, 6, 3), 4, 32, "N=6 points, fewer than group_size=32"),
    ],
)
def test_group_rejects_bad_input(xyz: torch.Tensor, num_group: int, group_size: int, message: str) -> None:
    with pytest.raises(DataError, match=message):
        group(xyz, num_group, group_size)


def test_group_rejects_non_finite_coordinates() -> None:
    xyz = _cloud(3, 64, 3, seed=11)
    xyz[0, 5, 1] = float("nan")
    xyz[2, 7] = float("inf")
    with pytest.raises(
        DataError,
        match=r"4 non-finite \(NaN/inf\) coordinates in 2 points, in 2 of 3 batch "
        r"entries: \[0, 2\]",
    ):
        group(xyz, 8, 4)


def test_group_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_group=0"):
        group(_cloud(1, 8, 3), 0, 4)


# ------------------------------------------------------------------------------------- chamfer
@pytest.mark.parametrize("op,l1", [(chamfer_l2, False), (chamfer_l1, True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("b,n,m", [(1, 1, 1), (3, 7, 5), (4, 32, 32), (2, 50, 20)])
def test_chamfer_values(op, l1: bool, reduction: str, b: int, n: int, m: int, formulation: str) -> None:
    a = _cloud(b, n, 3, seed=12)
    c = _cloud(b, m, 3, seed=13)
    value = op(a, c, reduction)
    assert value.shape == (() if reduction == "mean" else (b,))
    torch.testing.assert_close(value.double(), brute_chamfer(a, c, reduction, l1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op,l1", [(chamfer_l2, False), (chamfer_l1, True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chamfer_gradients(op, l1: bool, reduction: str, formulation: str) -> None:
    a = _cloud(2, 3, 3, seed=14, dtype=torch.float64).requires_grad_()
    c = _cloud(2, 2, 3, seed=15, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: op(x, y, reduction), (a, c))
    a = _cloud(3, 32, 3, seed=16, dtype=torch.float64).requires_grad_()
    c = _cloud(3, 24, 3, seed=17, dtype=torch.float64).requires_grad_()
    a2 = a.detach().clone().requires_grad_()
    c2 = c.detach().clone().requires_grad_()
    weights = torch.arange(1.0, 4.0, dtype=torch.float64) if reduction == "none" else 1.0
    (op(a, c, reduction) * weights).sum().backward()
    (brute_chamfer(a2, c2, reduction, l1) * weights).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(c.grad, c2.grad)


@pytest.mark.parametrize("op", [chamfer_l2, chamfer_l1])
def test_chamfer_identical_clouds_is_zero_with_finite_grad(op, formulation: str) -> None:
    a = _cloud(2, 16, 3, seed=18).requires_grad_()
    for reduction in ("mean", "none"):
        value = op(a, a.detach().clone(), reduction)
        assert bool((value == 0).all())
    op(a, a.detach().clone()).backward()
    assert bool((a.grad == 0).all())


def test_chamfer_large_path_equals_dense_path(formulation: str) -> None:
    a = _cloud(5, 120, 3, seed=19)
    c = _cloud(5, 90, 3, seed=20)
    dense_idx = reference.nearest_indices(a, c)
    for budget in (3 * 120 * 90, 2000):  # batch chunks, then row chunks
        chunked_idx = reference.nearest_indices(a, c, max_elements=budget)
        assert torch.equal(chunked_idx[0], dense_idx[0]) and torch.equal(chunked_idx[1], dense_idx[1])
        for fn in (reference.chamfer_l2, reference.chamfer_l1):
            x = a.clone().requires_grad_()
            y = c.clone().requires_grad_()
            x2 = a.clone().requires_grad_()
            y2 = c.clone().requires_grad_()
            big = fn(x, y, "none", max_elements=budget)
            small = fn(x2, y2, "none")
            torch.testing.assert_close(big, small)
            big.sum().backward()
            small.sum().backward()
            torch.testing.assert_close(x.grad, x2.grad)
            torch.testing.assert_close(y.grad, y2.grad)


def test_chamfer_low_precision_and_errors() -> None:
    a = _cloud(2, 20, 3, seed=21)
    c = _cloud(2, 30, 3, seed=22)
    value = chamfer_l2(a.bfloat16(), c.bfloat16())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, chamfer_l2(a.bfloat16().float(), c.bfloat16().float()))
    with pytest.raises(ValueError, match="reduction"):
        chamfer_l2(a, c, "sum")
    with pytest.raises(DataError, match="differ in batch size"):
        chamfer_l2(a, c[:1])


# ----------------------------------------------------------------------------------------- emd
def brute_emd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = brute_sqdist(a, b)
    n = a.shape[1]
    best = [
        min(sum(d[i, j, p[j]].item() for j in range(n)) for p in itertools.permutations(range(n)))
        for i in range(a.shape[0])
    ]
    return torch.tensor(best, dtype=torch.float64) / n


@pytest.mark.parametrize("n", [1, 3, 6])
def test_emd_matches_permutation_minimum(n: int) -> None:
    a = _cloud(3, n, 3, seed=23)
    c = _cloud(3, n, 3, seed=24)
    want = brute_emd(a, c)
    torch.testing.assert_close(emd(a, c, "none").double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emd(a, c).double(), want.mean(), rtol=1e-5, atol=1e-6)
    # a matching costs at least the nearest neighbour in each direction
    assert bool((emd(a, c, "none") >= chamfer_l2(a, c, "none") / 2 - 1e-6).all())


def test_emd_permutation_invariance_and_gradient() -> None:
    a = _cloud(2, 6, 3, seed=25, dtype=torch.float64).requires_grad_()
    shuffled = a.detach()[:, torch.randperm(6, generator=torch.Generator().manual_seed(1))]
    assert bool((emd(a, shuffled, "none") == 0).all())
    a, c = a[:, :3], _cloud(2, 3, 3, seed=26, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: emd(x, y, "none"), (a, c))
    with pytest.raises(DataError, match="equal-size"):
        emd(a, c[:, :2])


# -------------------------------------------------------------------------------- dispatching
def test_backends_report_every_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GM3D_OPS", "reference")
    names = backends()
    assert set(names) == {"fps", "knn", "gather", "group", "chamfer_l2", "chamfer_l1", "emd"}
    assert names["fps"] == "reference"
    monkeypatch.delenv("GM3D_OPS")
    assert backends()["fps"] == "reference"  # quickfps is not tie-exact: never used by default
    monkeypatch.setenv("GM3D_OPS", "bogus")
    with pytest.raises(ConfigError, match="GM3D_OPS='bogus'"):
        backends()


def test_accelerator_import_failure_is_harmless(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(dispatch, "_quickfps", None)
    monkeypatch.setattr(dispatch, "_quickfps_loaded", False)
    monkeypatch.setitem(sys.modules, "torch_quickfps", None)  # makes the import raise ImportError
    monkeypatch.setenv("GM3D_OPS", "fast")
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        assert backends()["fps"] == "reference"
        x = _cloud(2, 50, 3)
        assert torch.equal(fps(x, 8), naive_fps(x, 8))
    assert sum("torch-quickfps unavailable" in r.getMessage() for r in caplog.records) == 1


def test_reference_and_accelerator_fps_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    if dispatch.load_quickfps() is None:
        pytest.skip("torch-quickfps is not installed (pip install --no-deps torch-quickfps==2.1.0)")
    clouds = [_cloud(b, n, 3, seed=b * n) for b, n in [(1, 7), (3, 64), (3, 300), (8, 1024)]]
    monkeypatch.setenv("GM3D_OPS", "reference")
    want = [fps(x, min(32, x.shape[1])) for x in clouds]
    monkeypatch.setenv("GM3D_OPS", "fast")
    assert backends()["fps"] == "quickfps"
    for x, w in zip(clouds, want):
        assert torch.equal(fps(x, w.shape[1]), w)
        assert torch.equal(fps(x.double(), w.shape[1]), w)


# ---------------------------------------------------------------------------------------- cuda
@CUDA
def test_cuda_matches_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    xyz = _cloud(4, 512, 3, seed=27)
    a = _cloud(64, 32, 3, seed=28)
    c = _cloud(64, 32, 3, seed=29)
    for policy in ("reference", "fast"):
        monkeypatch.setenv("GM3D_OPS", policy)
        assert torch.equal(fps(xyz.cuda(), 32).cpu(), fps(xyz, 32))
    patches, patches_gpu = group(xyz, 32, 16), group(xyz.cuda(), 32, 16)
    assert torch.equal(patches_gpu.idx.cpu(), patches.idx)
    torch.testing.assert_close(patches_gpu.neighborhood.cpu(), patches.neighborhood)
    idx = knn(xyz[:, :64].cuda(), xyz.cuda(), 8).idx
    assert torch.equal(idx.cpu().sort(-1)[0], knn(xyz[:, :64], xyz, 8).idx.sort(-1)[0])
    for op in (chamfer_l2, chamfer_l1):
        x = a.cuda().requires_grad_()
        value = op(x, c.cuda(), "none")
        value.sum().backward()
        torch.testing.assert_close(value.cpu(), op(a, c, "none"), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(emd(a[:4].cuda(), c[:4].cuda()).cpu(), emd(a[:4], c[:4]))


@CUDA
def test_cuda_large_chamfer_and_gather() -> None:
    a = _cloud(4, 1024, 3, seed=30).cuda()
    c = _cloud(4, 1024, 3, seed=31).cuda()
    torch.testing.assert_close(reference.chamfer_l2(a, c, max_elements=1 << 18), chamfer_l2(a, c))
    idx = torch.randint(0, 1024, (4, 7, 3), device="cuda")
    assert torch.equal(gather(a, idx).cpu(), gather(a.cpu(), idx.cpu()))
