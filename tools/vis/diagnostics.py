"""Is a GC scorer content-blind? Diagnostics of patch scores on a fixed probe batch.

Every statistic takes a ``score_fn(groups) -> (B, G)`` (for a GM3D model, by default, the EMA teacher's
``model.teacher_scores``), so any other scorer can be measured the same way, and ``groups`` as the
model's ``group`` returns them for a fixed batch of clouds. The scorer must score every cloud on its
own (an eval-mode model does): the shuffled and rotated copies of the batch are scored in one call.
Spearman correlations are per cloud, then averaged over clouds.

* :func:`content_shuffle_rho`: permute the patch contents (``neighborhood``) among a cloud's patches,
  keep the centres, rescore: 1.0 means the scores ignore what is inside the patches.
* :func:`rotation_rho`: rotate whole clouds about the up axis (y) without regrouping (neighbourhoods and
  centres both, so every patch keeps its identity): a score that follows the patch's geometry keeps its
  ranking; a world-position score does not. :func:`position_rotation_rho` is the same statistic for the
  affine position fit of the unrotated scores, the reference that a pure world-position score gives.
* :func:`target_agreement`: Spearman of the scores with the student's mask-averaged GC training target,
  next to a small MLP of the centre's coordinates fitted to the same target (:func:`position_baseline`):
  a scorer that does not beat the position-only baseline has learned nothing beyond position.
* :func:`bn_statistics`: mean ``running_var`` of every BatchNorm of the student and of the EMA teacher.

Multi-scale backbones (Point-M2AE, a list of :class:`~extensions.Patches`, mask scale last) are handled
by the rotation test and the target statistics; the content shuffle raises :class:`MultiScaleError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from extensions import Patches
from models.losses import spearman_per_row
from tools.vis.forward import mask_generator, random_masker
from tools.vis.loading import NoGCDecoderError, is_gm3d

log = logging.getLogger(__name__)

__all__ = ["ANGLES", "SHUFFLE_SEEDS", "TARGET_SEEDS", "BNStats", "MultiScaleError", "Probe",
           "bn_statistics", "content_shuffle_rho", "diagnose", "finite_or_none", "linear_position_baseline",
           "mask_averaged_target", "mask_scale_patches", "position_baseline", "position_fit",
           "position_rotation_rho", "probe_indices", "rotate_patches", "rotation_rho", "shuffle_contents",
           "spearman_valid", "target_agreement"]

SHUFFLE_SEEDS = (0, 1, 2)
ANGLES = (90.0, 180.0, 270.0)       # degrees about the up axis y
TARGET_SEEDS = tuple(range(6))      # random masks averaged into the per-patch training target

ScoreFn = Callable[[Any], torch.Tensor]


class MultiScaleError(ValueError):
    """A statistic that is defined for one scale of patches was given a multi-scale grouping."""


def probe_indices(n: int, k: int | None) -> list[int]:
    """``k`` item indices spread evenly over ``n`` items (all of them for ``k`` None or >= n): the data
    sets of the project list their items class by class, so the first ``k`` would be one or two classes."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({(i * n) // k for i in range(max(k, 0))})


