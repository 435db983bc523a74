"""ModelNet40 / ModelNet10 classification data in the Point-BERT layout (or any data set in that layout).

``modelnet40_normal_resampled/`` holds the shape names, the split lists, the raw
``<class>/<class>_<nnnn>.txt`` files (comma-separated, 10000 x 6: xyz + normals) and the FPS caches
``modelnet{NUM_CATEGORY}_{split}_{N_POINTS}pts_fps.dat``. Another data set in the same layout may use any
list prefix (``mydata_shape_names.txt``, ``mydata_train.txt``, ``mydata_test.txt``, caches
``mydata_{split}_{N}pts_fps.dat``) and any class count (a pickle of
``[list of float32 (N_POINTS, 6), list of int32 array([cls])]``). A missing cache is built from the raw
files by :func:`build_modelnet_cache` (also ``tools/prepare_data.py modelnet-cache``).
"""

from __future__ import annotations

import glob
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
from utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

class ModelNetLayout(DatasetLayout):
    """The ModelNet layout with any list prefix: complete when some ``P_shape_names.txt`` has its
    ``P_train.txt`` / ``P_test.txt`` and each split has a ``P_{split}_*pts_fps.dat`` cache or the class
    folders its ids name."""

    def missing(self, root: str) -> list[str]:
        if not os.path.isdir(root):
            return [f"{root}/ (the root itself)"]
        prefixes = modelnet_prefixes(root)
        if not prefixes:
            return ["*_shape_names.txt with its *_train.txt and *_test.txt (e.g. modelnet40_shape_names.txt)"]
        prefix = prefixes[0]
        out = []
        for split in ("train", "test"):
            if glob.glob(os.path.join(root, f"{prefix}_{split}_*pts_fps.dat")):
                continue
            try:
                ids = read_lines(os.path.join(root, f"{prefix}_{split}.txt"), "shape ids")
            except DataError:
                out.append(f"{prefix}_{split}.txt (empty)")
                continue
            folders = sorted({i.rsplit("_", 1)[0] for i in ids})
            absent = [f for f in folders if not os.path.isdir(os.path.join(root, f))]
            if absent:
                out.append(f"{prefix}_{split}_*pts_fps.dat | the class folders {', '.join(f + '/' for f in absent[:5])}"
                           + (f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""))
        return out


