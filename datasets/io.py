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
import logging
import os
import pickle
import struct
import tokenize
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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


def human_size(n: int) -> str:
    """``12.0 TB``, ``1.2 KB``, ``252 bytes``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _claimed_bytes(shape: Sequence[int], dtype: np.dtype) -> int:
    n = int(dtype.itemsize)
    for d in shape:
        n *= int(d)
    return n


def _npy_overclaim(path: str) -> str | None:
    """Why a ``.npy`` header claims more data than the file holds (shape, dtype, size of both), or None."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read is None:
                return None
            shape, _, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, MemoryError, OverflowError,
            tokenize.TokenError):
        return None  # a damaged header: np.load says so
    if dtype.hasobject:
        return None
    need, held = _claimed_bytes(shape, dtype), os.path.getsize(path) - offset
    if need <= held:
        return None
    return (f"'{path}': its .npy header claims shape {tuple(shape)} of {dtype} ({human_size(need)} of data), "
            f"but the file holds {human_size(held)} after the header ({held // max(dtype.itemsize, 1)} values)")


def load_npy(path: str) -> np.ndarray:
    """Load a ``.npy`` array without pickle support; DataError if missing, truncated or corrupt, or if its
    header claims more data than the file holds (the claim and the real size are named)."""
    require_file(path, "a .npy point cloud")
    claim = _npy_overclaim(path)
    if claim is not None:
        raise DataError(claim)
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
                _check_h5_claim(path, k, node)
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


H5_MAX_COMPRESSION = 1100
"""Largest data-to-file size ratio accepted for a compressed HDF5 data set (deflate cannot exceed 1032:1)."""


def _check_h5_claim(path: str, key: str, node: Any) -> None:
    """Refuse an HDF5 data set whose header claims more data than the file can hold, before h5py allocates
    an array of that size: the claim and the file size are named."""
    need = _claimed_bytes(node.shape or (), node.dtype)
    size = os.path.getsize(path)
    compressed = bool(node.compression) or bool(getattr(node, "_filters", None))
    limit = size * (H5_MAX_COMPRESSION if compressed else 1)
    if need > limit:
        how = f" (more than {H5_MAX_COMPRESSION}:1 compression could hold)" if compressed else ""
        raise DataError(
            f"'{path}': HDF5 key '{key}' claims shape {tuple(node.shape)} of {node.dtype} ({human_size(need)} of "
            f"data), but the file is {human_size(size)}{how}"
        )


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


def point_count_mismatch(clouds: list, n_points: int | None) -> tuple[int, str] | None:
    """Where ``clouds`` do not all hold ``n_points`` points: the first other entry's index and a summary
    ("3 with 32, 1 with 64") of the clouds by point count; None when every cloud matches (or no count)."""
    sizes = sorted({len(c) for c in clouds})
    if n_points is None or not sizes or sizes == [n_points]:
        return None
    first = next(i for i, c in enumerate(clouds) if len(c) != n_points)
    return first, ", ".join(f"{sum(len(c) == k for c in clouds)} with {k}" for k in sizes)


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
# Why the pure-Python unpickler: CPython's C unpickler grows its memo table to twice the largest memo index
# it is given (PUT / BINPUT / LONG_BINPUT), before any global is looked up, so one opcode with index 1.2e9
# costs ~20 GB; it also allocates a BYTEARRAY8 / BINBYTES8 payload at its claimed size before reading it.
# ``pickle._Unpickler`` keeps the memo in a dict, reads through the bounded reader below, and dispatches
# every opcode through a table, so each call, object construction and BUILD is checked here before it
# allocates. Data pickles have a few opcodes per array, so this costs about 0.1 ms per array more than the
# C unpickler (timings in docs/RELIABILITY.md, promise 10).
_PLAIN_TYPES = (int, float, complex, bool, tuple, list, dict, set, frozenset)
"""Builtins a data pickle may call (or ``__new__``) with any arguments: their size follows their input."""