def spearman_valid(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Spearman per row of ``a`` and ``b`` (B, G) over the entries where ``valid`` (B, G) is True; NaN for
    a row with fewer than 3 valid entries."""
    if valid is None:
        return spearman_per_row(a, b)
    out = torch.full((a.shape[0],), float("nan"))
    for i in range(a.shape[0]):
        v = valid[i]
        if int(v.sum()) >= 3:
            out[i] = spearman_per_row(a[i, v][None], b[i, v][None])[0].cpu()
    return out


def _mean(x: torch.Tensor) -> float:
    x = x.float()
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")


def _multiscale(groups) -> bool:
    """Whether ``groups`` is one :class:`Patches` per scale (a Patches is a tuple itself)."""
    return isinstance(groups, (list, tuple)) and not isinstance(groups, Patches)


def mask_scale_patches(groups) -> Patches:
    """The mask-scale :class:`Patches` of a grouping (the last scale of a multi-scale one)."""
    return groups[-1] if _multiscale(groups) else groups


# ---------------------------------------------------------------------------------- content shuffle
def shuffle_contents(groups: Patches, perm: torch.Tensor) -> Patches:
    """The patches with their contents permuted per cloud: patch ``g`` of cloud ``b`` gets the
    neighbourhood (and point indices) of patch ``perm[b, g]``; the centres stay where they are."""
    if _multiscale(groups):
        raise MultiScaleError(
            "the content shuffle needs one scale of patches, got a multi-scale grouping (Point-M2AE): the "
            "mask-scale tokens are built from the finer scales, whose patches are not one-to-one with the "
            "mask-scale patches, so swapping mask-scale neighbourhoods would not move the content")
    b = torch.arange(perm.shape[0], device=perm.device)[:, None]
    return Patches(groups.neighborhood[b, perm], groups.center, groups.idx[b, perm])


def _cat(variants: Sequence[Any]):
    """Groupings of the same clouds concatenated along the batch (every scale of a multi-scale one)."""
    if _multiscale(variants[0]):
        return [_cat([v[i] for v in variants]) for i in range(len(variants[0]))]
    return Patches(*(torch.cat(parts) for parts in zip(*variants)))


def _scores_of(score_fn: ScoreFn, variants: Sequence[Any]) -> list[torch.Tensor]:
    """``score_fn`` of each grouping, in one batched call (the scorer treats clouds independently)."""
    return list(score_fn(_cat(variants)).float().chunk(len(variants)))


@torch.no_grad()
def content_shuffle_rho(score_fn: ScoreFn, groups: Patches, seeds: Sequence[int] = SHUFFLE_SEEDS,
                        base: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) Spearman between the scores (``base``, computed when None) and the scores after
    :func:`shuffle_contents` at the same patch positions, averaged over one random permutation per seed.
    1.0 = content-blind."""
    center = mask_scale_patches(groups).center
    B, G = center.shape[:2]
    perms = [torch.rand(B, G, generator=mask_generator(s)).argsort(1).to(center.device) for s in seeds]
    shuffled = [shuffle_contents(groups, perm) for perm in perms]        # refuses a multi-scale grouping
    base, *scores = _scores_of(score_fn, [groups, *shuffled]) if base is None else \
        [base.float(), *_scores_of(score_fn, shuffled)]
    return torch.stack([spearman_per_row(base, s).cpu() for s in scores]).mean(0)


# ---------------------------------------------------------------------------------- rotation
def _rot_y(angle_deg: float, like: torch.Tensor) -> torch.Tensor:
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=like.dtype, device=like.device)


def rotate_patches(groups, angle_deg: float):
    """The patches of whole clouds rotated by ``angle_deg`` about the up axis y, without regrouping:
    neighbourhoods and centres of every scale rotate, the point indices stay (same patch identity)."""
    if _multiscale(groups):
        return [rotate_patches(p, angle_deg) for p in groups]
    r = _rot_y(angle_deg, groups.center).T
    return Patches(groups.neighborhood @ r, groups.center @ r, groups.idx)


@torch.no_grad()
def rotation_rho(score_fn: ScoreFn, groups, angles: Sequence[float] = ANGLES,
                 base: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) Spearman between a patch's score before (``base``, computed when None) and after
    :func:`rotate_patches`, mean over ``angles``."""
    rotated = [rotate_patches(groups, a) for a in angles]
    base, *scores = _scores_of(score_fn, [groups, *rotated]) if base is None else \
        [base.float(), *_scores_of(score_fn, rotated)]
    return torch.stack([spearman_per_row(base, s).cpu() for s in scores]).mean(0)


def _affine_design(center: torch.Tensor) -> torch.Tensor:
    return torch.cat([center.double(), torch.ones_like(center[..., :1], dtype=torch.float64)], -1)


def position_fit(scores: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cloud least-squares affine fit of the scores (B, G) on the centres (B, G, 3): the weights
    (B, 4, 1) and the share of score variance it explains, R^2 (B,)."""
    X, y = _affine_design(center), scores.double()[..., None]
    w = torch.linalg.lstsq(X.cpu(), y.cpu()).solution.to(X.device)
    res = ((X @ w - y) ** 2).sum((1, 2))
    tot = ((y - y.mean(1, keepdim=True)) ** 2).sum((1, 2)).clamp_min(1e-24)
    return w, (1.0 - res / tot).float().cpu()


