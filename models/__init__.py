"""Backbones, pre-training objectives, heads and mask strategies; all registered on import."""

from models.build import MODELS, build_model
from models import gm3d, masking, point_mae  # noqa: F401  (registration side effects)
from models.masking import MASKS

__all__ = ["MODELS", "MASKS", "build_model"]