_DTYPE_BAD_FLAGS = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
"""numpy dtype flags of object-holding types (ITEM_REFCOUNT, LIST_PICKLE, ITEM_IS_POINTER, USE_GETITEM,
USE_SETITEM); a dtype state that sets them would make numpy treat raw bytes as object pointers."""

UNFOLDED_PER_FILE_BYTE = 16
UNFOLDED_FLOOR = 8 << 20
"""A data pickle's objects, with shared references unfolded (8 bytes per object plus the data of arrays,
bytes and strings), may take at most max(UNFOLDED_PER_FILE_BYTE x file size, UNFOLDED_FLOOR) bytes: a tree
without shared references takes at most about 9 bytes per byte of file."""

MAX_PICKLE_DEPTH = 100
"""Containers in a data pickle may nest at most this deep (data caches nest three or four levels)."""


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


def _callables() -> tuple[Any, Any, Any]:
    import codecs

    from numpy._core import multiarray, numeric

    return codecs, multiarray, numeric


_CALLABLES = _callables()


class _BoundedReader:
    """``read`` / ``readline`` over a memory map that never allocate past the end of the file and raise on
    a short read (the pure-Python unpickler itself would accept a short read silently)."""

    def __init__(self, buf: Any, source: str):
        self._buf, self._source, self.size = buf, source, len(buf)

    def read(self, n: int) -> bytes:
        pos = self._buf.tell()
        if n > self.size - pos:
            raise DataError(
                f"'{self._source}' is truncated or corrupt: the pickle asks for {n} bytes at byte {pos} but "
                f"only {self.size - pos} remain in the {self.size}-byte file"
            )
        return self._buf.read(n)

    def readline(self) -> bytes:
        line = self._buf.readline()
        if not line.endswith(b"\n"):
            raise DataError(f"'{self._source}' is truncated or corrupt: it ends inside a text opcode argument")
        return line


