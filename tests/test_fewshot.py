"""Few-shot: fold sampling (shared with tools/prepare_data.py fewshot), official folds, the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets.io import safe_pickle_load
from datasets.modelnet_fewshot import fewshot_path
from tools.tasks.fewshot import episode_source, fewshot_table, fold_datasets, write_episodes
from tools.tasks.stats import mean_std
from utils.config import load_config
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ["dataset.train.num_classes=4", "dataset.train.samples_per_class=6", "dataset.train.base_points=128",
        "dataset.train.npoints=128", "dataset.test.num_classes=4", "dataset.test.test_per_class=5",
        "dataset.test.base_points=128", "dataset.test.npoints=128", "finetune.fewshot.query=3", "npoints=64"]


def tiny_cfg(*extra):
    return load_config(REPO / "cfgs/finetune/quickstart_fewshot.yaml", [*TINY, *extra])


def _key(cloud) -> bytes:
    return np.ascontiguousarray(np.asarray(cloud, dtype=np.float32)[:, :3]).tobytes()


def test_generated_folds_use_the_prepare_data_sampler(tmp_path, monkeypatch):
    import datasets.modelnet_fewshot as mf

    calls = []
    real = mf.generate_fewshot

    def spy(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    monkeypatch.setattr(mf, "generate_fewshot", spy)
    cfg = tiny_cfg()
    assert episode_source(cfg) == "generated"
    path, num_category, n_points = write_episodes(cfg, tmp_path, way=3, shot=2, folds=3)
    assert len(calls) == 1 and (num_category, n_points) == (4, 128)
    write_episodes(cfg, tmp_path, way=3, shot=2, folds=3)     # already there: not drawn again
    assert len(calls) == 1


@pytest.mark.parametrize("way,shot", [(3, 2), (2, 5)])
def test_fold_support_and_query_are_disjoint_with_the_right_counts(tmp_path, way, shot):
    cfg = tiny_cfg()
    seen_classes = []
    for fold in range(3):
        support, query = fold_datasets(cfg, tmp_path, way, shot, fold, folds=3)
        assert len(support) == way * shot and len(query) == way * 3
        assert np.bincount(support.labels, minlength=way).tolist() == [shot] * way
        assert np.bincount(query.labels, minlength=way).tolist() == [3] * way
        assert support.num_classes == way and support[0]["points"].shape == (128, 3)
        episode = safe_pickle_load(fewshot_path(str(tmp_path / "episodes"), way, shot, fold))
        sup = {_key(c) for c, _, _ in episode["train"]}
        qry = {_key(c) for c, _, _ in episode["test"]}
        assert len(sup) == way * shot and len(qry) == way * 3 and not sup & qry
        # in-episode label <-> original class is one-to-one and the same in support and query
        pairs = {(lab, cls) for _, lab, cls in episode["train"]}
        assert pairs == {(lab, cls) for _, lab, cls in episode["test"]} and len(pairs) == way
        seen_classes.append(sorted(cls for _, cls in pairs))
    # seeded: the same folds again
    again = safe_pickle_load(fewshot_path(str(tmp_path / "episodes"), way, shot, 0))
    other = tmp_path / "again"
    fold_datasets(cfg, other, way, shot, 0, folds=3)
    redo = safe_pickle_load(fewshot_path(str(other / "episodes"), way, shot, 0))
    assert [_key(c) for c, _, _ in again["train"]] == [_key(c) for c, _, _ in redo["train"]]


def test_too_many_ways_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="5-way"):
        write_episodes(tiny_cfg(), tmp_path, way=5, shot=2, folds=1)


def test_official_fold_files_are_read_with_way_shot_fold(tmp_path):
    from datasets.io import write_cloud_cache
    from datasets.modelnet40 import modelnet_cache_path
    from datasets.modelnet_fewshot import generate_fewshot

    rng = np.random.default_rng(0)
    src = tmp_path / "modelnet"
    for split, per in (("train", 4), ("test", 3)):
        clouds = [rng.standard_normal((96, 6)).astype(np.float32) for _ in range(5 * per)]
        write_cloud_cache(modelnet_cache_path(str(src), 5, split, 96), clouds, [i % 5 for i in range(5 * per)])
    generate_fewshot(str(src), str(tmp_path / "ModelNetFewshot"), 2, 3, folds=2, query=3, num_category=5,
                     n_points=96)
    section = {"NAME": "ModelNetFewShot", "DATA_PATH": str(tmp_path / "ModelNetFewshot"), "N_POINTS": 96,
               "NUM_CATEGORY": 5}
    cfg = tiny_cfg()
    cfg.dataset.train = {**section, "others": {"subset": "train"}}
    cfg.dataset.test = {**section, "others": {"subset": "test"}}
    assert episode_source(cfg) == "official"
    support, query = fold_datasets(cfg, tmp_path / "run", 2, 3, 1, folds=2)
    assert (len(support), len(query)) == (6, 6) and support.fold == 1 and query.way == 2
    assert not (tmp_path / "run" / "episodes").exists()


def test_table_and_mean_std():
    m, s = mean_std([90.0, 100.0])
    assert m == 95.0 and s == pytest.approx(50 ** 0.5)  # sample std, ddof=1
    table = fewshot_table({"5-way 10-shot": {"last": [90.0, 100.0], "best": [100.0, 100.0]}})
    assert "| 5-way 10-shot | 2 | 95.00 ± 7.07 | 100.00 ± 0.00 | 31.5-158.5 |" in table
