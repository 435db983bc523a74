"""ScanObjectNN in the official h5 layout (REFERENCE 4.5): OBJ-BG, OBJ-ONLY and PB-T50-RS ("hardest").

``main_split/{training,test}_objectdataset.h5`` (OBJ-BG), ``main_split_nobg/{training,test}_objectdataset.h5``
(OBJ-ONLY) and ``main_split/{training,test}_objectdataset_augmentedrot_scale75.h5`` (PB-T50-RS), each with
``data`` (N, 2048, 3) and ``label`` (N,). The clouds are used as stored: no normalisation.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np

from datasets.build import DATASETS
from datasets.io import (
    DatasetLayout,
    InMemoryClouds,
    check_labels,
    check_points,
    read_h5,
    register_layout,
    require_root,
)
from utils.errors import ConfigError, DataError

CLASSES = [
    "bag",
    "bin",
    "box",
    "cabinet",
    "chair",
    "desk",
    "display",
    "door",
    "shelf",
    "table",
    "bed",
    "pillow",
    "sink",
    "sofa",
    "toilet",
]

# M2AE SPLIT -> (folder, file stem after "training_" / "test_")
SPLITS: dict[str, tuple[str, str]] = {
    "OBJ-BG": ("main_split", "objectdataset"),
    "OBJ": ("main_split_nobg", "objectdataset"),
    "PB": ("main_split", "objectdataset_augmentedrot_scale75"),
}

LAYOUT = register_layout(
    DatasetLayout(
        key="scanobjectnn",
        title="ScanObjectNN",
        root_hint="data/ScanObjectNN",
        tree=(
            "ScanObjectNN/\n"
            "├── main_split/                  (ROOT of OBJ-BG and PB-T50-RS)\n"
            "│   ├── training_objectdataset_augmentedrot_scale75.h5   data (N, 2048, 3), label (N,)\n"
            "│   ├── test_objectdataset_augmentedrot_scale75.h5\n"
            "│   ├── training_objectdataset.h5\n"
            "│   └── test_objectdataset.h5\n"
            "└── main_split_nobg/             (ROOT of OBJ-ONLY)\n"
            "    ├── training_objectdataset.h5\n"
            "    └── test_objectdataset.h5"
        ),
        required=tuple(
            (f"{folder}/{prefix}_{stem}.h5",)
            for folder, stem in sorted(set(SPLITS.values()))
            for prefix in ("training", "test")
        ),
        source="the ScanObjectNN site https://hkust-vgd.github.io/scanobjectnn/ (download form), "
        "as pointed to by "
        "Point-MAE's DATASET.md",
    )
)


def _split_folder(root: str, split: str) -> str:
    """The folder holding ``split``'s files: ``root`` itself or its ``main_split[_nobg]`` sub-folder."""
    folder = SPLITS[split][0]
    base = os.path.basename(os.path.normpath(root))
    if base == folder:
        return root
    if base in {f for f, _ in SPLITS.values()}:
        raise ConfigError(
            f"ScanObjectNN: SPLIT '{split}' is stored in '{folder}/', but ROOT is '{root}' "
            f"(that would load a different variant)"
        )
    return os.path.join(root, folder)


@DATASETS.register("ScanObjectNN")
class ScanObjectNN(InMemoryClouds):
    """ScanObjectNN clouds exactly as stored (no normalisation), point order shuffled for train (seeded).

    Two ways to choose the variant:

    * Point-MAE: ``root`` is ``main_split`` (OBJ-BG) or ``main_split_nobg`` (OBJ-ONLY) and the files are
      ``{training,test}_objectdataset.h5``; PB-T50-RS is the separate NAME ``ScanObjectNN_hardest``.
    * Point-M2AE: ``split`` in {OBJ-BG, OBJ, PB}; ``root`` is the ``main_split[_nobg]`` folder of that
      split or the ``ScanObjectNN`` folder above it. A ``root`` of the other variant is a ConfigError.

    Args:
        root: the folder (``ROOT``).
        subset: ``train`` or ``test``.
        split: M2AE variant name (``SPLIT``); None for the Point-MAE convention.
        n_points: points per item, the first stored rows (``N_POINTS``); None keeps all 2048.
        seed: base seed of the train shuffle.
    """

    _stem = "objectdataset"

    def __init__(
        self,
        root: str,
        subset: Literal["train", "test"] = "train",
        split: Literal["OBJ-BG", "OBJ", "PB"] | None = None,
        n_points: int | None = None,
        seed: int | None = 0,
    ):
        require_root(root, LAYOUT, "ROOT")
        folder, stem = (_split_folder(root, split), SPLITS[split][1]) if split else (root, self._stem)
        path = os.path.join(folder, f"{'training' if subset == 'train' else 'test'}_{stem}.h5")
        data = read_h5(path, ("data", "label"))
        points = check_points(data["data"], f"'{path}' 'data'", ("cloud", "point", "column"))
        labels = data["label"]
        if points.ndim != 3 or points.shape[2] < 3:
            raise DataError(f"'{path}': 'data' has shape {points.shape}; expected (N, P, 3)")
        if len(points) != labels.size:
            raise DataError(f"'{path}': {len(points)} clouds but {labels.size} labels")
        if points.shape[1] < (n_points or 1):
            raise DataError(
                f"'{path}': too few points: {points.shape[1]} per cloud < N_POINTS={n_points or 1}"
            )
        labels = check_labels(labels, len(CLASSES), f"'{path}'")
        names = [f"{os.path.basename(path)}/{i}" for i in range(len(points))]
        super().__init__(
            np.ascontiguousarray(points[:, :, :3]),
            labels,
            names,
            n_points,
            normalize=False,
            use_normals=False,
            shuffle=subset == "train",
            seed=seed,
        )
        self.path = path
        self.classes = list(CLASSES)
        self.num_classes = len(CLASSES)


@DATASETS.register("ScanObjectNN_hardest")
class ScanObjectNNHardest(ScanObjectNN):
    """PB-T50-RS: ``{training,test}_objectdataset_augmentedrot_scale75.h5`` under ``root`` (``main_split``).

    Args:
        root: the ``main_split`` folder (``ROOT``).
        subset: ``train`` or ``test``.
        n_points: points per item, the first stored rows; None keeps all 2048.
        seed: base seed of the train shuffle.
    """

    _stem = "objectdataset_augmentedrot_scale75"

    def __init__(
        self,
        root: str,
        subset: Literal["train", "test"] = "train",
        n_points: int | None = None,
        seed: int | None = 0,
    ):
        super().__init__(root, subset, None, n_points, seed)