def _short(obj: Any) -> str:
    """A bounded repr of an unpickled value (a plain repr of shared nested lists can be huge)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxtuple = 3, 40, 40, 10
    return short.repr(obj)


def _nbytes(shape: Any, dtype: Any, source: str) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (Python ints: no overflow)."""
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise DataError(f"'{source}': array shape {_short(shape)} is not a tuple of non-negative integers")
    n = np.dtype(dtype).itemsize if not isinstance(dtype, np.dtype) else dtype.itemsize
    for d in dims:
        n *= d
    return n


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler with every allocation checked against what the file can hold.

    Globals: only those of :func:`_allowed_globals`. Calls (REDUCE, NEWOBJ, INST, OBJ): the plain builtins
    of :data:`_PLAIN_TYPES` freely; ``bytes`` / ``bytearray`` / numpy array constructions charged to a
    budget of the file's size; ``str`` and ``_codecs.encode`` only on strings and bytes (``str`` of a
    container would expand shared references); dtypes only plain (no object, structured or sub-array
    type). BUILD: only on numpy arrays (raw data of exactly the shape's size) and dtypes (a plain state).
    Memo indices: below the file size (each memo entry costs at least one byte of the file).
    """

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, reader: _BoundedReader, source: str):
        super().__init__(reader, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()
        self._size = reader.size
        self._budget = reader.size

    # ----------------------------------------------------------------------------- refusals
    def _refuse(self, what: str) -> DataError:
        return DataError(f"'{self._source}' is not a safe data pickle: {what}")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"'{self._source}': refused to unpickle global '{module}.{name}'; data pickles "
                "may hold only numpy arrays, lists, tuples, dicts and builtin scalars"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"'{self._source}': refused persistent id {_short(pid)} in a data pickle")

    def _charge(self, nbytes: int, what: Callable[[], str]) -> None:
        """Take ``nbytes`` from the budget; ``what()`` names the request in the error (formatted only then)."""
        if nbytes > self._budget:
            raise self._refuse(
                f"{what()} would allocate {nbytes} bytes, more than the {self._size}-byte file can hold"
            )
        self._budget -= nbytes

    def _memo_index(self, index: int, opcode: str) -> int:
        if index >= self._size:
            raise self._refuse(
                f"{opcode} stores memo index {index}, more than a {self._size}-byte file can hold"
            )
        return index

    # ----------------------------------------------------------------------------- calls
    def _call(self, func: Any, args: Any, kwargs: Any = None, new: bool = False) -> Any:
        """``func(*args, **kwargs)`` (or ``func.__new__(func, *args)``) after the checks of the class doc."""
        codecs, multiarray, numeric = _CALLABLES

        args = tuple(args) if isinstance(args, (tuple, list)) else args
        if not isinstance(args, tuple) or not isinstance(kwargs or {}, dict):
            raise self._refuse(f"call arguments of {_short(func)} are a {type(args).__name__}, not a tuple")
        kwargs = dict(kwargs or {})
        name = func.__qualname__ if isinstance(func, type) or callable(func) and hasattr(func, "__qualname__") \
            else f"a {type(func).__name__}"
        if any(func is t for t in _PLAIN_TYPES):
            pass
        elif func is bytes or func is bytearray:
            for a in [*args, *kwargs.values()]:
                if isinstance(a, int) and not isinstance(a, bool):
                    self._charge(a, lambda a=a: f"{name}({a})")
        elif func is str or func is codecs.encode:
            if any(not isinstance(a, (str, bytes, bytearray)) for a in [*args, *kwargs.values()]):
                kinds = ", ".join(type(a).__name__ for a in args)
                raise self._refuse(f"{name}() called on ({kinds}); only strings and bytes are allowed")
            if func is codecs.encode and (len(args) < 2 or str(args[1]).lower() not in ("latin1", "latin-1")):
                raise self._refuse(f"_codecs.encode with encoding {_short(args[1:2])}; only latin1 is allowed")
        elif func is np.dtype:
            if not args or not isinstance(args[0], str):
                raise self._refuse(f"numpy.dtype({_short(args[:1])}); only a type string is allowed")
            # Always a fresh instance (copy=True, as numpy's own pickles ask): a BUILD on a shared builtin
            # dtype would change it for the whole process.
            result = np.dtype(args[0], bool(args[1]) if len(args) > 1 else False, True)
            if result.hasobject or result.fields is not None or result.subdtype is not None:
                raise self._refuse(f"numpy dtype {_short(args[0])}; only plain numeric, bool, bytes and str dtypes")
            return result
        elif func is multiarray._reconstruct and not new:
            if len(args) != 3 or args[0] is not np.ndarray:
                raise self._refuse(f"numpy _reconstruct{_short(args)}; only plain ndarrays are allowed")
            self._charge(_nbytes(args[1], args[2], self._source), lambda: f"numpy array of shape {_short(args[1])}")
        elif func is multiarray.scalar and not new:
            if not args or not isinstance(args[0], np.dtype) or args[0].hasobject:
                raise self._refuse("numpy scalar of a non-plain dtype")
        elif func is numeric._frombuffer and not new:
            if len(args) != 4 or not isinstance(args[0], (bytes, bytearray, memoryview)) or \
                    not isinstance(args[1], np.dtype) or args[1].hasobject:
                raise self._refuse("numpy _frombuffer without a byte buffer and a plain dtype")
        else:  # numpy.ndarray itself (numpy's own pickles never call it), or any other allowed global
            raise self._refuse(f"{'constructing' if new else 'calling'} {name} is not allowed in a data pickle")
        if new:
            if not isinstance(func, type):
                raise self._refuse(f"NEWOBJ on {name}, which is not a type")
            return func.__new__(func, *args, **kwargs)
        return func(*args, **kwargs)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, new=True))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, kwargs, new=True))

    def _instantiate(self, klass: Any, args: Any) -> None:
        self.append(self._call(klass, args))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.ndarray:
            self._check_array_state(state)
        elif isinstance(inst, np.dtype):
            self._check_dtype_state(inst, state)
        else:
            raise self._refuse(f"BUILD (setting the state) of a {type(inst).__name__}; only numpy arrays "
                               "and dtypes take a state in a data pickle")
        inst.__setstate__(state)
        if isinstance(inst, np.dtype):
            plain = np.dtype(inst.str)
            if inst.hasobject or inst != plain or inst.flags != plain.flags or inst.itemsize != plain.itemsize \
                    or inst.alignment != plain.alignment:
                raise self._refuse(f"numpy dtype state {_short(state)} does not describe the plain dtype {inst.str}")

    def _check_array_state(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)):
            raise self._refuse("numpy array state is not (version, shape, dtype, is_fortran, data)")
        _, shape, dtype, _, data = state
        if dtype.hasobject or dtype.flags & _DTYPE_BAD_FLAGS:
            raise self._refuse(f"numpy array of dtype {dtype}; object arrays are not allowed")
        if not isinstance(data, (bytes, bytearray, str)):
            raise self._refuse(f"numpy array data is a {type(data).__name__}, not bytes")
        want = _nbytes(shape, dtype, self._source)
        if want != len(data):
            raise self._refuse(f"numpy array of shape {_short(shape)} and dtype {dtype} needs {want} bytes of "
                               f"data, the pickle holds {len(data)}")

    def _check_dtype_state(self, inst: np.dtype, state: Any) -> None:
        """A dtype state may change only the byte order: any other field (item size, alignment, flags,
        fields) would make numpy read an array's bytes past their end or as object pointers."""
        own = inst.__reduce__()[2]
        if not (isinstance(state, tuple) and len(state) == len(own) and state[1] in ("<", ">", "|", "=")
                and state[:1] + state[2:] == own[:1] + own[2:]):
            raise self._refuse(f"numpy dtype state {_short(state)}; for {inst.str} only {_short(own)} with "
                               "another byte order is allowed")

    # ----------------------------------------------------------------------------- memo and payloads
    def load_put(self) -> None:
        i = int(self.readline()[:-1])
        if i < 0:
            raise ValueError("negative PUT argument")
        self.memo[self._memo_index(i, "PUT")] = self.stack[-1]

    def load_binput(self) -> None:
        self.memo[self._memo_index(self.read(1)[0], "BINPUT")] = self.stack[-1]

    def load_long_binput(self) -> None:
        (i,) = struct.unpack("<I", self.read(4))
        self.memo[self._memo_index(i, "LONG_BINPUT")] = self.stack[-1]

    def load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))  # read first: the reader refuses a length beyond the file

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.PUT[0]] = load_put
    dispatch[pickle.BINPUT[0]] = load_binput
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _children(node: Any) -> Sequence[Any] | None:
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    return None


