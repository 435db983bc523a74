"""ShapeNet-55 / ShapeNet-34 pre-training data in the Point-BERT layout (REFERENCE 4.1).

``<PC_PATH>/<synset>-<modelid>.npy`` holds one float (8192, 3) cloud per shape and
``<DATA_PATH>/{train,test}.txt`` list the file names of each split.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np

from datasets.build import DATASETS
from datasets.transforms import pc_norm
from datasets.io import (
    DatasetLayout,
    PointDataset,
    check_cloud,
    check_points,
    load_npy,
    read_lines,
    register_layout,
    require_root,
    sample_indices,
)
from datasets.packed import PackedClouds, write_pack
from utils.errors import ConfigError, DataError

LAYOUT = register_layout(
    DatasetLayout(
        key="shapenet",
        title="ShapeNet-55/34",
        root_hint="data/ShapeNet55-34",
        tree=(
            "ShapeNet55-34/\n"
            "├── shapenet_pc/                 (PC_PATH)\n"
            "│   ├── 02691156-1a04e3eab45ca15dd86060f189eb133.npy   float (8192, 3)\n"
            "│   └── ...\n"
            "└── ShapeNet-55/                 (DATA_PATH; ShapeNet-34/ has the same files)\n"
            "    ├── train.txt                one .npy name per line (41,952)\n"
            "    └── test.txt                 (10,518)"
        ),
        required=(
            ("shapenet_pc/",),
            ("shapenet_pc/*.npy",),
            ("ShapeNet-55/train.txt", "ShapeNet-34/train.txt"),
            ("ShapeNet-55/test.txt", "ShapeNet-34/test.txt"),
        ),
        source="Point-BERT DATASET.md (https://github.com/lulutang0608/Point-BERT/blob/master/DATASET.md), "
        "as pointed to by Point-MAE's DATASET.md",
    )
)


@DATASETS.register("ShapeNet")
class ShapeNet(PointDataset):
    """ShapeNet-55/34 clouds: a seeded random subset of ``npoints`` of the first ``n_points``, normalised.

    Each access draws ``npoints`` distinct rows among the first ``n_points`` rows of the stored cloud
    (the official permutation of ``arange(N_POINTS)``) with a generator seeded by ``(seed, epoch, index)``,
    then applies ``pc_norm`` (centre, unit sphere). ``label`` is the index of the shape's synset in
    :attr:`classes`, the sorted synsets of every split list found in ``data_path``, so train and test
    share one mapping.

    Args:
        data_path: folder with ``train.txt`` / ``test.txt`` (``DATA_PATH``).
        pc_path: folder with the ``.npy`` clouds (``PC_PATH``).
        n_points: rows stored per cloud that the subset is drawn from (``N_POINTS``, 8192).
        subset: ``train`` or ``test``.
        npoints: points per item (1024 in Point-MAE, 2048 in Point-M2AE).
        whole: train on train + test (Point-BERT's ``whole: True``; test list first); train subset only.
        seed: base seed of the subset draws; None for unseeded draws as in the official code.
        packed_path: read the clouds from this pack (``PACKED_PATH``; the manifest ``.json`` written by
            ``tools/prepare_data.py pack shapenet``) instead of one ``.npy`` per shape; ``pc_path`` is then
            not read. The split lists still come from ``data_path``, so items, labels and order are the
            same.
    """

    def __init__(
        self,
        data_path: str,
        pc_path: str,
        n_points: int = 8192,
        subset: Literal["train", "test"] = "train",
        npoints: int = 1024,
        whole: bool = False,
        seed: int | None = 0,
        packed_path: str | None = None,
    ):
        super().__init__(seed)
        if npoints > n_points:
            raise ConfigError(f"ShapeNet: npoints={npoints} exceeds N_POINTS={n_points}")
        if whole and subset != "train":
            raise ConfigError(
                f"ShapeNet: whole=True merges test into train; it is not valid for subset '{subset}'"
            )
        require_root(data_path, LAYOUT, "DATA_PATH (split lists)")
        self.packed = PackedClouds(packed_path, "ShapeNet", 3) if packed_path else None
        if self.packed is None:
            require_root(pc_path, LAYOUT, "PC_PATH (.npy clouds)")
        self.pc_path, self.n_points, self.npoints, self.subset = pc_path, n_points, npoints, subset
        lists = {s: os.path.join(data_path, f"{s}.txt") for s in ("train", "test")}
        files = read_lines(lists[subset], "one ShapeNet .npy file name per line")
        if whole:
            files = read_lines(lists["test"], "one ShapeNet .npy file name per line") + files
        bad = [f for f in files if "-" not in f]
        if bad:
            raise DataError(f"'{lists[subset]}': entry '{bad[0]}' is not '<synset>-<modelid>.npy'")
        if self.packed is not None:
            absent = self.packed.missing(files)
            where = f"the pack '{self.packed.manifest_path}' (pack it again from the full shapenet_pc/)"
        else:
            present = set(os.listdir(pc_path))
            absent = [f for f in files if f not in present]
            where = f"'{pc_path}'"
        if absent:
            raise DataError(
                f"{len(absent)} file(s) listed in '{lists[subset]}' are missing from {where}, "
                f"e.g. {absent[:3]}"
            )
        synsets = {f.split("-", 1)[0] for f in files}
        for path in lists.values():
            if os.path.isfile(path):
                synsets.update(line.split("-", 1)[0] for line in read_lines(path, "ShapeNet file names"))
        self.classes = sorted(synsets)
        self.num_classes = len(self.classes)
        self._class_index = {s: i for i, s in enumerate(self.classes)}
        self.files = files
        if self.packed is not None:
            self._pack_index = [self.packed.index_of(f) for f in files]
            sizes = np.diff(self.packed.offsets)[self._pack_index]
            if (sizes < n_points).any():
                j = int(np.flatnonzero(sizes < n_points)[0])
                raise DataError(f"'{self.packed.manifest_path}': item '{files[j]}': too few points: "
                                f"{sizes[j]} < {n_points} required (N_POINTS)")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        fname = self.files[index]
        choice = sample_indices(self.n_points, self.npoints, self._rng(index))
        if self.packed is not None:
            # Values were checked when packing; the drawn rows are checked again (cheap, and a pack edited
            # since still cannot feed bad coordinates).
            rows = self.packed.cloud(self._pack_index[index])[choice]
            picked = check_points(rows, f"'{self.packed.data_path}' item '{fname}'")
        else:
            path = os.path.join(self.pc_path, fname)
            cloud = check_cloud(load_npy(path), f"'{path}'", self.n_points)
            picked = cloud[choice, :3]
        points = pc_norm(np.asarray(picked, dtype=np.float32))
        return self._item(points, self._class_index[fname.split("-", 1)[0]], os.path.splitext(fname)[0])


def pack_shapenet(pc_path: str, out: str) -> dict:
    """Pack the xyz of every ``*.npy`` of ``pc_path`` (sorted by name; each checked like the loader does)
    into ``out`` (see :mod:`datasets.packed`); returns the manifest. Items keep their file names, so every
    split list (ShapeNet-55 and -34) reads from the one pack."""
    require_root(pc_path, LAYOUT, "PC_PATH (.npy clouds)")
    files = sorted(f for f in os.listdir(pc_path) if f.endswith(".npy"))
    if not files:
        raise DataError(f"'{pc_path}' holds no .npy clouds\n{LAYOUT.describe()}")

    def items():
        for f in files:
            path = os.path.join(pc_path, f)
            yield f, check_cloud(load_npy(path), f"'{path}'")[:, :3]

    return write_pack(out, items(), dataset="ShapeNet", source=pc_path, columns=3)