@torch.no_grad()
def position_rotation_rho(scores: torch.Tensor, groups, angles: Sequence[float] = ANGLES) -> torch.Tensor:
    """(B,) :func:`rotation_rho` of the pure-position reference: the affine fit of ``scores`` (the
    unrotated cloud's) on the mask-scale centres, evaluated at the rotated centres. What a score that is
    a function of world position alone would give."""
    center = mask_scale_patches(groups).center
    w, _ = position_fit(scores, center)
    ref = (_affine_design(center) @ w)[..., 0]
    rhos = []
    for a in angles:
        rot = (_affine_design(mask_scale_patches(rotate_patches(groups, a)).center) @ w)[..., 0]
        rhos.append(spearman_per_row(ref, rot).cpu())
    return torch.stack(rhos).mean(0)


# ---------------------------------------------------------------------------------- training target
@torch.no_grad()
def mask_averaged_target(model: nn.Module, groups, seeds: Sequence[int] = TARGET_SEEDS
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's GC training target (``per_patch_terms(...)[3]``) per mask-scale patch, averaged over
    random masks (one per seed, with the model's GM3D masked count) that hide the patch.

    Returns ``target`` (B, G) and ``count`` (B, G), how many masks hid the patch (``target`` is 0 where
    ``count`` is 0)."""
    centers = model.mask_centers(groups)
    masker = random_masker(model.masker)
    masks = torch.stack([masker(centers, generator=mask_generator(s), epoch=0).to(centers.device)
                         for s in seeds])                                               # (S, B, G)
    return model.mean_target(groups, masks)


def _standardise(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``target`` (B, G) standardised per cloud over its valid entries."""
    t, v = target.detach().float().cpu(), valid.cpu().float()
    n = v.sum(1, keepdim=True).clamp_min(1)
    mu = (t * v).sum(1, keepdim=True) / n
    sd = (((t - mu) ** 2) * v).sum(1, keepdim=True).div(n).sqrt()
    return (t - mu) / sd.clamp_min(1e-12)


def position_baseline(center: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, train: torch.Tensor,
                      *, hidden: int = 64, steps: int = 300, lr: float = 1e-2, seed: int = 0,
                      check_every: int = 10) -> torch.Tensor:
    """A 3-``hidden``-``hidden``-1 MLP of the centre's coordinates fitted to the per-cloud standardised
    ``target`` on the clouds ``train`` (B,) bool, where ``valid``; returns its predictions (B, G) on every
    cloud. The caller's RNG is untouched.

    Up to ``steps`` of full-batch Adam on the MSE over the first three quarters of the ``train`` clouds;
    the weights kept are those with the lowest MSE on the last quarter, checked every ``check_every``
    steps (with a dozen clouds, 300 plain steps fit the training clouds' noise and rank new clouds
    worse than a linear function of position does).
    """
    x, z, v = center.detach().float().cpu(), _standardise(target, valid), valid.cpu().float()
    idx = train.cpu().nonzero()[:, 0]
    n_val = len(idx) // 4 if len(idx) >= 2 else 0
    fit, val = idx[:len(idx) - n_val], idx[len(idx) - n_val:]

    def mse(mlp, rows):
        w = v[rows]
        return ((((mlp(x[rows])[..., 0] - z[rows]) ** 2) * w).sum() / w.sum().clamp_min(1))

    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, 1))
        params = list(mlp.parameters())
        m1 = [torch.zeros_like(q) for q in params]
        m2 = [torch.zeros_like(q) for q in params]
        best, best_loss = [q.detach().clone() for q in params], float("inf")
        for step in range(1, steps + 1):     # Adam, by hand: torch.optim would import torch._dynamo (seconds)
            grads = torch.autograd.grad(mse(mlp, fit), params)
            with torch.no_grad():
                for q, g, a, b in zip(params, grads, m1, m2):
                    a.lerp_(g, 0.1)
                    b.lerp_(g * g, 0.001)
                    q.sub_(lr * (a / (1 - 0.9 ** step)) / ((b / (1 - 0.999 ** step)).sqrt() + 1e-8))
                if n_val and (step % check_every == 0 or step == steps):
                    loss = float(mse(mlp, val))
                    if loss < best_loss:
                        best, best_loss = [q.detach().clone() for q in params], loss
    with torch.no_grad():
        if n_val:
            for q, b in zip(params, best):
                q.copy_(b)
        return mlp(x)[..., 0]