def _payload(node: Any) -> int:
    if isinstance(node, np.ndarray):
        return int(node.nbytes)
    if isinstance(node, (bytes, bytearray, str)):
        return len(node)
    return 0


def _check_unfolded_size(obj: Any, limit: int, source: str) -> None:
    """Refuse a result whose objects, with shared references unfolded, would take more than ``limit``
    bytes, that nests deeper than :data:`MAX_PICKLE_DEPTH` or holds a cycle: a few bytes of BINGETs make a
    nested list (or a list of one large array, repeated) whose copy by ``np.asarray`` or ``repr`` is huge.

    Each distinct object is visited once (its unfolded size is memoised), so this takes time linear in
    the file, however large the unfolded tree would be.
    """
    size: dict[int, int] = {}
    active: set[int] = set()  # the containers on the path from the root to the current one
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            active.discard(key)
            size[key] = 8 + sum(size[id(child)] for child in _children(node) or ())
        elif key in size:
            continue
        elif key in active:
            raise DataError(f"'{source}' is not a safe data pickle: a container holds itself (a cycle)")
        else:
            children = _children(node)
            if children is None:
                size[key] = 8 + _payload(node)
            else:
                if len(active) >= MAX_PICKLE_DEPTH:
                    raise DataError(f"'{source}' is not a safe data pickle: containers nest deeper than "
                                    f"{MAX_PICKLE_DEPTH} levels")
                active.add(key)
                stack.append((node, True))
                stack.extend((child, False) for child in children)
                continue
        if size[key] > limit:
            raise DataError(
                f"'{source}' is not a safe data pickle: its objects, with shared references unfolded, would "
                f"take {human_size(size[key])}, more than the {human_size(limit)} allowed for a "
                f"{human_size(os.path.getsize(source))} file"
            )


