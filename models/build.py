"""The model registry and builder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from utils.registry import Registry

MODELS = Registry("models")


def build_model(cfg: Mapping[str, Any], where: str = "model", **extra: Any):
    """Build ``cfg['NAME']`` from the other keys; unknown keys or wrong types raise ConfigError."""
    return MODELS.build(cfg, where=where, **extra)