LAYOUT = register_layout(
    ModelNetLayout(
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
            "└── airplane/airplane_0001.txt   raw, comma-separated 10000 x 6 (only needed to build a .dat)\n"
            "Your own data in this layout may use any prefix P and class count: P_shape_names.txt,\n"
            "P_train.txt, P_test.txt, <class>/<class>_<n>.txt, caches P_{split}_{N}pts_fps.dat."
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


def modelnet_cache_path(data_path: str, num_category: int | str, split: str, n_points: int) -> str:
    """The cache name ``{prefix}_{split}_{n_points}pts_fps.dat``.

    ``num_category`` is either the class count (official prefix ``modelnet{C}``) or the list prefix found
    by :func:`find_modelnet_prefix` (e.g. ``mydata`` for ``mydata_shape_names.txt``).
    """
    prefix = num_category if isinstance(num_category, str) else f"modelnet{num_category}"
    return os.path.join(data_path, f"{prefix}_{split}_{n_points}pts_fps.dat")


_NAMES_SUFFIX = "_shape_names.txt"


def modelnet_prefixes(data_path: str) -> list[str]:
    """Every ``P`` with ``P_shape_names.txt``, ``P_train.txt`` and ``P_test.txt`` in the folder, official
    names (``modelnet40``, ``modelnet10``) first, then the others sorted."""
    if not os.path.isdir(data_path):
        return []
    found = [
        f[: -len(_NAMES_SUFFIX)]
        for f in os.listdir(data_path)
        if f.endswith(_NAMES_SUFFIX)
        and all(os.path.isfile(os.path.join(data_path, f[: -len(_NAMES_SUFFIX)] + s)) for s in ("_train.txt", "_test.txt"))
    ]
    official = [p for p in ("modelnet40", "modelnet10") if p in found]
    return official + sorted(p for p in found if p not in official)


def find_modelnet_prefix(data_path: str, num_category: int | None = None) -> str:
    """The list prefix of a ModelNet-layout folder: the official ``modelnet{NUM_CATEGORY}`` when that file
    exists, else the one ``*_shape_names.txt`` with its ``*_train.txt`` / ``*_test.txt`` (official names
    first when there are several and NUM_CATEGORY does not choose)."""
    require_root(data_path, LAYOUT, "DATA_PATH")
    if num_category is not None and os.path.isfile(os.path.join(data_path, f"modelnet{num_category}{_NAMES_SUFFIX}")):
        return f"modelnet{num_category}"
    prefixes = modelnet_prefixes(data_path)
    if not prefixes:
        raise DataError(
            f"missing file '{data_path}/*_shape_names.txt' (expected the class names, one per line, with "
            f"matching *_train.txt and *_test.txt shape-id lists, e.g. modelnet40_shape_names.txt)\n"
            f"{LAYOUT.describe()}"
        )
    if num_category is not None:
        for prefix in prefixes:
            if _count_classes(data_path, prefix) == num_category:
                return prefix
    if len(prefixes) > 1 and prefixes[0] not in ("modelnet40", "modelnet10"):
        raise ConfigError(
            f"'{data_path}' holds several class lists ({', '.join(p + _NAMES_SUFFIX for p in prefixes)}); "
            f"set NUM_CATEGORY to the class count of the one to use"
        )
    return prefixes[0]


def _count_classes(data_path: str, prefix: str) -> int:
    return len(read_lines(os.path.join(data_path, prefix + _NAMES_SUFFIX), "class names, one per line"))


def read_modelnet_lists(
    data_path: str, num_category: int | None, split: str, prefix: str | None = None
) -> tuple[list[str], list[str]]:
    """The class names (line order = index) and the shape ids of ``split``.

    The lists are found by :func:`find_modelnet_prefix` unless ``prefix`` is given; a ``num_category``
    that disagrees with the class list is a ConfigError naming the key to change.
    """
    prefix = prefix or find_modelnet_prefix(data_path, num_category)
    names_file = os.path.join(data_path, prefix + _NAMES_SUFFIX)
    classes = read_lines(names_file, "class names, one per line")
    if num_category is not None and len(classes) != num_category:
        raise ConfigError(
            f"'{names_file}' lists {len(classes)} classes but NUM_CATEGORY is {num_category}: "
            f"set NUM_CATEGORY: {len(classes)} in the data-set config (or drop it: the count comes from the data)"
        )
    ids = read_lines(
        os.path.join(data_path, f"{prefix}_{split}.txt"),
        "shape ids such as airplane_0001, one per line",
    )
    return classes, ids


def build_modelnet_cache(
    data_path: str,
    num_category: int | None = None,
    split: str = "train",
    n_points: int = 8192,
    batch_size: int = 32,
    device: str | None = None,
    fps_order: bool = False,
) -> str:
    """Build ``{prefix}_{split}_{n_points}pts_fps.dat`` from the raw ``<class>/<id>.txt`` files.

    Each raw cloud (N, 6) is reduced to ``n_points`` rows by batched farthest point sampling on xyz
    (``extensions.fps``: start index 0, deterministic; the official numpy FPS started at a random index),
    keeping the normals, in FPS order. A cloud that already has exactly ``n_points`` rows is stored
    in its file order without FPS unless ``fps_order`` (see :func:`datasets.io.fps_subsample`): then a
    smaller ``npoints`` prefix of it is not an FPS subset. Shapes are read and sampled ``batch_size`` at a
    time.

    Args:
        data_path: the ``modelnet40_normal_resampled`` folder (or any folder in its layout).
        num_category: the class count, to check against the class list (None: taken from the list);
            it also selects the official ``modelnet{C}_*`` lists when the folder has both 10 and 40.
        split: ``train`` or ``test``.
        n_points: points kept per shape.
        batch_size: shapes per FPS call.
        device: torch device for FPS; default CUDA when available.
        fps_order: run the FPS on already-sized clouds too (every cached cloud in FPS order).

    Returns:
        The path of the written cache.
    """
    prefix = find_modelnet_prefix(data_path, num_category)
    classes, ids = read_modelnet_lists(data_path, num_category, split, prefix)
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
                    f"'{data_path}/{prefix}_{split}.txt': id '{shape_id}' names "
                    f"class '{cls}', which is not in {prefix}{_NAMES_SUFFIX}"
                )
            path = os.path.join(data_path, cls, f"{shape_id}.txt")
            raw.append(check_cloud(load_txt(path, 6, delimiter=","), f"'{path}'", n_points))
            labels.append(index[cls])
        clouds.extend(fps_subsample(raw, n_points, batch_size=batch_size, device=device, skip_sized=not fps_order))
        log.info("modelnet cache %s: %d / %d shapes", split, len(clouds), len(ids))
    out = modelnet_cache_path(data_path, prefix, split, n_points)
    write_cloud_cache(out, clouds, labels)
    log.info("wrote %s (%d shapes, %.1f MB)", out, len(clouds), os.path.getsize(out) / 1e6)
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
        num_category: the class count (``NUM_CATEGORY``), checked against the class list; None takes it
            from the data. The lists are the official ``modelnet{C}_*`` files when present, else the
            folder's one ``*_shape_names.txt`` / ``*_train.txt`` / ``*_test.txt``.
        use_normals: also return the normals (``USE_NORMALS``).
        subset: ``train`` or ``test``.
        npoints: points per item (a prefix of the FPS order); None for all ``n_points``.
        seed: base seed of the train shuffle.
    """

    def __init__(
        self,
        data_path: str,
        n_points: int = 8192,
        num_category: int | None = None,
        use_normals: bool = False,
        subset: Literal["train", "test"] = "train",
        npoints: int | None = None,
        seed: int | None = 0,
    ):
        prefix = find_modelnet_prefix(data_path, num_category)
        classes, ids = read_modelnet_lists(data_path, num_category, subset, prefix)
        cache = modelnet_cache_path(data_path, prefix, subset, n_points)
        if not os.path.isfile(cache):
            log.warning("%s not found: building it from the raw files (slow, runs once)", cache)
            build_modelnet_cache(data_path, len(classes), subset, n_points)
        clouds, labels = load_cloud_cache(cache, len(classes), npoints or n_points, 6 if use_normals else 3,
                                          n_points=n_points)
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
        self.num_classes = len(classes)
