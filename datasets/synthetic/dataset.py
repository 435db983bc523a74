"""The ``SyntheticShapes`` data set: the generated shapes of a split, stored, subsampled per item,
with an optional on-disk cache of the generated arrays."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Literal

import numpy as np
import torch

from datasets.build import DATASETS
from datasets.io import PointDataset
from datasets.synthetic.shapes import CLASS_PARTS, CLASSES, GENERATOR_VERSION, SPLIT_CODE, generate_shape
from datasets.transforms import pc_norm
from utils.errors import ConfigError, DataError
from utils.io import atomic_write

__all__ = ["SyntheticShapes"]

logger = logging.getLogger(__name__)


@DATASETS.register("SyntheticShapes")
class SyntheticShapes(PointDataset):
    """Procedural labelled shapes with part labels; needs no download.

    Items are dicts: ``points`` float32 (npoints, 3), ``label`` int64 scalar tensor, ``seg`` int64
    (npoints,) global part ids, ``category`` int (= label), ``name`` str such as ``"chair_0007"``.
    Train items take a random subset of the stored ``base_points``, drawn like every other data set
    of the project (:class:`datasets.io.PointDataset`) from a generator seeded by
    ``(seed, epoch, index)``: the same in any process, worker or access order, fresh after
    :meth:`set_epoch` (the engine calls it every epoch; a split nobody calls it on, such as the
    linear-SVM train split, stays at epoch 0 and is the same at every evaluation). Test items take
    the first ``npoints`` of the stored (already shuffled) points. The subset is then re-normalised with
    :func:`pc_norm`, as the official ShapeNet loader does after its random subset.

    Args:
        subset: "train" or "test".
        npoints: points per item, at most ``base_points``.
        num_classes: how many categories, the first ones of :data:`CLASSES` (1 to 16).
        samples_per_class: train shapes per category.
        test_per_class: test shapes per category.
        base_points: points stored per shape.
        seed: seed of the whole data set; train and test are independent draws under it.
        noise: Gaussian jitter std (unit-sphere units) on the stored points; 0 disables.
        partial: fraction of shapes seen as a partial view (20-50 % of the surface cut away by a random
            plane, then resampled to ``base_points``); 0 disables.
        rotate: rotate each shape by a random angle about the up (y) axis.
        cache_dir: optional folder for a ``.npz`` cache of the generated arrays, keyed by every
            generation argument; None generates in memory every time.

    Attributes:
        classes: category names, index = label.
        num_classes: ``len(classes)``.
        num_parts: number of global part ids used by these categories.
        seg_classes: category name -> its global part ids.
        points: (M, base_points, 3) float32 stored shapes, normalised.
        seg: (M, base_points) int64 global part ids.
        labels: (M,) int64.
        names: M names.
    """

    def __init__(
        self,
        subset: Literal["train", "test"] = "train",
        npoints: int = 1024,
        num_classes: int = 12,
        samples_per_class: int = 100,
        test_per_class: int = 30,
        base_points: int = 2048,
        seed: int = 0,
        noise: float = 0.0,
        partial: float = 0.0,
        rotate: bool = False,
        cache_dir: str | None = None,
    ):
        if subset not in SPLIT_CODE:
            raise ConfigError(f"SyntheticShapes: unknown subset {subset!r}; expected 'train' or 'test'")
        for key, value, low in (
            ("num_classes", num_classes, 1),
            ("samples_per_class", samples_per_class, 1),
            ("test_per_class", test_per_class, 1),
            ("base_points", base_points, 1),
            ("npoints", npoints, 1),
            ("seed", seed, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"SyntheticShapes: '{key}' must be an integer >= {low}, got {value!r}")
        if num_classes > len(CLASSES):
            raise ConfigError(
                f"SyntheticShapes: 'num_classes' is {num_classes}, at most {len(CLASSES)} exist"
            )
        if not (math.isfinite(noise) and noise >= 0):
            raise ConfigError(f"SyntheticShapes: 'noise' must be >= 0, got {noise!r}")
        if not 0.0 <= partial <= 1.0:
            raise ConfigError(f"SyntheticShapes: 'partial' must be in [0, 1], got {partial!r}")
        if npoints > base_points:
            raise DataError(
                f"SyntheticShapes: npoints={npoints} exceeds the {base_points} points stored per "
                f"shape (base_points); raise base_points or lower npoints"
            )
        self.subset, self.npoints, self.base_points = subset, npoints, base_points
        super().__init__(seed)
        self.classes: list[str] = list(CLASSES[:num_classes])
        self.num_classes = num_classes
        self.seg_classes: dict[str, list[int]] = {}
        offset = 0
        for name in self.classes:
            self.seg_classes[name] = list(range(offset, offset + len(CLASS_PARTS[name])))
            offset += len(CLASS_PARTS[name])
        self.num_parts = offset
        per_class = samples_per_class if subset == "train" else test_per_class
        gen_args = dict(
            version=GENERATOR_VERSION,
            subset=subset,
            num_classes=num_classes,
            per_class=per_class,
            base_points=base_points,
            seed=seed,
            noise=float(noise),
            partial=float(partial),
            rotate=bool(rotate),
        )
        arrays = self._load_cache(cache_dir, gen_args) if cache_dir else None
        if arrays is None:
            arrays = self._generate(per_class, seed, noise, partial, rotate)
            if cache_dir:
                self._save_cache(cache_dir, gen_args, arrays)
        self.points, self.seg, self.labels = arrays
        self.names = [f"{self.classes[c]}_{i:04d}" for c in range(num_classes) for i in range(per_class)]

    def _generate(
        self, per_class: int, seed: int, noise: float, partial: float, rotate: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        total = self.num_classes * per_class
        points = np.empty((total, self.base_points, 3), dtype=np.float32)
        seg = np.empty((total, self.base_points), dtype=np.int64)
        labels = np.repeat(np.arange(self.num_classes, dtype=np.int64), per_class)
        for c, name in enumerate(self.classes):
            first = self.seg_classes[name][0]
            for i in range(per_class):
                k = c * per_class + i
                points[k], local = generate_shape(
                    name, self.base_points, seed, self.subset, i, noise, partial, rotate
                )
                seg[k] = first + local
        return points, seg, labels

    @staticmethod
    def _cache_path(cache_dir: str, gen_args: dict) -> str:
        key = hashlib.sha256(json.dumps(gen_args, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(cache_dir, f"synthetic_shapes_{gen_args['subset']}_{key}.npz")

    def _load_cache(self, cache_dir: str, gen_args: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        path = self._cache_path(cache_dir, gen_args)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path) as f:
                arrays = f["points"], f["seg"].astype(np.int64), f["labels"].astype(np.int64)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("SyntheticShapes: ignoring unreadable cache %s (%s); regenerating", path, exc)
            return None
        total = gen_args["num_classes"] * gen_args["per_class"]
        if arrays[0].shape != (total, gen_args["base_points"], 3) or arrays[1].shape != arrays[0].shape[:2]:
            logger.warning("SyntheticShapes: cache %s has unexpected shapes; regenerating", path)
            return None
        return arrays

    def _save_cache(self, cache_dir: str, gen_args: dict, arrays: tuple[np.ndarray, ...]) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        path = self._cache_path(cache_dir, gen_args)
        atomic_write(path, lambda f: np.savez(f, points=arrays[0], seg=arrays[1].astype(np.int16),
                                              labels=arrays[2]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        if self.subset == "train":
            sel = self._rng(index).permutation(self.base_points)[: self.npoints]
        else:
            sel = np.arange(self.npoints)
        label = int(self.labels[index])
        return {
            "points": torch.from_numpy(pc_norm(self.points[index, sel])),
            "label": torch.tensor(label, dtype=torch.int64),
            "seg": torch.from_numpy(self.seg[index, sel]),
            "category": label,
            "name": self.names[index],
        }

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(subset={self.subset!r}, {len(self)} shapes, {self.num_classes} classes, "
            f"npoints={self.npoints}, base_points={self.base_points})"
        )
