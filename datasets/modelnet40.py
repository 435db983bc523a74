"""ModelNet40 / ModelNet10 classification data in the Point-BERT layout (REFERENCE 4.2).

``modelnet40_normal_resampled/`` holds the shape names, the split lists, the raw
``<class>/<class>_<nnnn>.txt`` files (comma-separated, 10000 x 6: xyz + normals) and the FPS caches
``modelnet{NUM_CATEGORY}_{split}_{N_POINTS}pts_fps.dat`` (a pickle of
``[list of float32 (N_POINTS, 6), list of int32 array([cls])]``). A missing cache is built from the raw
files by :func:`build_modelnet_cache` (also ``tools/prepare_data.py modelnet-cache``).
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np
import torch

from datasets.build import DATASETS
from datasets.io import (
    DatasetLayout,
    InMemoryClouds,
    check_cloud,
    chunks,
    fps_subsample,
    load_cloud_cache,
    load_txt,
    read_lines,
    register_layout,
    require_root,
    write_cloud_cache,
)
from utils.errors import DataError

log = logging.getLogger(__name__)

LAYOUT = register_layout(
    DatasetLayout(
        key="modelnet40",
        title="ModelNet40",
        root_hint="data/ModelNet/modelnet40_normal_resampled",
        tree=(
            "modelnet40_normal_resampled/     (DATA_PATH)\n"
            "├── modelnet40_shape_names.txt   40 class names; the line order is the class index\n"
            "├── modelnet40_train.txt         ids such as airplane_0001 (9,843)\n"
            "├── modelnet40_test.txt          (2,468)\n"
            "├── modelnet40_train_8192pts_fps.dat   pickle [[float32 (8192, 6)], [int32 array([cls])]]\n"
            "├── modelnet40_test_8192pts_fps.dat\n"
            "└── airplane/airplane_0001.txt   raw, comma-separated 10000 x 6 (only needed to build a .dat)"
        ),
        required=(
            ("modelnet40_shape_names.txt",),
            ("modelnet40_train.txt",),
            ("modelnet40_test.txt",),
            ("modelnet40_train_*pts_fps.dat", "airplane/"),
            ("modelnet40_test_*pts_fps.dat", "airplane/"),
        ),
        source="Point-BERT DATASET.md (https://github.com/lulutang0608/Point-BERT/blob/master/DATASET.md) "
        "for the "
        ".dat caches, or the raw modelnet40_normal_resampled from https://modelnet.cs.princeton.edu/ "
        "(then `python tools/prepare_data.py modelnet-cache`)",
    )
)


def modelnet_cache_path(data_path: str, num_category: int, split: str, n_points: int) -> str:
    """The official cache name: ``modelnet{num_category}_{split}_{n_points}pts_fps.dat``."""
    return os.path.join(data_path, f"modelnet{num_category}_{split}_{n_points}pts_fps.dat")


def read_modelnet_lists(data_path: str, num_category: int, split: str) -> tuple[list[str], list[str]]:
    """The class names (line order = index) and the shape ids of ``split``."""
    require_root(data_path, LAYOUT, "DATA_PATH")
    classes = read_lines(
        os.path.join(data_path, f"modelnet{num_category}_shape_names.txt"),
        f"{num_category} class names, one per line",
    )
    if len(classes) != num_category:
        raise DataError(
            f"'{data_path}/modelnet{num_category}_shape_names.txt' lists {len(classes)} classes; "
            f"expected NUM_CATEGORY={num_category}"
        )
    ids = read_lines(
        os.path.join(data_path, f"modelnet{num_category}_{split}.txt"),
        "shape ids such as airplane_0001, one per line",
    )
    return classes, ids


def build_modelnet_cache(
    data_path: str,
    num_category: int = 40,
    split: str = "train",
    n_points: int = 8192,
    batch_size: int = 32,
    device: str | None = None,
) -> str:
    """Build ``modelnet{C}_{split}_{n_points}pts_fps.dat`` from the raw ``<class>/<id>.txt`` files.

    Each raw cloud (N, 6) is reduced to ``n_points`` rows by batched farthest point sampling on xyz
    (``extensions.fps``: start index 0, deterministic; the official numpy FPS started at a random index),
    keeping the normals, in FPS order. Shapes are read and sampled ``batch_size`` at a time.

    Args:
        data_path: the ``modelnet40_normal_resampled`` folder.
        num_category: 40 or 10 (selects the ``modelnet{C}_*`` lists).
        split: ``train`` or ``test``.
        n_points: points kept per shape.
        batch_size: shapes per FPS call.
        device: torch device for FPS; default CUDA when available.

    Returns:
        The path of the written cache.
    """
    classes, ids = read_modelnet_lists(data_path, num_category, split)
    index = {name: i for i, name in enumerate(classes)}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clouds: list[np.ndarray] = []
    labels: list[int] = []
    for shape_ids in chunks(ids, batch_size):
        raw = []
        for shape_id in shape_ids:
            cls = shape_id.rsplit("_", 1)[0]
            if cls not in index:
                raise DataError(
                    f"'{data_path}/modelnet{num_category}_{split}.txt': id '{shape_id}' names "
                    f"class '{cls}', which is not in modelnet{num_category}_shape_names.txt"
                )
            path = os.path.join(data_path, cls, f"{shape_id}.txt")
            raw.append(check_cloud(load_txt(path, 6, delimiter=","), f"'{path}'", n_points))
            labels.append(index[cls])
        clouds.extend(fps_subsample(raw, n_points, batch_size=batch_size, device=device))
        log.info("modelnet cache %s: %d / %d shapes", split, len(clouds), len(ids))
    out = modelnet_cache_path(data_path, num_category, split, n_points)
    write_cloud_cache(out, clouds, labels)
    log.info("wrote %s (%d shapes)", out, len(clouds))
    return out


@DATASETS.register("ModelNet")
class ModelNet(InMemoryClouds):
    """ModelNet40/10 from the FPS ``.dat`` cache (built from the raw files when missing).

    Per item, as in the official loader: ``pc_norm`` on xyz, normals dropped (returned as ``normals``
    (N, 3) when ``use_normals``), point order shuffled for the train subset (seeded by
    ``(seed, epoch, index)``). ``points`` has every cached row (N_POINTS) unless ``npoints`` is set: then
    the first ``npoints`` rows of the FPS-ordered cache, which are exactly an FPS of ``npoints``.

    Args:
        data_path: the ``modelnet40_normal_resampled`` folder (``DATA_PATH``).
        n_points: points per cached shape (``N_POINTS``; selects the cache file).
        num_category: 40 or 10 (``NUM_CATEGORY``).
        use_normals: also return the normals (``USE_NORMALS``).
        subset: ``train`` or ``test``.
        npoints: points per item (a prefix of the FPS order); None for all ``n_points``.
        seed: base seed of the train shuffle.
    """

    def __init__(
        self,
        data_path: str,
        n_points: int = 8192,
        num_category: int = 40,
        use_normals: bool = False,
        subset: Literal["train", "test"] = "train",
        npoints: int | None = None,
        seed: int | None = 0,
    ):
        classes, ids = read_modelnet_lists(data_path, num_category, subset)
        cache = modelnet_cache_path(data_path, num_category, subset, n_points)
        if not os.path.isfile(cache):
            log.warning("%s not found: building it from the raw files (slow, runs once)", cache)
            build_modelnet_cache(data_path, num_category, subset, n_points)
        clouds, labels = load_cloud_cache(cache, num_category, npoints or n_points, 6 if use_normals else 3)
        names = ids if len(ids) == len(clouds) else [f"{subset}_{i}" for i in range(len(clouds))]
        super().__init__(
            clouds,
            labels,
            names,
            npoints,
            normalize=True,
            use_normals=use_normals,
            shuffle=subset == "train",
            seed=seed,
        )
        self.classes = classes
        self.num_classes = num_category
