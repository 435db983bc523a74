"""Shared fixtures: a tiny pre-training config on the generated data, and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[1]

TINY_DATA = {"NAME": "SyntheticShapes", "num_classes": 4, "samples_per_class": 8, "test_per_class": 4,
             "base_points": 256, "npoints": 128}


def tiny_pretrain_cfg(**extra) -> dict:
    cfg = {
        "_base_": str(REPO / "cfgs/pretrain/quickstart.yaml"),
        "model": {"num_group": 16, "group_size": 8,
                  "transformer_config": {"trans_dim": 48, "encoder_dims": 48, "depth": 1, "num_heads": 3,
                                         "decoder_depth": 1, "decoder_num_heads": 3}},
        "dataset": {"train": {**TINY_DATA, "subset": "train"},
                    "svm_train": {**TINY_DATA, "subset": "train"},
                    "svm_test": {**TINY_DATA, "subset": "test"}},
        "npoints": 128, "total_bs": 8, "max_epoch": 2, "threads": 1,
        "scheduler": {"kwargs": {"epochs": 3, "initial_epochs": 1}},
        "eval": {"svm_every": 1, "at_start": True},
        "log": {"progress_bar": False},
    }
    for k, v in extra.items():
        cfg[k] = v
    return cfg


@pytest.fixture
def tiny_config(tmp_path):
    """Write a tiny pre-training config; returns a function(**top_level_overrides) -> path."""
    def make(name="tiny.yaml", **extra):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_pretrain_cfg(**extra), sort_keys=False))
        return path
    return make


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 240, env_extra: dict | None = None,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    env = child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    cmd = (prefix or [sys.executable]) + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
