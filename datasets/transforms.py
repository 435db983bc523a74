"""Batch-level point-cloud augmentations that run on the points' device, plus ``pc_norm``.

Every transform is a callable ``t(points (B, N, 3), generator=None) -> (B, N', 3)`` vectorised over the
batch (no per-sample Python loop). Per-point labels travel with the points: ``t(points, generator,
extra=labels)`` returns ``(points, labels)``, where ``labels`` is a (B, N, ...) tensor or a dict of them
(part labels, normals) and comes back indexed like the output points; without ``extra`` the call and its
result are unchanged. Point-wise maps (scale, rotate, jitter...) return ``extra`` as it is; transforms
that move, repeat or drop points (:class:`RandomDropout`, :class:`PermutePoints`,
:class:`SubsamplePoints`) gather it with the same indices. A transform draws the same random numbers
with or without ``extra``. Random numbers come only from the explicit ``torch.Generator``
(drawn on the generator's device, then moved to the points' device) or, when it is ``None``, from
torch's global RNG on the points' device; numpy's and Python's global RNGs are never used. Output
keeps the input's device and dtype. Draws are float32 whatever the input dtype, so one seed gives the
same augmentation for float32 and float64 inputs.

The order of the draws is part of each transform's contract (its docstring lists it), so a test or a
reference loop can reproduce them from a generator with the same seed.

Configs name transforms through :data:`TRANSFORMS`::

    build_transforms(["RotateY", {"NAME": "ScaleAndTranslate", "translate_range": 0.1}])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, overload

import numpy as np
import torch

from utils.errors import ConfigError, DataError
from utils.registry import Registry

__all__ = [
    "TRANSFORMS",
    "Compose",
    "Jitter",
    "PermutePoints",
    "RandomDropout",
    "RotatePerturbation",
    "RotateY",
    "Scale",
    "ScaleAndTranslate",
    "SubsamplePoints",
    "Transform",
    "Translate",
    "build_transforms",
    "pc_norm",
]

TRANSFORMS = Registry("transforms")


@overload
def pc_norm(points: np.ndarray) -> np.ndarray: ...


@overload
def pc_norm(points: torch.Tensor) -> torch.Tensor: ...


def pc_norm(points: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Centre on the centroid and scale into the unit sphere, as the official ``pc_norm``.

    ``p - mean(p)``, then divide by the largest point norm, so the farthest point lies exactly on the
    unit sphere. A cloud whose points all coincide is only centred (no division by zero).

    Args:
        points: (..., N, 3) numpy array or torch tensor; leading dimensions are independent clouds.

    Returns:
        Same type, shape and device as ``points``; same dtype for floating input (integer input gives
        float32 tensors / float64 arrays). A new array: the input is not modified.
    """
    if isinstance(points, torch.Tensor):
        if not points.is_floating_point():
            points = points.float()
        centred = points - points.mean(dim=-2, keepdim=True)
        scale = centred.norm(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
        return centred / torch.where(scale > 0, scale, torch.ones_like(scale))
    if isinstance(points, np.ndarray):
        if not np.issubdtype(points.dtype, np.floating):
            points = points.astype(np.float64)
        centred = points - points.mean(axis=-2, keepdims=True)
        scale = np.linalg.norm(centred, axis=-1).max(axis=-1, keepdims=True)[..., None]
        return (centred / np.where(scale > 0, scale, 1)).astype(points.dtype, copy=False)
    raise TypeError(f"pc_norm expects a numpy array or torch tensor, got {type(points).__name__}")


def _check_points(points: torch.Tensor, who: str) -> None:
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[-1] != 3:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise DataError(f"{who}: expected a (B, N, 3) tensor, got {shape}")
    if not points.is_floating_point():
        raise DataError(f"{who}: expected a floating-point tensor, got {points.dtype}")


def _draw_device(points: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else points.device


def _rand(shape: Sequence[int], points: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) float32 draws of ``shape`` from ``generator``, returned on ``points``' device and dtype."""
    r = torch.rand(tuple(shape), generator=generator, device=_draw_device(points, generator))
    return r.to(device=points.device, dtype=points.dtype)


def _randn(shape: Sequence[int], points: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) float32 draws of ``shape`` from ``generator``, returned on ``points``' device and dtype."""
    r = torch.randn(tuple(shape), generator=generator, device=_draw_device(points, generator))
    return r.to(device=points.device, dtype=points.dtype)


def _uniform(
    lo: float, hi: float, shape: Sequence[int], points: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    return lo + (hi - lo) * _rand(shape, points, generator)


def _rotation_y(angle: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 3, 3) matrices ``[[c, 0, s], [0, 1, 0], [-s, 0, c]]`` (official layout)."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([c, zero, s, zero, one, zero, -s, zero, c], dim=-1).view(-1, 3, 3)


def _rotation_x(angle: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 3, 3) matrices ``[[1, 0, 0], [0, c, -s], [0, s, c]]``."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([one, zero, zero, zero, c, -s, zero, s, c], dim=-1).view(-1, 3, 3)


def _rotation_z(angle: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 3, 3) matrices ``[[c, -s, 0], [s, c, 0], [0, 0, 1]]``."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], dim=-1).view(-1, 3, 3)


def _check_range(name: str, lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ConfigError(f"{name}: need a finite range with low <= high, got [{lo}, {hi}]")


def _check_nonneg(name: str, **values: float) -> None:
    for key, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}: '{key}' must be a finite number >= 0, got {value!r}")


def _check_extra(extra: Any, points: torch.Tensor, who: str) -> None:
    """``extra`` must be (B, N, ...) tensors matching ``points`` (B, N, 3)."""
    items = extra.items() if isinstance(extra, Mapping) else [("extra", extra)]
    for key, t in items:
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or tuple(t.shape[:2]) != tuple(points.shape[:2]):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise DataError(f"{who}: per-point '{key}' must be a (B, N, ...) tensor with (B, N) = "
                            f"{tuple(points.shape[:2])} as the points, got {shape}")


def _check_extra_opt(extra: Any, points: torch.Tensor, who: str) -> None:
    if extra is not None:
        _check_extra(extra, points, who)


def _carry(points: torch.Tensor, extra: Any, index: torch.Tensor | None = None, who: str = "transform"):
    """``points`` alone without ``extra``; else ``(points, extra)`` with ``extra`` gathered along the
    point dimension by ``index`` (B, N') when the transform moved points (None: left as it is)."""
    if extra is None:
        return points
    if index is None:
        return points, extra

    def take(t: torch.Tensor) -> torch.Tensor:
        idx = index.to(t.device).reshape(index.shape + (1,) * (t.dim() - 2)).expand(*index.shape, *t.shape[2:])
        return torch.gather(t, 1, idx)

    if isinstance(extra, Mapping):
        return points, {k: take(v) for k, v in extra.items()}
    return points, take(extra)


class Transform:
    """Base class: subclasses implement ``__call__(points (B, N, 3), generator, extra=None)``, returning
    the points, or ``(points, extra)`` when ``extra`` is given (see the module docstring)."""

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


@TRANSFORMS.register("ScaleAndTranslate", "PointcloudScaleAndTranslate")
class ScaleAndTranslate(Transform):
    """Official ``PointcloudScaleAndTranslate``: per-sample anisotropic scale, then per-axis shift.

    ``out[b] = points[b] * s[b] + t[b]`` with ``s[b] ~ U(scale_low, scale_high)^3`` and
    ``t[b] ~ U(-translate_range, translate_range)^3``. Draws: ``rand(B, 3)`` for ``s``, then
    ``rand(B, 3)`` for ``t``.

    Args:
        scale_low: lower bound of the per-axis scale.
        scale_high: upper bound of the per-axis scale.
        translate_range: half-width of the per-axis translation.
    """

    def __init__(
        self, scale_low: float = 2.0 / 3.0, scale_high: float = 3.0 / 2.0, translate_range: float = 0.2
    ):
        _check_range("ScaleAndTranslate", scale_low, scale_high)
        _check_nonneg("ScaleAndTranslate", translate_range=translate_range)
        self.scale_low, self.scale_high, self.translate_range = scale_low, scale_high, translate_range

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "ScaleAndTranslate")
        _check_extra_opt(extra, points, "ScaleAndTranslate")
        b = points.shape[0]
        scale = _uniform(self.scale_low, self.scale_high, (b, 1, 3), points, generator)
        shift = _uniform(-self.translate_range, self.translate_range, (b, 1, 3), points, generator)
        return _carry(points * scale + shift, extra)


@TRANSFORMS.register("Scale")
class Scale(Transform):
    """Per-sample random scale ``out[b] = points[b] * s[b]``.

    Isotropic by default (the part-segmentation ``provider.random_scale_point_cloud``): one factor per
    sample, draw ``rand(B, 1)``. With ``anisotropic=True`` one factor per axis, draw ``rand(B, 3)``
    (the official ``PointcloudScale``).

    Args:
        lo: lower bound of the scale factor.
        hi: upper bound of the scale factor.
        anisotropic: draw an independent factor for each axis.
    """

    def __init__(self, lo: float = 0.8, hi: float = 1.25, anisotropic: bool = False):
        _check_range("Scale", lo, hi)
        self.lo, self.hi, self.anisotropic = lo, hi, anisotropic

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "Scale")
        _check_extra_opt(extra, points, "Scale")
        b = points.shape[0]
        scale = _uniform(self.lo, self.hi, (b, 3 if self.anisotropic else 1), points, generator)
        return _carry(points * scale.unsqueeze(1), extra)


@TRANSFORMS.register("Translate")
class Translate(Transform):
    """Per-sample per-axis shift ``out[b] = points[b] + t[b]``, ``t[b] ~ U(-range, range)^3``.

    Draw: ``rand(B, 3)``.

    Args:
        range: half-width of the per-axis translation.
    """

    def __init__(self, range: float = 0.1):
        _check_nonneg("Translate", range=range)
        self.range = range

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "Translate")
        _check_extra_opt(extra, points, "Translate")
        shift = _uniform(-self.range, self.range, (points.shape[0], 1, 3), points, generator)
        return _carry(points + shift, extra)