def safe_pickle_load(path: str) -> Any:
    """Unpickle a data file, admitting only numpy arrays, list, tuple, dict and builtin scalars.

    Nothing named by the pickle outside that set is imported or called: a file that references any other
    global (``os.system``, ``builtins.eval``, ...) raises DataError naming the file and the global. The
    memory it may cost is bounded by the file: memo indices, claimed payload lengths and constructed sizes
    beyond the file size are refused before anything of that size is allocated
    (:class:`_RestrictedUnpickler`), and so are results whose shared references would unfold past
    max(16 x the file size, 8 MiB) (:func:`_check_unfolded_size`).

    Raises:
        DataError: the file is missing, empty, truncated or corrupt, references a refused global, or asks
            for more memory than it can hold.
    """
    import mmap

    require_file(path, "a pickle of numpy arrays")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise DataError(f"'{path}' is empty (expected a pickle of numpy arrays)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _BoundedReader(buf, path)
            try:
                obj = _RestrictedUnpickler(reader, path).load()
            except DataError:
                raise
            except (
                pickle.UnpicklingError,
                struct.error,
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
                SystemError,
            ) as exc:
                raise DataError(
                    f"'{path}' is truncated or corrupt: cannot unpickle it ({type(exc).__name__}: {exc})"
                ) from exc
    _check_unfolded_size(obj, max(UNFOLDED_PER_FILE_BYTE * reader.size, UNFOLDED_FLOOR), path)
    return obj


def atomic_pickle_dump(obj: Any, path: str) -> None:
    """Pickle ``obj`` to ``path`` through a temporary file in the same folder, then rename it."""
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=4))


# --------------------------------------------------------------------------------- the .dat cache
def load_cloud_cache(
    path: str, num_classes: int, min_points: int = 1, min_columns: int = 3, n_points: int | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Read a ModelNet-style ``.dat`` cache: a pickle of ``[list of float32 (N, C), list of int (1,)]``.

    Args:
        path: the cache.
        num_classes: labels must lie in ``[0, num_classes)``.
        min_points: rows every cloud needs (the ``npoints`` a run takes).
        min_columns: columns every cloud needs (3, or 6 with normals).
        n_points: the point count the cache's name states (``..._{n_points}pts_fps.dat``): every cloud
            must have exactly that many rows. None skips the check.

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
    clouds = [check_cloud(cloud, f"'{path}' entry {i}", 1, min_columns) for i, cloud in enumerate(points)]
    mismatch = point_count_mismatch(clouds, n_points)
    if mismatch:
        first, held = mismatch
        raise DataError(
            f"'{path}': its name says {n_points} points per cloud, but entry {first} has {len(clouds[first])} "
            f"(clouds by point count: {held}); rebuild it (prepare_data.py modelnet-cache / mesh-folder "
            f"--n-points {n_points}) or rename it after the count it holds"
        )
    short = next((i for i, c in enumerate(clouds) if len(c) < min_points), None)
    if short is not None:
        raise DataError(f"'{path}' entry {short}: too few points: {len(clouds[short])} < {min_points} required")
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
