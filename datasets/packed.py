"""Packed, memory-mapped clouds: one ``.npy`` of every cloud's rows plus a JSON manifest.

The per-file data sets (ShapeNet-55/34: one ``.npy`` per shape; ShapeNetPart: one ``.txt`` per shape)
open a file per item, which cannot feed thousands of samples per second. A pack holds the same clouds in
two files built once by ``tools/prepare_data.py pack``:

* ``<stem>.npy``: float32 (total_rows, columns), the clouds one after the other, read with
  ``np.load(mmap_mode="r")`` so only the pages an item touches are read;
* ``<stem>.json``: the manifest: ``format``, ``dataset`` (the loader it is for), ``source`` (the folder
  it was built from), ``count`` (items), ``rows``, ``columns``, ``dtype``, ``data_file``, ``data_bytes``,
  ``names`` (one key per item, e.g. the official file name) and ``offsets`` (count + 1 row offsets).

Both are written with :func:`utils.io.atomic_write`, the data first and the manifest last (an old
manifest is deleted before the data is replaced), so a crash leaves no pack that reads as complete.
Reading checks the manifest against the data file (format, dataset, size, dtype, shape, count, offsets)
and raises :class:`~utils.errors.DataError` naming the file. Values are checked when packing; loaders
check the rows they draw again (:func:`datasets.io.check_points`).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from utils.errors import DataError
from utils.io import atomic_write

__all__ = ["PACK_FORMAT", "PackedClouds", "pack_paths", "write_pack"]

PACK_FORMAT = "geomask3d-pack/1"
_HEADER_LEN = 128  # fixed .npy header size, so the final shape can be written after streaming the rows


def pack_paths(path: str) -> tuple[str, str]:
    """``(manifest, data)`` paths of a pack given its manifest ``.json``, its ``.npy`` or its stem."""
    stem = path
    for suffix in (".json", ".npy"):
        if path.endswith(suffix):
            stem = path[: -len(suffix)]
    return stem + ".json", stem + ".npy"


def _npy_header(rows: int, columns: int) -> bytes:
    """A version-1.0 ``.npy`` header for float32 (rows, columns), padded to :data:`_HEADER_LEN` bytes."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {columns}), }}"
    pad = _HEADER_LEN - 10 - len(text) - 1
    if pad < 0:
        raise DataError(f"pack too large for its header: shape ({rows}, {columns})")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_LEN - 10) + (text + " " * pad + "\n").encode()