@TRANSFORMS.register("RotateY", "PointcloudRotate")
class RotateY(Transform):
    """Official ``PointcloudRotate``: a random angle about the up (Y) axis, applied as ``pc @ R``.

    ``angle[b] = 2 pi * u[b]``, ``R = [[c, 0, s], [0, 1, 0], [-s, 0, c]]``, ``out[b] = points[b] @ R[b]``.
    Draw: ``rand(B)``.
    """

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "RotateY")
        _check_extra_opt(extra, points, "RotateY")
        angle = 2.0 * math.pi * _rand((points.shape[0],), points, generator)
        return _carry(torch.bmm(points, _rotation_y(angle)), extra)


@TRANSFORMS.register("RotatePerturbation")
class RotatePerturbation(Transform):
    """PointNet++ ``rotate_perturbation_point_cloud``: a small random rotation about all three axes.

    ``a = clip(angle_sigma * n, -angle_clip, angle_clip)`` with ``n`` drawn as ``randn(B, 3)`` (x, y, z
    angles); ``R = Rz(a_z) @ Ry(a_y) @ Rx(a_x)``; ``out[b] = points[b] @ R[b]``.

    Args:
        angle_sigma: standard deviation of each angle, in radians.
        angle_clip: each angle is clipped to ``[-angle_clip, angle_clip]``.
    """

    def __init__(self, angle_sigma: float = 0.06, angle_clip: float = 0.18):
        _check_nonneg("RotatePerturbation", angle_sigma=angle_sigma, angle_clip=angle_clip)
        self.angle_sigma, self.angle_clip = angle_sigma, angle_clip

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "RotatePerturbation")
        _check_extra_opt(extra, points, "RotatePerturbation")
        angles = (self.angle_sigma * _randn((points.shape[0], 3), points, generator)).clamp(
            -self.angle_clip, self.angle_clip
        )
        rot = _rotation_z(angles[:, 2]) @ _rotation_y(angles[:, 1]) @ _rotation_x(angles[:, 0])
        return _carry(torch.bmm(points, rot), extra)


