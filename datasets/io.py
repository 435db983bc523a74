"""Shared pieces of the on-disk data sets: checked readers, a restricted unpickler, the cache format,
seeded sampling, normalisation, batched FPS and the in-memory base class.

Every reader raises :class:`~utils.errors.DataError` with the file at fault and what was expected, so a
wrong or half-downloaded data set fails at once with a message that says how to fix it.

Randomness: every random draw of a data set comes from :func:`item_rng`, a numpy generator seeded by
``(seed, epoch, index)``. The same seed, epoch and index give the same points in any process or worker,
whatever the worker count or the access order. Call ``dataset.set_epoch(epoch)`` before each epoch (with
non-persistent DataLoader workers, or re-create the iterator) to get fresh draws every epoch; with
``seed=None`` the draws come from fresh OS entropy, as in the official code, and are not reproducible.
"""

from __future__ import annotations

import builtins
import glob
import io
import logging
import os
import pickle
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.transforms import pc_norm
from utils.errors import DataError
from utils.io import atomic_write

__all__ = [
    "LAYOUTS",
    "DatasetLayout",
    "register_layout",
    "require_root",
    "require_file",
    "read_lines",
    "load_npy",
    "load_txt",
    "read_h5",
    "MAX_ABS_COORD",
    "check_points",
    "check_cloud",
    "check_labels",
    "safe_pickle_load",
    "atomic_pickle_dump",
    "load_cloud_cache",
    "write_cloud_cache",
    "item_rng",
    "sample_indices",
    "fps_subsample",
    "chunks",
    "InMemoryClouds",
    "PointDataset",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class DatasetLayout:
    """What a data set looks like on disk, for error messages and ``prepare_data.py layout``.

    Attributes:
        key: short name used on the command line (``shapenet``, ``modelnet40``, ...).
        title: human name of the data set.
        root_hint: where the official configs expect the root (``data/...``).
        tree: the expected folder tree under the root, as printed text.
        required: entries to check, relative to the root; each entry is a tuple of glob alternatives of
            which at least one must exist (a trailing ``/`` means a folder).
        source: where the official copy is published.
    """

    key: str
    title: str
    root_hint: str
    tree: str
    required: tuple[tuple[str, ...], ...]
    source: str

    def missing(self, root: str) -> list[str]:
        """The required entries absent under ``root`` (each shown as ``a | b`` for alternatives)."""
        if not os.path.isdir(root):
            return [f"{root}/ (the root itself)"]
        out = []
        for alternatives in self.required:
            if not any(_exists(root, pattern) for pattern in alternatives):
                out.append(" | ".join(alternatives))
        return out

    def describe(self) -> str:
        """The tree plus the download pointer, as one block of text."""
        return (
            f"Expected layout of {self.title} (official path {self.root_hint}/):\n{self.tree}\n"
            f"Official copy: {self.source}\n"
            f"(see docs/DATA.md; check with `python tools/prepare_data.py layout {self.key} --root <dir>`)"
        )


def _exists(root: str, pattern: str) -> bool:
    want_dir = pattern.endswith("/")
    hits = glob.glob(os.path.join(root, pattern.rstrip("/")))
    return any(os.path.isdir(h) if want_dir else os.path.exists(h) for h in hits)


LAYOUTS: dict[str, DatasetLayout] = {}


def register_layout(layout: DatasetLayout) -> DatasetLayout:
    """Add ``layout`` to :data:`LAYOUTS` under its key and return it."""
    LAYOUTS[layout.key] = layout
    return layout


def require_root(path: str, layout: DatasetLayout, what: str = "data root") -> str:
    """Return ``path`` if it is a folder; else raise DataError with the expected layout and source."""
    if not os.path.isdir(path):
        raise DataError(
            f"{layout.title}: {what} '{path}' does not exist or is not a folder.\n{layout.describe()}"
        )
    return path


def require_file(path: str, what: str) -> str:
    """Return ``path`` if it is a file; else raise DataError naming the file and what it should hold."""
    if not os.path.isfile(path):
        raise DataError(f"missing file '{path}' (expected {what})")
    return path


# --------------------------------------------------------------------------------------- readers
def read_lines(path: str, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file; DataError if it is missing or empty."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not a UTF-8 text file (expected {what}): {exc}") from exc
    if not lines:
        raise DataError(f"file '{path}' is empty (expected {what})")
    return lines


def load_npy(path: str) -> np.ndarray:
    """Load a ``.npy`` array without pickle support; DataError if missing, truncated or corrupt."""
    require_file(path, "a .npy point cloud")
    try:
        return np.load(path, allow_pickle=False)
    # A damaged header reaches numpy's header parser (SyntaxError, tokenize.TokenError) or claims an
    # absurd shape (MemoryError, OverflowError); all of them mean the same thing to the user.
    except (
        ValueError,
        OSError,
        EOFError,
        MemoryError,
        OverflowError,
        SyntaxError,
        TypeError,
        tokenize.TokenError,
    ) as exc:
        raise DataError(
            f"'{path}' is truncated or corrupt: cannot read it as a .npy array ({type(exc).__name__}: {exc})"
        ) from exc


def load_txt(path: str, columns: int, delimiter: str | None = None) -> np.ndarray:
    """Load a text point cloud of at least ``columns`` columns as float32 (N, columns).

    Args:
        path: the file.
        columns: how many leading columns to keep; the file must have at least that many.
        delimiter: ``','`` for ModelNet, ``None`` (whitespace) for ShapeNetPart.
    """
    require_file(path, f"a text point cloud with {columns} columns")
    try:
        data = np.loadtxt(path, dtype=np.float32, delimiter=delimiter, ndmin=2)
    except ValueError as exc:
        raise DataError(
            f"'{path}' is malformed: expected {columns} numeric columns separated by "
            f"{delimiter or 'whitespace'!r} ({exc})"
        ) from exc
    if data.shape[0] == 0 or data.shape[1] < columns:
        raise DataError(f"'{path}' has shape {data.shape}; expected (N, {columns}) with N > 0")
    return data[:, :columns]


def read_h5(path: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read the datasets ``keys`` of an HDF5 file fully into memory."""
    import h5py

    require_file(path, f"an HDF5 file with keys {list(keys)}")
    try:
        with h5py.File(path, "r") as f:
            found = sorted(f.keys())
            absent = [k for k in keys if k not in f]
            if absent:
                raise DataError(f"'{path}' lacks HDF5 key(s) {absent}: found {found}, expected {list(keys)}")
            out = {}
            for k in keys:
                node = f[k]
                if not isinstance(node, h5py.Dataset):
                    kind = "group" if isinstance(node, h5py.Group) else type(node).__name__
                    raise DataError(f"'{path}': HDF5 key '{k}' is a {kind}; expected a dataset")
                out[k] = np.asarray(node[()])
            return out
    except DataError:
        raise
    # A damaged file surfaces from the HDF5 library as any of these, depending on which structure broke.
    except (
        OSError,
        ValueError,
        KeyError,
        RuntimeError,
        TypeError,
        IndexError,
        MemoryError,
        OverflowError,
    ) as exc:
        raise DataError(
            f"'{path}' is truncated or corrupt: cannot read it as HDF5 ({type(exc).__name__}: {exc})"
        ) from exc


MAX_ABS_COORD = 1e6
"""Largest coordinate magnitude a loader accepts (any column: xyz, normals, part labels).

Far above any object-scale data (unit spheres, metres, millimetres up to a kilometre), and far enough
below the float32 limit (3.4e38) that centring, the norms of ``pc_norm`` and the squared distances of
FPS, kNN and the Chamfer loss stay finite and meaningful. A float32 coordinate of 1e20 would square to
inf and normalise the whole cloud to zeros; clouds in larger units must be rescaled or recentred first.
"""


def _position(index: tuple[int, ...], item_axes: tuple[str, ...]) -> str:
    """``cloud 4, point 11, column 1`` for an index into an array whose axes are named ``item_axes``."""
    return ", ".join(f"{name} {int(i)}" for name, i in zip(item_axes, index))


def check_points(points: Any, source: str, item_axes: tuple[str, ...] = ("point", "column")) -> np.ndarray:
    """Return ``points`` as float32 after checking it is a real-valued array of sane coordinates.

    Every value must be a real number (integer or float dtype), finite after the cast to float32
    (float64 values beyond the float32 range would become inf) and at most :data:`MAX_ABS_COORD` in
    magnitude. The error names ``source``, the position of the first bad value (axes named by
    ``item_axes``: ``("cloud", "point", "column")`` for a batch) and the value.

    Raises:
        DataError: a non-numeric dtype, a non-finite value or a value beyond the bound.
    """
    try:
        arr = np.asarray(points)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise DataError(f"{source}: point cloud is not a numeric array ({exc})") from exc
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{source}: point cloud has dtype {arr.dtype}; expected real numbers (float or int)")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = arr.astype(np.float32, copy=False)
    finite = np.isfinite(cast)
    if not finite.all():
        where = tuple(np.argwhere(~finite)[0])
        raise DataError(
            f"{source}: {_position(where, item_axes)}: {arr[where].item():.6g} is not finite as float32 "
            "(NaN, inf, or beyond the float32 range of 3.4e38)"
        )
    big = np.abs(cast) > MAX_ABS_COORD
    if big.any():
        where = tuple(np.argwhere(big)[0])
        raise DataError(
            f"{source}: {_position(where, item_axes)}: {arr[where].item():.6g} exceeds the coordinate bound "
            f"{MAX_ABS_COORD:.0e} (larger values break normalisation and squared distances in float32; "
            "rescale or recentre the data)"
        )
    return cast


def check_cloud(points: Any, source: str, min_points: int = 1, min_columns: int = 3) -> np.ndarray:
    """Check that ``points`` is a (N, C) array with N >= ``min_points`` and C >= ``min_columns`` whose
    values pass :func:`check_points`; return it as float32."""
    points = check_points(points, source)
    if points.ndim != 2 or points.shape[1] < min_columns:
        raise DataError(
            f"{source}: point cloud has shape {tuple(points.shape)}; expected (N, {min_columns}+)"
        )
    if points.shape[0] < min_points:
        raise DataError(f"{source}: too few points: {points.shape[0]} < {min_points} required")
    return points


def check_labels(labels: Any, num_classes: int, source: str) -> np.ndarray:
    """Return ``labels`` as int64 after checking every value is an integer in ``[0, num_classes)``.

    A fractional value (``1.5``) is refused, not truncated; the error names the first bad label's index.
    """
    try:
        labels = np.asarray(labels).reshape(-1)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{source}: labels are not an array of class indices ({exc})") from exc
    if labels.dtype.kind not in "iubf":
        raise DataError(f"{source}: labels have dtype {labels.dtype}; expected integer class indices")
    with np.errstate(invalid="ignore"):
        fractional = np.isfinite(labels) & (labels != np.round(labels))
    if fractional.any():
        i = int(np.flatnonzero(fractional)[0])
        raise DataError(
            f"{source}: label {i} is {labels[i].item()}, not an integer; "
            f"expected integers in [0, {num_classes})"
        )
    bad = ~np.isfinite(labels) | (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: label out of range: {labels[i].item()}; expected integers in [0, {num_classes}) "
            f"(label {i})"
        )
    return labels.astype(np.int64)


# ------------------------------------------------------------------------------- restricted pickle
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object that a data pickle may reference: numpy arrays and builtin values."""
    import codecs

    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): codecs.encode}
    for mod in ("numpy", "numpy.core", "numpy._core"):
        allowed[(mod, "ndarray")] = np.ndarray
        allowed[(mod, "dtype")] = np.dtype
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    for name in (
        "list",
        "tuple",
        "dict",
        "set",
        "frozenset",
        "int",
        "float",
        "complex",
        "bool",
        "str",
        "bytes",
        "bytearray",
    ):
        value = getattr(builtins, name)
        allowed[("builtins", name)] = value
        allowed[("__builtin__", name)] = value
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :func:`_allowed_globals`."""

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"'{self._source}': refused to unpickle global '{module}.{name}'; data pickles "
                "may hold only numpy arrays, lists, tuples, dicts and builtin scalars"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"'{self._source}': refused persistent id {pid!r} in a data pickle")


def safe_pickle_load(path: str) -> Any:
    """Unpickle a data file, admitting only numpy arrays, list, tuple, dict and builtin scalars.

    Nothing named by the pickle outside that set is imported or called: a file that references any other
    global (``os.system``, ``builtins.eval``, ...) raises DataError naming the file and the global.

    Raises:
        DataError: the file is missing, truncated or corrupt, or references a refused global.
    """
    require_file(path, "a pickle of numpy arrays")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except DataError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            MemoryError,
            OverflowError,
            RecursionError,
            UnicodeDecodeError,
        ) as exc:
            raise DataError(
                f"'{path}' is truncated or corrupt: cannot unpickle it ({type(exc).__name__}: {exc})"
            ) from exc


def atomic_pickle_dump(obj: Any, path: str) -> None:
    """Pickle ``obj`` to ``path`` through a temporary file in the same folder, then rename it."""
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=4))


# --------------------------------------------------------------------------------- the .dat cache
def load_cloud_cache(
    path: str, num_classes: int, min_points: int = 1, min_columns: int = 3
) -> tuple[list[np.ndarray], np.ndarray]:
    """Read a ModelNet-style ``.dat`` cache: a pickle of ``[list of float32 (N, C), list of int (1,)]``.

    Returns:
        (clouds, labels): the clouds as float32 arrays and the labels as an int64 (M,) array.
    """
    obj = safe_pickle_load(path)
    if not (
        isinstance(obj, (list, tuple))
        and len(obj) == 2
        and isinstance(obj[0], (list, tuple))
        and isinstance(obj[1], (list, tuple))
    ):
        raise DataError(
            f"'{path}' does not hold the cache layout [list of point arrays, list of label arrays]"
            f"; found {type(obj).__name__}"
        )
    points, labels = obj
    if len(points) != len(labels):
        raise DataError(f"'{path}': {len(points)} point clouds but {len(labels)} labels")
    clouds = [
        check_cloud(cloud, f"'{path}' entry {i}", min_points, min_columns) for i, cloud in enumerate(points)
    ]
    flat = []
    for i, lab in enumerate(labels):
        try:
            lab = np.asarray(lab).reshape(-1)
        except (ValueError, TypeError) as exc:
            raise DataError(f"'{path}': label {i} is not a class index ({exc})") from exc
        if lab.size != 1:
            raise DataError(f"'{path}': label {i} has {lab.size} values; expected one class index")
        flat.append(lab[0])
    # No cast before the check: a label of 1.5 must be refused, not truncated to 1.
    return clouds, check_labels(flat, num_classes, f"'{path}'")


def write_cloud_cache(path: str, clouds: Sequence[np.ndarray], labels: Sequence[int]) -> None:
    """Write the ModelNet ``.dat`` layout: ``[[float32 (N, C)...], [np.array([cls], int32)...]]``."""
    payload = [
        [np.ascontiguousarray(c, dtype=np.float32) for c in clouds],
        [np.array([int(lab)], dtype=np.int32) for lab in labels],
    ]
    atomic_pickle_dump(payload, path)


# ----------------------------------------------------------------------------- sampling and norm
def item_rng(seed: int | None, *keys: int) -> np.random.Generator:
    """A numpy generator for one draw: seeded by ``(seed, *keys)``, or fresh entropy if ``seed`` is None."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(int(k) for k in keys)])


