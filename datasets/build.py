"""The data-set registry and the one builder every task uses."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from utils.errors import ConfigError
from utils.registry import Registry

DATASETS = Registry("datasets")

_PATH_SUFFIXES = ("path", "root", "dir")


def _resolve_path(value: str, data_root: str | None) -> str:
    """Official configs say ``data/...`` relative to the repo; ``data_root`` replaces that ``data/``."""
    if not data_root or os.path.isabs(value):
        return value
    rel = value[len("data/"):] if value.startswith("data/") else value
    return os.path.join(data_root, rel)


def dataset_kwargs(section: Mapping[str, Any], data_root: str | None = None, **overrides: Any) -> dict:
    """Flatten a config section into ``{NAME, lower_case_kwargs...}``.

    Accepts the official layout (upper-case keys such as ``DATA_PATH`` / ``N_POINTS`` from the data-set
    file, plus an ``others:`` dict of run-specific keys) and plain lower-case keys.
    """
    if not isinstance(section, Mapping):
        raise ConfigError(f"dataset section must be a mapping, got {type(section).__name__}: {section!r}")
    flat: dict[str, Any] = {}
    for key, value in section.items():
        if key == "others":
            if not isinstance(value, Mapping):
                raise ConfigError(f"dataset 'others' must be a mapping, got {value!r}")
            flat.update({k.lower(): v for k, v in value.items()})
        elif key == "NAME":
            flat["NAME"] = value
        else:
            flat[key.lower()] = value
    flat.update(overrides)
    for key, value in list(flat.items()):
        if isinstance(value, str) and key.endswith(_PATH_SUFFIXES):
            flat[key] = _resolve_path(value, data_root)
    return flat


def build_dataset(section: Mapping[str, Any], data_root: str | None = None, where: str = "dataset",
                  **overrides: Any):
    """Build a registered data set from a config section; unknown keys raise ConfigError."""
    return DATASETS.build(dataset_kwargs(section, data_root, **overrides), where=where)
