"""Batch-level point-cloud augmentations that run on the points' device, plus ``pc_norm``.

Every transform is a callable ``t(points (B, N, 3), generator=None) -> (B, N, 3)`` vectorised over the
batch (no per-sample Python loop). Random numbers come only from the explicit ``torch.Generator``
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
    "RandomDropout",
    "RotatePerturbation",
    "RotateY",
    "Scale",
    "ScaleAndTranslate",
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


class Transform:
    """Base class: subclasses implement ``__call__(points (B, N, 3), generator) -> (B, N, 3)``."""

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
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

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_points(points, "ScaleAndTranslate")
        b = points.shape[0]
        scale = _uniform(self.scale_low, self.scale_high, (b, 1, 3), points, generator)
        shift = _uniform(-self.translate_range, self.translate_range, (b, 1, 3), points, generator)
        return points * scale + shift


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

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_points(points, "Scale")
        b = points.shape[0]
        scale = _uniform(self.lo, self.hi, (b, 3 if self.anisotropic else 1), points, generator)
        return points * scale.unsqueeze(1)


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

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_points(points, "Translate")
        shift = _uniform(-self.range, self.range, (points.shape[0], 1, 3), points, generator)
        return points + shift


@TRANSFORMS.register("RotateY", "PointcloudRotate")
class RotateY(Transform):
    """Official ``PointcloudRotate``: a random angle about the up (Y) axis, applied as ``pc @ R``.

    ``angle[b] = 2 pi * u[b]``, ``R = [[c, 0, s], [0, 1, 0], [-s, 0, c]]``, ``out[b] = points[b] @ R[b]``.
    Draw: ``rand(B)``.
    """

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_points(points, "RotateY")
        angle = 2.0 * math.pi * _rand((points.shape[0],), points, generator)
        return torch.bmm(points, _rotation_y(angle))


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

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_points(points, "RotatePerturbation")
        angles = (self.angle_sigma * _randn((points.shape[0], 3), points, generator)).clamp(
            -self.angle_clip, self.angle_clip
        )
        rot = _rotation_z(angles[:, 2]) @ _rotation_y(angles[:, 1]) @ _rotation_x(angles[:, 0])
        return torch.bmm(points, rot)


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

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_points(points, "Jitter")
        noise = (self.sigma * _randn(points.shape, points, generator)).clamp(-self.clip, self.clip)
        return points + noise


@TRANSFORMS.register("RandomDropout")
class RandomDropout(Transform):
    """PointNet++ / official random input dropout, keeping N: dropped points become the first point.

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

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_points(points, "RandomDropout")
        b, n, _ = points.shape
        ratio = self.max_dropout_ratio * _rand((b, 1), points, generator)
        drop = _rand((b, n), points, generator) <= ratio
        return torch.where(drop.unsqueeze(-1), points[:, :1, :], points)


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

    def __call__(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            points = t(points, generator)
        return points

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