def sample_indices(n: int, k: int, rng: np.random.Generator, replace: bool = False) -> np.ndarray:
    """``k`` indices into ``n`` points.

    Without replacement when ``replace`` is False and ``n >= k``; when ``n < k`` every point is kept once
    and the rest is filled by a draw with replacement (so no point is left out); with ``replace`` True, an
    i.i.d. draw with replacement (the official ShapeNetPart sampling).
    """
    if replace:
        return rng.choice(n, k, replace=True)
    if n >= k:
        return rng.permutation(n)[:k]
    return np.concatenate([rng.permutation(n), rng.choice(n, k - n, replace=True)])


def fps_subsample(
    clouds: Sequence[np.ndarray],
    npoint: int,
    batch_size: int = 32,
    device: str = "cpu",
    skip_sized: bool = True,
) -> list[np.ndarray]:
    """Farthest point sampling of each cloud to ``npoint`` rows, in FPS order.

    Clouds of equal point count are stacked and sampled together by ``extensions.fps`` in chunks of
    ``batch_size`` (start index 0, deterministic); the xyz columns drive the sampling and every column is
    kept.

    Args:
        clouds: float arrays (N_i, C) with C >= 3 and N_i >= npoint.
        npoint: rows to keep.
        batch_size: clouds per FPS call.
        device: torch device for the FPS.
        skip_sized: a cloud that already has exactly ``npoint`` rows is returned in its own row order
            without FPS (which would only reorder it, at the full FPS cost); False runs the FPS anyway,
            so that every output is in FPS order (its prefixes are FPS subsets).

    Returns:
        One float32 (npoint, C) array per input, in input order.
    """
    from extensions import fps

    out: list[np.ndarray | None] = [None] * len(clouds)
    by_count: dict[int, list[int]] = {}
    for i, cloud in enumerate(clouds):
        if cloud.shape[0] < npoint:
            raise DataError(f"cloud {i} has too few points for FPS: {cloud.shape[0]} < {npoint}")
        if skip_sized and cloud.shape[0] == npoint:
            out[i] = np.ascontiguousarray(cloud, dtype=np.float32)
            continue
        by_count.setdefault(cloud.shape[0], []).append(i)
    for members in by_count.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            stacked = np.stack([clouds[i] for i in chunk]).astype(np.float32, copy=False)
            xyz = torch.from_numpy(np.ascontiguousarray(stacked[:, :, :3])).to(device)
            idx = fps(xyz, npoint).cpu().numpy()
            picked = np.take_along_axis(stacked, idx[:, :, None], axis=1)
            for row, i in enumerate(chunk):
                out[i] = np.ascontiguousarray(picked[row])
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- base classes
class PointDataset(Dataset):
    """Base of every file-backed data set: the seed, the epoch and the item dict.

    Args:
        seed: base seed of every random draw (see the module docstring); None for unseeded draws.
    """

    num_classes: int = 0
    classes: list[str] = []

    def __init__(self, seed: int | None = 0):
        super().__init__()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds the per-access draws (sampling, point-order shuffles)."""
        self.epoch = int(epoch)

    def _rng(self, index: int, per_epoch: bool = True) -> np.random.Generator:
        """Generator for item ``index``: keyed by the epoch too unless ``per_epoch`` is False."""
        return item_rng(self.seed, self.epoch, index) if per_epoch else item_rng(self.seed, index)

    @staticmethod
    def _item(points: np.ndarray, label: int, name: str, **extra: Any) -> dict[str, Any]:
        """The item dict: ``points`` float32 (N, 3), ``label`` int64 scalar, ``name``, then ``extra``
        (numpy arrays become tensors, other values are kept)."""
        item: dict[str, Any] = {
            "points": torch.from_numpy(np.ascontiguousarray(points[:, :3], dtype=np.float32)),
            "label": torch.tensor(int(label), dtype=torch.int64),
            "name": name,
        }
        for key, value in extra.items():
            item[key] = (
                torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            )
        return item


class InMemoryClouds(PointDataset):
    """Clouds held in memory (ModelNet, few-shot, ScanObjectNN, mesh folders), with the official item
    pipeline: keep the first ``npoints`` rows, normalise xyz (optional), shuffle the point order (train).

    Args:
        clouds: (M, N, C) array or list of (N_i, C) arrays; C = 3 or 6 (xyz + normals).
        labels: int64 (M,) class indices.
        names: one name per cloud.
        npoints: rows kept per cloud (the first ones: an FPS-ordered cache keeps its FPS subset); None
            keeps every row.
        normalize: centre and scale xyz into the unit sphere.
        use_normals: also return ``normals`` (N, 3) (requires C >= 6).
        shuffle: permute the point order at each access, seeded by (seed, epoch, index).
        seed: base seed.
    """

    def __init__(
        self,
        clouds: Sequence[np.ndarray] | np.ndarray,
        labels: np.ndarray,
        names: Sequence[str],
        npoints: int | None,
        normalize: bool,
        use_normals: bool,
        shuffle: bool,
        seed: int | None,
    ):
        super().__init__(seed)
        self.clouds = clouds
        self.labels = np.asarray(labels, dtype=np.int64)
        self.names = list(names)
        self.npoints = npoints
        self.normalize = normalize
        self.use_normals = use_normals
        self.shuffle = shuffle

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cloud = np.array(self.clouds[index][: self.npoints], dtype=np.float32)
        xyz = pc_norm(np.asarray(cloud[:, :3], dtype=np.float32)) if self.normalize else cloud[:, :3]
        order = self._rng(index).permutation(len(cloud)) if self.shuffle else slice(None)
        extra = {"normals": cloud[order, 3:6]} if self.use_normals else {}
        return self._item(xyz[order], self.labels[index], self.names[index], **extra)


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