@TRANSFORMS.register("Jitter", "PointcloudJitter")
class Jitter(Transform):
    """Official ``PointcloudJitter``: clipped Gaussian noise added to every coordinate.

    ``out = points + clamp(sigma * n, -clip, clip)`` with ``n`` drawn as ``randn(B, N, 3)``.

    Args:
        sigma: standard deviation of the noise.
        clip: the noise is clipped to ``[-clip, clip]``.
    """

    def __init__(self, sigma: float = 0.01, clip: float = 0.05):
        _check_nonneg("Jitter", sigma=sigma, clip=clip)
        self.sigma, self.clip = sigma, clip

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "Jitter")
        _check_extra_opt(extra, points, "Jitter")
        noise = (self.sigma * _randn(points.shape, points, generator)).clamp(-self.clip, self.clip)
        return _carry(points + noise, extra)


@TRANSFORMS.register("RandomDropout")
class RandomDropout(Transform):
    """PointNet++ / official random input dropout, keeping N: dropped points become the first point
    (and take the first point's labels).

    Per sample ``ratio[b] = u[b] * max_dropout_ratio`` (draw ``rand(B)``), then point ``n`` is dropped
    when ``v[b, n] <= ratio[b]`` (draw ``rand(B, N)``) and replaced by ``points[b, 0]``.

    Args:
        max_dropout_ratio: upper bound of the per-sample dropout ratio, in [0, 1).
    """

    def __init__(self, max_dropout_ratio: float = 0.875):
        if not 0.0 <= max_dropout_ratio < 1.0:
            raise ConfigError(
                f"RandomDropout: 'max_dropout_ratio' must be in [0, 1), got {max_dropout_ratio!r}"
            )
        self.max_dropout_ratio = max_dropout_ratio

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "RandomDropout")
        _check_extra_opt(extra, points, "RandomDropout")
        b, n, _ = points.shape
        ratio = self.max_dropout_ratio * _rand((b, 1), points, generator)
        drop = _rand((b, n), points, generator) <= ratio
        out = torch.where(drop.unsqueeze(-1), points[:, :1, :], points)
        if extra is None:
            return out
        index = torch.where(drop, 0, torch.arange(n, device=points.device).expand(b, n))
        return _carry(out, extra, index)


