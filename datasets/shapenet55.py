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
    load_npy,
    read_lines,
    register_layout,
    require_root,
    sample_indices,
)
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
    ):
        super().__init__(seed)
        if npoints > n_points:
            raise ConfigError(f"ShapeNet: npoints={npoints} exceeds N_POINTS={n_points}")
        if whole and subset != "train":
            raise ConfigError(
                f"ShapeNet: whole=True merges test into train; it is not valid for subset '{subset}'"
            )
        require_root(data_path, LAYOUT, "DATA_PATH (split lists)")
        require_root(pc_path, LAYOUT, "PC_PATH (.npy clouds)")
        self.pc_path, self.n_points, self.npoints, self.subset = pc_path, n_points, npoints, subset
        lists = {s: os.path.join(data_path, f"{s}.txt") for s in ("train", "test")}
        files = read_lines(lists[subset], "one ShapeNet .npy file name per line")
        if whole:
            files = read_lines(lists["test"], "one ShapeNet .npy file name per line") + files
        bad = [f for f in files if "-" not in f]
        if bad:
            raise DataError(f"'{lists[subset]}': entry '{bad[0]}' is not '<synset>-<modelid>.npy'")
        present = set(os.listdir(pc_path))
        absent = [f for f in files if f not in present]
        if absent:
            raise DataError(
                f"{len(absent)} file(s) listed in '{lists[subset]}' are missing from '{pc_path}', "
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

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        fname = self.files[index]
        path = os.path.join(self.pc_path, fname)
        cloud = check_cloud(load_npy(path), f"'{path}'", self.n_points)
        choice = sample_indices(self.n_points, self.npoints, self._rng(index))
        points = pc_norm(np.asarray(cloud[choice, :3], dtype=np.float32))
        return self._item(points, self._class_index[fname.split("-", 1)[0]], os.path.splitext(fname)[0])