def write_pack(path: str, items: Iterable[tuple[str, np.ndarray]], *, dataset: str, source: str,
               columns: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stream ``(name, float32 (N_i, columns) cloud)`` pairs into a pack at ``path`` (manifest or stem).

    The clouds are written as read (one pass, constant memory); names must be unique. Returns the
    manifest. ``extra`` adds keys to the manifest (e.g. the settings used).
    """
    manifest_path, data_path = pack_paths(path)
    if os.path.exists(manifest_path):  # the old manifest must never describe the new data
        os.remove(manifest_path)
    names: list[str] = []
    offsets = [0]

    def write_data(f) -> None:
        f.write(_npy_header(0, columns))
        for name, cloud in items:
            arr = np.ascontiguousarray(cloud, dtype="<f4")
            if arr.ndim != 2 or arr.shape[1] != columns:
                raise DataError(
                    f"pack '{data_path}': item '{name}' has shape {arr.shape}; expected (N, {columns})")
            f.write(arr.tobytes())
            names.append(name)
            offsets.append(offsets[-1] + arr.shape[0])
        f.seek(0)
        f.write(_npy_header(offsets[-1], columns))
        f.seek(0, os.SEEK_END)

    atomic_write(data_path, write_data)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        os.remove(data_path)
        raise DataError(f"pack '{data_path}': item name '{dup}' occurs more than once")
    manifest = {
        "format": PACK_FORMAT,
        "dataset": dataset,
        "source": os.path.abspath(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "count": len(names),
        "rows": offsets[-1],
        "columns": columns,
        "dtype": "float32",
        "data_file": os.path.basename(data_path),
        "data_bytes": os.path.getsize(data_path),
        **(extra or {}),
        "names": names,
        "offsets": offsets,
    }
    text = json.dumps(manifest)
    atomic_write(manifest_path, lambda f: f.write(text), binary=False)
    return manifest


class PackedClouds:
    """Read access to a pack: ``names``, ``index_of(name)`` and ``cloud(i)`` (a read-only memmap view).

    Args:
        path: the manifest ``.json`` (or the pack's stem / ``.npy``).
        dataset: the loader name the pack must have been built for (``ShapeNet``, ``ShapeNetPart``).
        columns: the column count the loader needs.

    The memory map is opened lazily in each process, so the object pickles cheaply into DataLoader
    workers (the map itself is not copied).
    """

    def __init__(self, path: str, dataset: str, columns: int):
        self.manifest_path, data_path = pack_paths(path)
        if not os.path.isfile(self.manifest_path):
            raise DataError(
                f"missing pack manifest '{self.manifest_path}' (expected the .json written by "
                f"`python tools/prepare_data.py pack`; an interrupted pack has no manifest: run it again)"
            )
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                m = json.load(f)
        except (ValueError, OSError) as exc:
            raise DataError(f"pack manifest '{self.manifest_path}' is truncated or corrupt ({exc})") from exc
        where = f"pack manifest '{self.manifest_path}'"
        if not isinstance(m, dict) or m.get("format") != PACK_FORMAT:
            found = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise DataError(f"{where}: format {found!r}; expected {PACK_FORMAT!r}")
        if m.get("dataset") != dataset:
            raise DataError(f"{where} was built for {m.get('dataset')!r}, not for {dataset!r}")
        for key in ("count", "rows", "columns", "data_bytes"):
            if not isinstance(m.get(key), int) or m[key] < 0:
                raise DataError(f"{where}: '{key}' is {m.get(key)!r}; expected a non-negative integer")
        if m["columns"] < columns or m.get("dtype") != "float32":
            raise DataError(f"{where}: {m['columns']} columns of {m.get('dtype')}; expected float32 with at "
                            f"least {columns} columns")
        names, offsets = m.get("names"), m.get("offsets")
        if not isinstance(names, list) or len(names) != m["count"] or len(set(names)) != len(names):
            raise DataError(f"{where}: 'names' must list {m['count']} distinct item names")
        off = np.asarray(offsets if isinstance(offsets, list) else [], dtype=np.int64)
        if off.shape != (m["count"] + 1,) or off[0] != 0 or off[-1] != m["rows"] or (np.diff(off) < 1).any():
            raise DataError(f"{where}: 'offsets' must be {m['count'] + 1} increasing row offsets from 0 to "
                            f"{m['rows']}")
        self.data_path = os.path.join(os.path.dirname(self.manifest_path), str(m.get("data_file")))
        if not os.path.isfile(self.data_path):
            raise DataError(f"missing pack data '{self.data_path}' (named by {where})")
        size = os.path.getsize(self.data_path)
        if size != m["data_bytes"]:
            raise DataError(f"pack data '{self.data_path}' has {size} bytes; {where} records "
                            f"{m['data_bytes']} (truncated or replaced: pack again)")
        self.manifest = {k: v for k, v in m.items() if k not in ("names", "offsets")}
        self.names: list[str] = names
        self.offsets = off
        self.columns = columns
        self._index = {n: i for i, n in enumerate(names)}
        self._data: np.ndarray | None = None
        data = self._open()
        if data.dtype != np.float32 or data.shape != (m["rows"], m["columns"]):
            raise DataError(f"pack data '{self.data_path}' holds {data.dtype} {data.shape}; {where} records "
                            f"float32 ({m['rows']}, {m['columns']})")

    def _open(self) -> np.ndarray:
        if self._data is None:
            try:
                # A plain ndarray view of the map: indexing a np.memmap costs ~10x more per item.
                self._data = np.asarray(np.load(self.data_path, mmap_mode="r", allow_pickle=False))
            except (ValueError, OSError) as exc:
                raise DataError(f"pack data '{self.data_path}' is not a readable .npy ({exc})") from exc
        return self._data

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return len(self.names)

    def index_of(self, name: str) -> int | None:
        """The pack index of item ``name``, or None when the pack lacks it."""
        return self._index.get(name)

    def missing(self, names: Iterable[str]) -> list[str]:
        """The ``names`` the pack does not hold."""
        return [n for n in names if n not in self._index]

    def cloud(self, i: int) -> np.ndarray:
        """Item ``i``: a read-only (N_i, columns) view into the memory map."""
        return self._open()[self.offsets[i]: self.offsets[i + 1], : self.columns]

    def describe(self) -> str:
        """One line: the pack, its item count and its source."""
        m = self.manifest
        return (f"{self.manifest_path}: {len(self)} {m['dataset']} items, {m['rows']} x {m['columns']} "
                f"float32, from {m['source']}")