def linear_position_baseline(center: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                             train: torch.Tensor) -> torch.Tensor:
    """One least-squares affine function of the centre's coordinates fitted to the per-cloud standardised
    ``target`` over the valid entries of the clouds ``train``; its predictions (B, G) on every cloud."""
    X = _affine_design(center.detach().cpu())
    z, v = _standardise(target, valid).double(), valid.cpu()
    rows = v & train.cpu()[:, None]
    w = torch.linalg.lstsq(X[rows], z[rows][:, None]).solution
    return (X @ w)[..., 0].float()


@torch.no_grad()
def target_agreement(model: nn.Module, groups, scores: torch.Tensor, seeds: Sequence[int] = TARGET_SEEDS
                     ) -> dict[str, float]:
    """How well ``scores`` (B, G) rank the student's mask-averaged training target
    (:func:`mask_averaged_target`), next to the position-only MLP (:func:`position_baseline`) fitted on
    the first half of the clouds and evaluated on the second.

    Returns ``target_rho`` (all clouds), and on the held-out half ``target_rho_heldout``,
    ``position_baseline_rho`` (the MLP) and ``position_linear_rho`` (one affine function of the centre,
    :func:`linear_position_baseline`); NaN with fewer than 2 clouds."""
    target, count = mask_averaged_target(model, groups, seeds)
    valid = (count > 0).cpu()
    scores, target = scores.float().cpu(), target.cpu()
    out = {"target_rho": _mean(spearman_valid(scores, target, valid))}
    B = scores.shape[0]
    if B < 2:
        return {**out, **dict.fromkeys(("target_rho_heldout", "position_baseline_rho", "position_linear_rho"),
                                       float("nan"))}
    train, center = torch.arange(B) < B // 2, model.mask_centers(groups)
    test = ~train
    out["target_rho_heldout"] = _mean(spearman_valid(scores[test], target[test], valid[test]))
    for key, fn in (("position_baseline_rho", position_baseline), ("position_linear_rho",
                                                                   linear_position_baseline)):
        pred = fn(center, target, valid, train)
        out[key] = _mean(spearman_valid(pred[test], target[test], valid[test]))
    return out


# ---------------------------------------------------------------------------------- BatchNorm
@dataclass
class BNStats:
    """Mean ``running_var`` of each student BatchNorm and of its EMA-teacher twin (teacher / student)."""

    layers: list[dict[str, Any]] = field(default_factory=list)   # {name, student_var, teacher_var, ratio}

    @property
    def median_ratio(self) -> float:
        r = torch.tensor([x["ratio"] for x in self.layers])
        return float(r.median()) if r.numel() else float("nan")

    @property
    def worst(self) -> dict[str, Any] | None:
        """The layer whose ratio is farthest from 1 (in log scale)."""
        return max(self.layers, key=lambda x: abs(math.log(max(x["ratio"], 1e-30))), default=None)

    def summary(self) -> dict[str, Any]:
        w = self.worst
        return {"median_ratio": self.median_ratio, "worst_layer": w["name"] if w else None,
                "worst_ratio": w["ratio"] if w else float("nan"), "layers": self.layers}


