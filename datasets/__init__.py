"""Data sets: the generated default data plus the official on-disk formats.

Every sub-module registers its classes in :data:`DATASETS` on import; all are imported here.
"""

import importlib
import pkgutil

from datasets.build import DATASETS, build_dataset, dataset_kwargs

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("build",) and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["DATASETS", "build_dataset", "dataset_kwargs"]