@TRANSFORMS.register("PermutePoints")
class PermutePoints(Transform):
    """An independent random order of the points of every sample: ``out[b] = points[b, perm[b]]``.

    ``perm[b] = argsort(u[b])`` with ``u`` drawn as ``rand(B, N)``.
    """

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "PermutePoints")
        _check_extra_opt(extra, points, "PermutePoints")
        b, n, _ = points.shape
        index = _rand((b, n), points, generator).float().argsort(dim=1)
        return _carry(torch.gather(points, 1, index.unsqueeze(-1).expand(b, n, 3)), extra, index)


@TRANSFORMS.register("SubsamplePoints")
class SubsamplePoints(Transform):
    """Keep a random subset of ``npoints`` distinct points of every sample (the others are dropped).

    ``keep[b] = argsort(u[b])[:npoints]`` with ``u`` drawn as ``rand(B, N)``, so the kept points come in
    random order. A cloud with at most ``npoints`` points is returned as it is (no draw).

    Args:
        npoints: points kept per sample.
    """

    def __init__(self, npoints: int = 1024):
        if int(npoints) != npoints or npoints < 1:
            raise ConfigError(f"SubsamplePoints: 'npoints' must be a positive integer, got {npoints!r}")
        self.npoints = int(npoints)

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        _check_points(points, "SubsamplePoints")
        _check_extra_opt(extra, points, "SubsamplePoints")
        b, n, _ = points.shape
        if n <= self.npoints:
            return _carry(points, extra)
        index = _rand((b, n), points, generator).float().argsort(dim=1)[:, : self.npoints]
        return _carry(torch.gather(points, 1, index.unsqueeze(-1).expand(b, self.npoints, 3)), extra, index)


class Compose(Transform):
    """Apply transforms in order, all drawing from the same generator.

    Args:
        transforms: callables ``t(points (B, N, 3), generator) -> (B, N, 3)``.
    """

    def __init__(self, transforms: Sequence[Any]):
        for t in transforms:
            if not callable(t):
                raise ConfigError(f"Compose: {t!r} is not callable")
        self.transforms = list(transforms)

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None, extra=None):
        if extra is None:
            for t in self.transforms:
                points = t(points, generator)
            return points
        for t in self.transforms:
            points, extra = t(points, generator, extra=extra)
        return points, extra

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def build_transforms(spec: Sequence[Mapping[str, Any] | str] | None, where: str = "transforms") -> Compose:
    """Build a :class:`Compose` from a config list.

    Args:
        spec: list whose items are a registered name (``"RotateY"``) or a mapping
            ``{NAME: ..., **kwargs}``; ``None`` or ``[]`` gives an identity ``Compose``.
        where: prefix for error messages (the config file / key).

    Returns:
        The composed transform.

    Raises:
        ConfigError: unknown name, unknown or mistyped keyword, or a malformed item.
    """
    if spec is None:
        return Compose([])
    if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence):
        raise ConfigError(
            f"{where}: expected a list of transform names or {{NAME: ...}} mappings, got {spec!r}"
        )
    built = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            item = {"NAME": item}
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}[{i}]: expected a name or a {{NAME: ...}} mapping, got {item!r}")
        built.append(TRANSFORMS.build(item, where=f"{where}[{i}]"))
    return Compose(built)