def bn_statistics(model: nn.Module) -> BNStats:
    """For every BatchNorm of a GM3D model's student (its modules outside ``ema.`` and
    ``knowledge_teacher.``) that tracks running statistics, the mean ``running_var`` of it and of the
    same-named module of ``model.ema``, and their ratio teacher / student."""
    if not hasattr(model, "ema"):
        raise NoGCDecoderError(f"{type(model).__name__} has no EMA teacher to compare BatchNorm "
                               f"statistics with")
    teacher = dict(model.ema.named_modules())
    stats = BNStats()
    for name, m in model.named_modules():
        if name.startswith(("ema.", "knowledge_teacher.")) or name in ("ema", "knowledge_teacher"):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            t = teacher.get(name)
            if t is None or getattr(t, "running_var", None) is None:
                raise KeyError(f"BatchNorm {name} of the student has no twin with running statistics "
                               f"in model.ema")
            s_var, t_var = float(m.running_var.float().mean()), float(t.running_var.float().mean())
            stats.layers.append({"name": name, "student_var": s_var, "teacher_var": t_var,
                                 "ratio": t_var / max(s_var, 1e-30)})
    return stats


# ---------------------------------------------------------------------------------- all together
@dataclass
class Probe:
    """A fixed probe batch: clouds (B, N, 3) and the dataset indices they came from."""

    points: torch.Tensor
    indices: list[int]

    @classmethod
    def from_dataset(cls, dataset, k: int | None) -> Probe:
        idx = probe_indices(len(dataset), k)
        pts = [torch.as_tensor(dataset[i]["points"], dtype=torch.float32)[:, :3] for i in idx]
        return cls(torch.stack(pts), idx)


@torch.no_grad()
def diagnose(model: nn.Module, points: torch.Tensor, score_fn: ScoreFn | None = None, *,
             targets: bool = True) -> dict[str, Any]:
    """Every diagnostic on one probe batch ``points`` (B, N, 3) for a GM3D ``model`` (eval mode, no
    gradients; the caller's mode is restored). ``score_fn`` defaults to ``model.teacher_scores``.

    Returns floats ``shuffle_rho``, ``rotation_rho``, ``position_rotation_rho``, ``position_r2``,
    ``target_rho``, ``target_rho_heldout``, ``position_baseline_rho``, ``position_linear_rho`` (the last
    four with ``targets``),
    ``bn`` (:meth:`BNStats.summary`, absent for a model without an EMA teacher), ``shapes`` and
    ``skipped``: statistic -> why it was not computed (for instance the shuffle on a multi-scale model).
    """
    if score_fn is None:
        if not is_gm3d(model):
            raise NoGCDecoderError(f"{type(model).__name__} has no GC decoder; pass a score_fn")
        score_fn = model.teacher_scores
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        groups = model.group(points.to(device=device, dtype=torch.float32))
        scores = score_fn(groups).float()
        center = mask_scale_patches(groups).center
        out: dict[str, Any] = {"shapes": int(points.shape[0]), "skipped": {}}
        try:
            out["shuffle_rho"] = _mean(content_shuffle_rho(score_fn, groups, base=scores))
        except MultiScaleError as e:
            out["shuffle_rho"] = float("nan")
            out["skipped"]["shuffle_rho"] = str(e)
        out["rotation_rho"] = _mean(rotation_rho(score_fn, groups, base=scores))
        out["position_rotation_rho"] = _mean(position_rotation_rho(scores, groups))
        out["position_r2"] = _mean(position_fit(scores, center)[1])
        if targets:
            out.update(target_agreement(model, groups, scores))
        if hasattr(model, "ema"):
            out["bn"] = bn_statistics(model).summary()
    finally:
        model.train(was_training)
    return out


def finite_or_none(obj):
    """``obj`` (nested dicts / lists) with every non-finite float replaced by None (for strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj
