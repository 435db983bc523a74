"""ModelNet40 few-shot episodes in the Point-BERT layout (REFERENCE 4.4, protocol 6.7).

``ModelNetFewshot/{way}way{shot}shot/{fold}.pkl`` (the layout of Point-BERT's download and of the
official DATASET.md; the ``{way}way_{shot}shot/`` folders that the official loader code reads are found
too) is a pickle of ``{'train': [...], 'test': [...]}``
whose items are ``(points float32 (8192, 6), label_in_episode 0..way-1, original_class)``. The train
list holds way x shot support shapes from the ModelNet40 train split, the test list way x 20 query
shapes from the test split. :func:`generate_fewshot` writes such folds, seeded, from the ``.dat`` caches.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import numpy as np

from datasets.build import DATASETS
from datasets.io import (
    DatasetLayout,
    InMemoryClouds,
    atomic_pickle_dump,
    check_cloud,
    check_labels,
    point_count_mismatch,
    item_rng,
    load_cloud_cache,
    register_layout,
    require_file,
    require_root,
    safe_pickle_load,
)
from datasets.modelnet40 import modelnet_cache_path
from utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LAYOUT = register_layout(
    DatasetLayout(
        key="modelnet-fewshot",
        title="ModelNet40 few-shot",
        root_hint="data/ModelNetFewshot",
        tree=(
            "ModelNetFewshot/                (DATA_PATH)\n"
            "├── 5way10shot/0.pkl ... 9.pkl   pickle {'train': [(float32 (8192, 6), label, class)],\n"
            "│                                        'test': [...]}\n"
            "├── 5way20shot/\n"
            "├── 10way10shot/\n"
            "└── 10way20shot/"
        ),
        required=tuple(
            (f"{w}way{s}shot/{f}.pkl", f"{w}way_{s}shot/{f}.pkl")
            for w in (5, 10)
            for s in (10, 20)
            for f in range(10)
        ),
        source="Point-BERT DATASET.md (https://github.com/lulutang0608/Point-BERT/blob/master/DATASET.md); "
        "or generate seeded folds from the ModelNet40 caches with `python tools/prepare_data.py fewshot`",
    )
)


def fewshot_path(data_path: str, way: int, shot: int, fold: int) -> str:
    """``<data_path>/{way}way{shot}shot/{fold}.pkl``, the official layout (docs/DATA.md).

    Where only ``{way}way_{shot}shot/{fold}.pkl`` exists (the folder name the official loader code
    reads), that file is returned instead, so copies laid out for either convention load.
    """
    official = os.path.join(data_path, f"{way}way{shot}shot", f"{fold}.pkl")
    underscore = os.path.join(data_path, f"{way}way_{shot}shot", f"{fold}.pkl")
    return underscore if not os.path.isfile(official) and os.path.isfile(underscore) else official


def generate_fewshot(
    modelnet_path: str,
    out_path: str,
    way: int,
    shot: int,
    folds: int = 10,
    query: int = 20,
    seed: int = 0,
    num_category: int = 40,
    n_points: int = 8192,
) -> list[str]:
    """Write ``folds`` few-shot episodes ``{way}way{shot}shot/{fold}.pkl`` (the official protocol).

    Per fold, with a generator seeded by ``(seed, way, shot, fold)``: draw ``way`` classes among those
    with at least ``shot`` train and ``query`` test shapes, then ``shot`` support shapes per class from
    the train cache and ``query`` query shapes per class from the test cache, and shuffle each list.
    Support and query come from different splits, so they never share a shape.

    Args:
        modelnet_path: folder with ``modelnet{C}_{train,test}_{n_points}pts_fps.dat``.
        out_path: the ``ModelNetFewshot`` folder to write into.
        way, shot: episode size.
        folds: episodes to write (10 officially).
        query: query shapes per class (20 officially).
        seed: base seed.
        num_category, n_points: select the caches.

    Returns:
        The written file paths.
    """
    splits = {}
    for split in ("train", "test"):
        cache = modelnet_cache_path(modelnet_path, num_category, split, n_points)
        splits[split] = load_cloud_cache(
            require_file(cache, "a ModelNet .dat cache (prepare_data modelnet-cache)"), num_category, n_points,
            n_points=n_points,
        )
    by_class = {
        split: {c: np.flatnonzero(labels == c) for c in range(num_category)}
        for split, (_, labels) in splits.items()
    }
    eligible = [
        c
        for c in range(num_category)
        if len(by_class["train"][c]) >= shot and len(by_class["test"][c]) >= query
    ]
    if len(eligible) < way:
        raise DataError(
            f"few-shot {way}-way {shot}-shot needs {way} classes with >= {shot} train and >= {query} "
            f"test shapes in '{modelnet_path}'; only {len(eligible)} qualify"
        )
    written = []
    for fold in range(folds):
        rng = item_rng(seed, way, shot, fold)
        chosen = rng.choice(eligible, way, replace=False)
        episode: dict[str, list[tuple[np.ndarray, int, int]]] = {"train": [], "test": []}
        for label, cls in enumerate(chosen):
            for subset, split, count in (("train", "train", shot), ("test", "test", query)):
                clouds = splits[split][0]
                picks = rng.choice(by_class[split][int(cls)], count, replace=False)
                episode[subset].extend((clouds[i], label, int(cls)) for i in picks)
        for subset in episode:
            order = rng.permutation(len(episode[subset]))
            episode[subset] = [episode[subset][i] for i in order]
        path = os.path.join(out_path, f"{way}way{shot}shot", f"{fold}.pkl")
        atomic_pickle_dump(episode, path)
        written.append(path)
    log.info("wrote %d folds of %d-way %d-shot under %s", folds, way, shot, out_path)
    return written


def _read_episode(
    path: str, subset: str, way: int, num_category: int, min_points: int, min_columns: int,
    n_points: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Validate one subset of an episode pickle; return its clouds and in-episode labels. With ``n_points``
    every cloud must have exactly that many rows (items then keep all of them, and batches need one size)."""
    episode: Any = safe_pickle_load(path)
    if not isinstance(episode, dict) or not {"train", "test"} <= set(episode):
        keys = sorted(episode, key=repr) if isinstance(episode, dict) else type(episode).__name__
        raise DataError(
            f"'{path}' is not a few-shot episode: expected a dict with 'train' and 'test', found {keys}"
        )
    items = episode[subset]
    if not isinstance(items, (list, tuple)) or not items:
        raise DataError(f"'{path}': '{subset}' must be a non-empty list of (points, label, class) tuples")
    clouds, labels, originals = [], [], []
    for i, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise DataError(f"'{path}': {subset}[{i}] is not a (points, label, class) tuple")
        points, label, original = item
        clouds.append(
            check_cloud(points, f"'{path}' {subset}[{i}]", min_points, min_columns)
        )
        labels.append(label)
        originals.append(original)
    check_labels(originals, num_category, f"'{path}' original classes")
    mismatch = point_count_mismatch(clouds, n_points)
    if mismatch:
        first, held = mismatch
        raise DataError(
            f"'{path}': {subset}[{first}] has {len(clouds[first])} points but N_POINTS is {n_points} (clouds by "
            f"point count: {held}); set N_POINTS to the count the file holds, or npoints to at most "
            f"{min(len(c) for c in clouds)} to take that many of each"
        )
    return clouds, check_labels(labels, way, f"'{path}' {subset} labels")


@DATASETS.register("ModelNetFewShot")
class ModelNetFewShot(InMemoryClouds):
    """One fold of a ModelNet40 few-shot episode.

    Items follow the ModelNet pipeline: ``pc_norm`` on xyz, normals dropped unless ``use_normals``, point
    order shuffled (seeded) for the train subset. ``label`` is the in-episode label ``0..way-1``
    (:attr:`num_classes` = ``way``); the official head nevertheless stays 40-way.

    Args:
        data_path: the ``ModelNetFewshot`` folder (``DATA_PATH``).
        n_points: points per stored shape (``N_POINTS``).
        num_category: classes of the source data set (``NUM_CATEGORY``), for label checks.
        use_normals: also return ``normals`` (``USE_NORMALS``).
        subset: ``train`` (support) or ``test`` (query).
        way, shot, fold: which episode; required (the official configs hold -1 placeholders that the
            command line must override).
        npoints: points per item (a prefix of the stored FPS order); None for all.
        seed: base seed of the train shuffle.
    """

    def __init__(
        self,
        data_path: str,
        n_points: int = 8192,
        num_category: int = 40,
        use_normals: bool = False,
        subset: Literal["train", "test"] = "train",
        way: int = -1,
        shot: int = -1,
        fold: int = -1,
        npoints: int | None = None,
        seed: int | None = 0,
    ):
        if min(way, shot, fold) < 0:
            raise ConfigError(
                f"ModelNetFewShot needs way, shot and fold (got way={way}, shot={shot}, fold={fold}); "
                "set them in the dataset 'others' or with --way/--shot/--fold"
            )
        require_root(data_path, LAYOUT, "DATA_PATH")
        path = fewshot_path(data_path, way, shot, fold)
        if not os.path.isfile(path):
            underscore = os.path.join(data_path, f"{way}way_{shot}shot", f"{fold}.pkl")
            folder = next(
                (d for d in (os.path.dirname(path), os.path.dirname(underscore)) if os.path.isdir(d)),
                os.path.dirname(path),
            )
            have = sorted(os.listdir(folder)) if os.path.isdir(folder) else "(folder missing)"
            raise DataError(
                f"missing file '{path}' (or '{underscore}') (expected fold {fold} of {way}-way "
                f"{shot}-shot); {folder} holds {have}"
            )
        clouds, labels = _read_episode(
            path, subset, way, num_category, npoints or n_points, 6 if use_normals else 3,
            n_points=None if npoints else n_points,
        )
        names = [f"{way}way_{shot}shot/{fold}/{subset}/{i}" for i in range(len(clouds))]
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
        self.way, self.shot, self.fold = way, shot, fold
        self.num_classes = way
