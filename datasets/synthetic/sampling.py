"""Surface sampling for the generated shapes: rotations and area-weighted points on primitives.

:class:`Primitives` holds the surface primitives of one object (boxes, frusta / cylinders / cones /
rods, ellipsoids, tori), each with its part index, and samples points on them in proportion to their
areas; the per-kind samplers are uniform on each surface and vectorised over points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["Primitives", "Vec", "align_y", "rot_x", "rot_y", "rot_z"]

Vec = Sequence[float] | np.ndarray


# --------------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------------


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def align_y(direction: Vec) -> np.ndarray:
    """Rotation matrix taking the +y axis onto ``direction`` (Rodrigues' formula)."""
    v = np.asarray(direction, dtype=np.float64)
    v = v / np.linalg.norm(v)
    axis = np.array([v[2], 0.0, -v[0]])  # y x v
    s, c = math.hypot(v[0], v[2]), float(v[1])
    if s < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    k = axis / s
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + s * kx + (1.0 - c) * (kx @ kx)


# --------------------------------------------------------------------------------------------------
# Primitive surfaces, sampled vectorised over points (each point carries its primitive's parameters)
# --------------------------------------------------------------------------------------------------


def _box_area(half: np.ndarray) -> np.ndarray:
    a, b, c = half.T
    return 8.0 * (a * b + b * c + a * c)


def _box_sample(half: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform points on the surfaces of axis-aligned boxes centred at 0; ``half`` (n, 3) half-sizes."""
    n = len(half)
    a, b, c = half.T
    cum = np.cumsum(np.stack([b * c, a * c, a * b], axis=1), axis=1)
    axis = (rng.random(n)[:, None] * cum[:, -1:] > cum).sum(axis=1)
    pts = (2.0 * rng.random((n, 3)) - 1.0) * half
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    rows = np.arange(n)
    pts[rows, axis] = sign * half[rows, axis]
    return pts


def _frustum_areas(prm: np.ndarray) -> np.ndarray:
    """(n, 3) areas of lateral surface, bottom cap, top cap; ``prm`` rows are (r0, r1, h, cap0, cap1)."""
    r0, r1, h, c0, c1 = prm.T
    lateral = math.pi * (r0 + r1) * np.sqrt(h * h + (r0 - r1) ** 2)
    return np.stack([lateral, c0 * math.pi * r0 * r0, c1 * math.pi * r1 * r1], axis=1)


def _frustum_sample(prm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform points on frusta along y, centred at 0: radius r0 at y=-h/2, r1 at y=+h/2, optional caps."""
    n = len(prm)
    r0, r1, h = prm[:, 0], prm[:, 1], prm[:, 2]
    cum = np.cumsum(_frustum_areas(prm), axis=1)
    surface = (rng.random(n)[:, None] * cum[:, -1:] > cum).sum(axis=1)
    theta = 2.0 * math.pi * rng.random(n)
    u = rng.random(n)
    # lateral: radius density grows linearly with the radius -> rho^2 uniform between r0^2 and r1^2
    rho = np.sqrt(r0 * r0 + u * (r1 * r1 - r0 * r0))
    dr = r1 - r0
    flat = np.abs(dr) < 1e-12
    s = np.where(flat, u, (rho - r0) / np.where(flat, 1.0, dr))
    y = h * (s - 0.5)
    on_cap0, on_cap1 = surface == 1, surface == 2
    rho = np.where(on_cap0, r0 * np.sqrt(u), np.where(on_cap1, r1 * np.sqrt(u), rho))
    y = np.where(on_cap0, -0.5 * h, np.where(on_cap1, 0.5 * h, y))
    return np.stack([rho * np.cos(theta), y, rho * np.sin(theta)], axis=1)


def _ellipsoid_area(radii: np.ndarray) -> np.ndarray:
    """Knud Thomsen's approximation (relative error < 1.1 %)."""
    p = 1.6075
    a, b, c = (radii**p).T
    return 4.0 * math.pi * ((a * b + a * c + b * c) / 3.0) ** (1.0 / p)


def _rejection(
    n: int, rng: np.random.Generator, propose: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Fill ``n`` points: ``propose(pending_idx) -> (points (m, 3), accept_prob (m,))`` until all accepted."""
    out = np.empty((n, 3))
    pending = np.arange(n)
    while pending.size:
        pts, prob = propose(pending)
        ok = rng.random(pending.size) < prob
        out[pending[ok]] = pts[ok]
        pending = pending[~ok]
    return out


def _ellipsoid_sample(radii: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform points on ellipsoids centred at 0 with semi-axes ``radii`` (n, 3), by rejection."""

    def propose(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = rng.standard_normal((idx.size, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        r = radii[idx]
        # area element of the map sphere -> ellipsoid is abc * |d / r|; its maximum is abc / min(r)
        prob = r.min(axis=1) * np.linalg.norm(d / r, axis=1)
        return d * r, prob

    return _rejection(len(radii), rng, propose)


def _torus_area(prm: np.ndarray) -> np.ndarray:
    big, small, arc = prm.T
    return arc * 4.0 * math.pi**2 * big * small


def _torus_sample(prm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform points on tori around the y axis (ring in the xz plane); rows (R, r, arc fraction).

    A partial torus (``arc < 1``) spans the angles ``[-arc pi, arc pi]`` around +x.
    """

    def propose(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        big, small, arc = prm[idx].T
        u = 2.0 * math.pi * arc * (rng.random(idx.size) - 0.5)
        v = 2.0 * math.pi * rng.random(idx.size)
        ring = big + small * np.cos(v)
        pts = np.stack([ring * np.cos(u), small * np.sin(v), ring * np.sin(u)], axis=1)
        return pts, ring / (big + small)

    return _rejection(len(prm), rng, propose)


_KINDS: dict[
    str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, np.random.Generator], np.ndarray]]
] = {
    "box": (_box_area, _box_sample),
    "frustum": (lambda prm: _frustum_areas(prm).sum(axis=1), _frustum_sample),
    "ellipsoid": (_ellipsoid_area, _ellipsoid_sample),
    "torus": (_torus_area, _torus_sample),
}


class Primitives:
    """The primitives of one object, in world coordinates (metres, y up, front +z, floor at y=0).

    Args:
        parts: the category's part names; primitives name their part, stored as a local index.
    """

    def __init__(self, parts: Sequence[str]):
        self.part_index = {name: i for i, name in enumerate(parts)}
        self.prims: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]] = {k: [] for k in _KINDS}

    def _add(self, kind: str, part: str, params: Vec, center: Vec, rot: np.ndarray | None) -> None:
        self.prims[kind].append(
            (
                np.asarray(params, dtype=np.float64),
                np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64),
                np.asarray(center, dtype=np.float64),
                self.part_index[part],
            )
        )

    def box(self, part: str, center: Vec, size: Vec, rot: np.ndarray | None = None) -> None:
        """Box (or flat panel) with full extents ``size`` (x, y, z) before rotation."""
        self._add("box", part, 0.5 * np.asarray(size, dtype=np.float64), center, rot)

    def frustum(
        self,
        part: str,
        center: Vec,
        r0: float,
        r1: float,
        height: float,
        rot: np.ndarray | None = None,
        caps: tuple[bool, bool] = (True, True),
    ) -> None:
        """Frustum (cone when a radius is 0, cylinder when equal) along the rotated y axis."""
        self._add("frustum", part, (r0, r1, height, float(caps[0]), float(caps[1])), center, rot)

    def cylinder(
        self,
        part: str,
        center: Vec,
        radius: float,
        height: float,
        rot: np.ndarray | None = None,
        caps: tuple[bool, bool] = (True, True),
    ) -> None:
        self.frustum(part, center, radius, radius, height, rot, caps)

    def rod(self, part: str, p0: Vec, p1: Vec, radius: float) -> None:
        """Thin open cylinder from ``p0`` to ``p1``."""
        p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
        d = p1 - p0
        self.frustum(
            part, 0.5 * (p0 + p1), radius, radius, float(np.linalg.norm(d)), align_y(d), (False, False)
        )

    def ellipsoid(self, part: str, center: Vec, radii: Vec, rot: np.ndarray | None = None) -> None:
        self._add("ellipsoid", part, radii, center, rot)

    def torus(
        self,
        part: str,
        center: Vec,
        major: float,
        minor: float,
        rot: np.ndarray | None = None,
        arc: float = 1.0,
    ) -> None:
        """Torus around the rotated y axis; ``arc`` < 1 keeps the part centred on the rotated +x."""
        self._add("torus", part, (major, minor, arc), center, rot)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Area-weighted surface samples.

        Returns:
            points (n, 3) float64 grouped by primitive, local part index (n,) int64.
        """
        kinds = [k for k in _KINDS if self.prims[k]]
        params = {k: np.stack([p[0] for p in self.prims[k]]) for k in kinds}
        areas = np.concatenate([_KINDS[k][0](params[k]) for k in kinds])
        counts = rng.multinomial(n, areas / areas.sum())
        pts, labels, start = [], [], 0
        for k in kinds:
            m = len(self.prims[k])
            idx = np.repeat(np.arange(m), counts[start : start + m])
            start += m
            if idx.size == 0:
                continue
            local = _KINDS[k][1](params[k][idx], rng)
            rot = np.stack([p[1] for p in self.prims[k]])[idx]
            shift = np.stack([p[2] for p in self.prims[k]])[idx]
            pts.append(np.einsum("nij,nj->ni", rot, local) + shift)
            labels.append(np.array([p[3] for p in self.prims[k]], dtype=np.int64)[idx])
        return np.concatenate(pts), np.concatenate(labels)
