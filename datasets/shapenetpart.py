"""ShapeNetPart part segmentation in the official layout (REFERENCE 4.6).

``shapenetcore_partanno_segmentation_benchmark_v0_normal/`` holds ``<synset>/<id>.txt`` (whitespace
separated, 7 columns: x y z nx ny nz part), ``synsetoffset2category.txt`` (``Airplane 02691156``; the
line order is the category index) and ``train_test_split/shuffled_{train,val,test}_file_list.json``
(entries ``shape_data/<synset>/<id>``). 16 categories, 50 parts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import numpy as np

from datasets.build import DATASETS
from datasets.transforms import pc_norm
from datasets.io import (
    DatasetLayout,
    PointDataset,
    check_cloud,
    load_txt,
    read_lines,
    register_layout,
    require_file,
    require_root,
    sample_indices,
)
from datasets.packed import PackedClouds, write_pack
from utils.errors import DataError

SEG_CLASSES: dict[str, list[int]] = {
    "Airplane": [0, 1, 2, 3],
    "Bag": [4, 5],
    "Cap": [6, 7],
    "Car": [8, 9, 10, 11],
    "Chair": [12, 13, 14, 15],
    "Earphone": [16, 17, 18],
    "Guitar": [19, 20, 21],
    "Knife": [22, 23],
    "Lamp": [24, 25, 26, 27],
    "Laptop": [28, 29],
    "Motorbike": [30, 31, 32, 33, 34, 35],
    "Mug": [36, 37],
    "Pistol": [38, 39, 40],
    "Rocket": [41, 42, 43],
    "Skateboard": [44, 45, 46],
    "Table": [47, 48, 49],
}
NUM_PARTS = 50

LAYOUT = register_layout(
    DatasetLayout(
        key="shapenetpart",
        title="ShapeNetPart",
        root_hint="data/shapenetcore_partanno_segmentation_benchmark_v0_normal",
        tree=(
            "shapenetcore_partanno_segmentation_benchmark_v0_normal/   (ROOT)\n"
            "├── synsetoffset2category.txt    'Airplane 02691156' ... (16 lines; order = category index)\n"
            "├── train_test_split/\n"
            '│   ├── shuffled_train_file_list.json   ["shape_data/02691156/<id>", ...]\n'
            "│   ├── shuffled_val_file_list.json\n"
            "│   └── shuffled_test_file_list.json\n"
            "├── 02691156/1a04e3eab45ca15dd86060f189eb133.txt   x y z nx ny nz part (whitespace)\n"
            "└── ... (one folder per synset)"
        ),
        required=(
            ("synsetoffset2category.txt",),
            ("train_test_split/shuffled_train_file_list.json",),
            ("train_test_split/shuffled_val_file_list.json",),
            ("train_test_split/shuffled_test_file_list.json",),
            ("02691156/",),
        ),
        source="https://shapenet.cs.stanford.edu/media/"
        "shapenetcore_partanno_segmentation_benchmark_v0_normal.zip "
        "(Point-MAE DATASET.md; the link is dead, a mirror is given in "
        "https://github.com/Pang-Yatian/Point-MAE/issues/56)",
    )
)

_SPLIT_FILES = {"trainval": ("train", "val"), "train": ("train",), "val": ("val",), "test": ("test",)}


def read_categories(root: str) -> list[tuple[str, str]]:
    """``(name, synset)`` pairs of ``synsetoffset2category.txt`` in file order (= category index)."""
    path = os.path.join(root, "synsetoffset2category.txt")
    pairs = []
    for line in read_lines(path, "lines '<Category> <synset>'"):
        fields = line.split()
        if len(fields) != 2 or fields[0] not in SEG_CLASSES:
            raise DataError(
                f"'{path}': line '{line}' is not '<Category> <synset>' with a category among "
                f"{sorted(SEG_CLASSES)}"
            )
        pairs.append((fields[0], fields[1]))
    return pairs


def read_split(root: str, split: str) -> list[tuple[str, str]]:
    """``(synset, id)`` pairs listed by ``train_test_split/shuffled_{split}_file_list.json``."""
    path = require_file(
        os.path.join(root, "train_test_split", f"shuffled_{split}_file_list.json"),
        "a JSON list of 'shape_data/<synset>/<id>' entries",
    )
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise DataError(f"'{path}' is truncated or corrupt: not valid JSON ({exc})") from exc
    out = []
    for entry in entries if isinstance(entries, list) else [entries]:
        parts = entry.split("/") if isinstance(entry, str) else []
        if len(parts) < 3:
            raise DataError(f"'{path}': entry {entry!r} is not 'shape_data/<synset>/<id>'")
        out.append((parts[1], parts[2]))
    return out


@DATASETS.register("ShapeNetPart")
class ShapeNetPart(PointDataset):
    """ShapeNetPart shapes: normalised xyz, per-point part labels, category index.

    Per item: the whole shape is normalised (centre, unit sphere), then ``npoints`` points are drawn.

    * ``sampling="seeded"`` (default): distinct points (a seeded permutation; shapes with fewer points
      than ``npoints`` keep all of them and fill up with repeats). The test and val subsets draw with
      ``(seed, index)`` only, so every evaluation scores the same points; train draws with
      ``(seed, epoch, index)``. The official evaluation resamples with replacement at random, which
      makes test scores vary from run to run (REFERENCE 9, evaluation hygiene).
    * ``sampling="official"``: the official i.i.d. draw with replacement at every access, for every
      subset, keyed by ``(seed, epoch, index)``; ``seed=None`` reproduces the unseeded original.

    Item keys: ``points`` (npoints, 3), ``label`` = ``category`` (index in :attr:`classes`), ``seg``
    int64 (npoints,) in 0..49, ``name`` ``<synset>/<id>``, and ``normals`` (npoints, 3) if asked.

    Args:
        root: the ``shapenetcore_partanno_segmentation_benchmark_v0_normal`` folder (``ROOT``).
        subset: ``trainval`` (training), ``train``, ``val`` or ``test``.
        npoints: points per item (2048 officially).
        use_normals: also return ``normals`` (the official ``--normal``).
        class_choice: keep only these categories (their indices stay the original ones).
        sampling: ``seeded`` or ``official`` (see above).
        cache: keep parsed shapes in memory after their first access.
        seed: base seed of the draws.
        packed_path: read the shapes from this pack (``PACKED_PATH``; the manifest ``.json`` written by
            ``tools/prepare_data.py pack shapenetpart``) instead of one ``.txt`` per shape; the category
            file and split lists still come from ``root``, so items and order are the same.
    """

    def __init__(
        self,
        root: str,
        subset: Literal["trainval", "train", "val", "test"] = "trainval",
        npoints: int = 2048,
        use_normals: bool = False,
        class_choice: list[str] | None = None,
        sampling: Literal["seeded", "official"] = "seeded",
        cache: bool = True,
        seed: int | None = 0,
        packed_path: str | None = None,
    ):
        super().__init__(seed)
        require_root(root, LAYOUT, "ROOT")
        self.packed = PackedClouds(packed_path, "ShapeNetPart", 7) if packed_path else None
        categories = read_categories(root)
        self.classes = [name for name, _ in categories]
        self.num_classes = len(self.classes)
        self.num_parts = NUM_PARTS
        self.seg_classes = {name: list(SEG_CLASSES[name]) for name in self.classes}
        unknown = sorted(set(class_choice or ()) - set(self.classes))
        if unknown:
            raise DataError(f"ShapeNetPart: class_choice {unknown} not in '{root}/synsetoffset2category.txt'")
        wanted = {
            syn: i for i, (name, syn) in enumerate(categories) if class_choice is None or name in class_choice
        }
        listed: dict[str, set[str]] = {syn: set() for syn in wanted}
        known = {syn for _, syn in categories}
        for split in _SPLIT_FILES[subset]:
            for synset, shape_id in read_split(root, split):
                if synset not in known:
                    raise DataError(
                        f"'{root}/train_test_split/shuffled_{split}_file_list.json' lists synset "
                        f"'{synset}', which is not in synsetoffset2category.txt"
                    )
                if synset in listed:
                    listed[synset].add(shape_id)
        self.items: list[tuple[str, int, str]] = []
        for synset, category in wanted.items():
            folder = os.path.join(root, synset)
            if self.packed is not None:
                wanted_keys = (f"{synset}/{sid}" for sid in listed[synset])
                absent = sorted(key.split("/", 1)[1] for key in self.packed.missing(wanted_keys))
                source = f"the pack '{self.packed.manifest_path}'"
            else:
                files = os.listdir(folder) if os.path.isdir(folder) else []
                present = {os.path.splitext(f)[0] for f in files}
                absent = sorted(listed[synset] - present)
                source = f"'{folder}'"
            if absent:
                raise DataError(
                    f"{len(absent)} shape(s) of '{self.classes[category]}' listed for '{subset}' are "
                    f"missing from {source}, e.g. {absent[:3]} (listed in "
                    + ", ".join(
                        f"'{root}/train_test_split/shuffled_{split}_file_list.json'"
                        for split in _SPLIT_FILES[subset]
                    )
                    + ")"
                )
            self.items.extend(
                (os.path.join(folder, f"{sid}.txt"), category, f"{synset}/{sid}")
                for sid in sorted(listed[synset])
            )
        self.npoints, self.use_normals, self.sampling, self.subset = npoints, use_normals, sampling, subset
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised xyz (+ normals) float32 (N, 3 or 6) and part labels (N,) of shape ``index``."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        path, category, name = self.items[index]
        if self.packed is not None:
            source = f"'{self.packed.data_path}' item '{name}'"
            raw = self.packed.cloud(self.packed.index_of(name))
        else:
            source, raw = f"'{path}'", load_txt(path, 7)
        data = check_cloud(raw, source, 1, 7)
        seg = data[:, 6]
        allowed = SEG_CLASSES[self.classes[category]]
        bad = (seg != np.round(seg)) | (seg < allowed[0]) | (seg > allowed[-1])
        if bad.any():
            raise DataError(
                f"{source}: part label out of range: {seg[bad][0].item()}; expected "
                f"{allowed[0]}..{allowed[-1]} for {self.classes[category]}"
            )
        cloud = (
            np.concatenate([pc_norm(np.asarray(data[:, :3], dtype=np.float32)), data[:, 3:6]], axis=1)
            if self.use_normals
            else pc_norm(np.asarray(data[:, :3], dtype=np.float32))
        )
        entry = (cloud, seg.astype(np.uint8))
        if self._cache is not None:
            self._cache[index] = entry
        return entry

    def __getitem__(self, index: int) -> dict[str, Any]:
        cloud, seg = self._load(index)
        official = self.sampling == "official"
        rng = self._rng(index, per_epoch=official or self.subset in ("trainval", "train"))
        choice = sample_indices(len(cloud), self.npoints, rng, replace=official)
        _, category, name = self.items[index]
        extra: dict[str, Any] = {"normals": cloud[choice, 3:6]} if self.use_normals else {}
        return self._item(
            cloud[choice], category, name, seg=seg[choice].astype(np.int64), category=category, **extra
        )


def pack_shapenetpart(root: str, out: str) -> dict:
    """Pack every ``<synset>/<id>.txt`` of the categories in ``synsetoffset2category.txt`` (7 columns,
    checked like the loader does; sorted by ``<synset>/<id>``, the item names) into ``out`` (see
    :mod:`datasets.packed`); returns the manifest."""
    require_root(root, LAYOUT, "ROOT")
    keys = []
    for _, synset in read_categories(root):
        folder = os.path.join(root, synset)
        if os.path.isdir(folder):
            keys.extend(f"{synset}/{f[:-4]}" for f in os.listdir(folder) if f.endswith(".txt"))
    if not keys:
        raise DataError(f"'{root}' holds no <synset>/<id>.txt shapes\n{LAYOUT.describe()}")

    def items():
        for key in sorted(keys):
            path = os.path.join(root, f"{key}.txt")
            yield key, check_cloud(load_txt(path, 7), f"'{path}'", 1, 7)

    return write_pack(out, items(), dataset="ShapeNetPart", source=root, columns=7)
