"""Backbones, pre-training objectives, heads and mask strategies.

Every sub-module registers its classes on import (``MODELS``, ``MASKS``); all are imported here.
"""

import importlib
import pkgutil

from models.build import MODELS, build_model
from models.masking import MASKS

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["MODELS", "MASKS", "build_model"]
