"""SyntheticShapes: determinism, splits, labels, part ids, normalisation, class separation, errors."""

import hashlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasets.synthetic as synthetic
from datasets import DATASETS, build_dataset
from datasets.synthetic import CLASS_PARTS, CLASSES, SyntheticShapes
from tests.helpers import child_env
from utils.errors import ConfigError, DataError

SMALL = dict(num_classes=16, samples_per_class=3, test_per_class=2, base_points=256, npoints=128, seed=5)


@pytest.fixture(scope="module")
def train():
    return SyntheticShapes("train", **SMALL)


@pytest.fixture(scope="module")
def test():
    return SyntheticShapes("test", **SMALL)


def test_registered_and_built_from_config_section():
    assert "SyntheticShapes" in DATASETS.list()
    ds = build_dataset(
        {"NAME": "SyntheticShapes", "others": {"subset": "test", "npoints": 32}},
        num_classes=2,
        test_per_class=1,
        base_points=64,
    )
    assert len(ds) == 2 and ds[0]["points"].shape == (32, 3)
    with pytest.raises(ConfigError, match="npoint"):
        build_dataset({"NAME": "SyntheticShapes", "npoint": 32})
    with pytest.raises(ConfigError, match="subset"):
        build_dataset({"NAME": "SyntheticShapes", "subset": "val"})


def test_item_shapes_and_dtypes(train, test):
    for ds in (train, test):
        item = ds[len(ds) - 1]
        assert set(item) == {"points", "label", "seg", "category", "name"}
        assert item["points"].dtype == torch.float32 and item["points"].shape == (128, 3)
        assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
        assert item["seg"].dtype == torch.int64 and item["seg"].shape == (128,)
        assert isinstance(item["category"], int) and item["category"] == int(item["label"])
        assert re.fullmatch(r"[a-z_]+_\d{4}", item["name"])
        assert item["name"].rsplit("_", 1)[0] == ds.classes[item["category"]]
    assert train.points.shape == (16 * 3, 256, 3) and train.points.dtype == np.float32
    assert train.classes == list(CLASSES) and train.num_classes == 16


def test_labels_counts_and_names(train, test):
    for ds, per_class in ((train, 3), (test, 2)):
        assert len(ds) == 16 * per_class
        counts = np.bincount(ds.labels, minlength=ds.num_classes)
        assert counts.tolist() == [per_class] * 16
        assert len(set(ds.names)) == len(ds)


def test_default_sizes_without_generating(monkeypatch):
    monkeypatch.setattr(
        SyntheticShapes,
        "_generate",
        lambda self, per_class, *a: (
            np.zeros((self.num_classes * per_class, 1, 3), np.float32),
            np.zeros((self.num_classes * per_class, 1), np.int64),
            np.repeat(np.arange(self.num_classes), per_class),
        ),
    )
    tr, te = SyntheticShapes("train"), SyntheticShapes("test")
    assert (len(tr), len(te), tr.num_classes, tr.npoints, tr.base_points) == (1200, 360, 12, 1024, 2048)


def test_seg_labels_within_class_parts(train, test):
    ids = [i for name in train.classes for i in train.seg_classes[name]]
    assert ids == list(range(train.num_parts))  # contiguous, disjoint, in class order
    assert train.num_parts == sum(len(p) for p in CLASS_PARTS.values())
    for ds in (train, test):
        for k in range(len(ds)):
            allowed = ds.seg_classes[ds.classes[ds.labels[k]]]
            assert set(np.unique(ds.seg[k])) <= set(allowed)
    for c, name in enumerate(train.classes):  # every class shows at least two of its parts
        assert len(np.unique(train.seg[train.labels == c])) >= 2, name
    small = SyntheticShapes("test", num_classes=3, test_per_class=1, base_points=64, npoints=64)
    assert small.num_parts == 10 and list(small.seg_classes) == ["chair", "stool", "table"]


def test_stored_shapes_normalised(train, test):
    for ds in (train, test):
        pts = ds.points.astype(np.float64)
        assert np.abs(pts.mean(axis=1)).max() < 1e-5
        np.testing.assert_allclose(np.linalg.norm(pts, axis=-1).max(axis=1), 1.0, atol=1e-5)
        item = ds[0]["points"].double()
        assert item.mean(0).abs().max() < 1e-5 and abs(float(item.norm(dim=-1).max()) - 1) < 1e-5


def test_same_args_identical_and_seed_changes_data(train):
    again = SyntheticShapes("train", **SMALL)
    assert np.array_equal(again.points, train.points) and np.array_equal(again.seg, train.seg)
    other = SyntheticShapes("train", **{**SMALL, "seed": 6})
    assert not np.array_equal(other.points, train.points)
    fewer = SyntheticShapes("train", **{**SMALL, "samples_per_class": 2, "num_classes": 4})
    assert np.array_equal(fewer.points[:2], train.points[:2])  # shapes do not depend on the data-set size


def test_train_and_test_are_disjoint(train, test):
    a = torch.from_numpy(train.points).flatten(1)
    b = torch.from_numpy(test.points).flatten(1)
    assert float(torch.cdist(b, a).min()) > 1e-2


def test_test_items_deterministic_train_items_seeded_per_epoch(train, test):
    t0, t1 = test[3], test[3]
    assert torch.equal(t0["points"], t1["points"]) and torch.equal(t0["seg"], t1["seg"])
    np.testing.assert_array_equal(t0["seg"].numpy(), test.seg[3, :128])
    # train subsets depend on (seed, epoch, index) only, not on the global RNG or the access order
    torch.manual_seed(0)
    a = train[4]
    torch.manual_seed(123)
    train[5]
    assert torch.equal(train[4]["points"], a["points"]) and torch.equal(train[4]["seg"], a["seg"])
    assert not torch.equal(train[5]["points"], a["points"])
    try:
        train.set_epoch(1)
        b = train[4]
        assert not torch.equal(b["points"], a["points"])  # a fresh subset every epoch
        assert b["label"] == a["label"]
        train.set_epoch(0)
        assert torch.equal(train[4]["points"], a["points"])
    finally:
        train.set_epoch(0)


def test_bitwise_identical_in_another_process(test):
    code = (
        "import hashlib; from datasets.synthetic import SyntheticShapes; "
        f"d = SyntheticShapes('test', **{SMALL!r}); "
        "print(hashlib.sha256(d.points.tobytes() + d.seg.tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(test.points.tobytes() + test.seg.tobytes()).hexdigest()


def test_classes_are_geometrically_distinct():
    ds = SyntheticShapes("train", num_classes=16, samples_per_class=4, base_points=96, npoints=96, seed=1)
    pts = torch.from_numpy(ds.points)
    m = len(pts)
    cd = torch.empty(m, m)
    for i in range(m):  # symmetric Chamfer-L2 of shape i against every shape
        d = torch.cdist(pts[i].expand(m, -1, -1), pts) ** 2
        cd[i] = d.min(2).values.mean(1) + d.min(1).values.mean(1)
    labels = torch.from_numpy(ds.labels)
    k = ds.num_classes
    mean = torch.zeros(k, k)
    for a in range(k):
        for b in range(k):
            block = cd[labels == a][:, labels == b]
            mean[a, b] = block[~torch.eye(4, dtype=torch.bool)].mean() if a == b else block.mean()
    within = mean.diagonal()
    separated = [(mean[a, b] > max(within[a], within[b])) for a in range(k) for b in range(k) if a != b]
    assert sum(separated) >= 0.8 * len(separated)
    nearest_other = (mean + torch.diag(torch.full((k,), float("inf")))).min(1).values
    assert int((within < nearest_other).sum()) >= 0.75 * k


def test_rotate_noise_partial_change_only_the_view():
    base = dict(num_classes=3, samples_per_class=2, base_points=200, npoints=100, seed=2)
    plain = SyntheticShapes("train", **base)
    rotated = SyntheticShapes("train", **base, rotate=True)
    np.testing.assert_allclose(rotated.points[..., 1], plain.points[..., 1], atol=1e-5)  # rotation about y
    np.testing.assert_allclose(
        np.linalg.norm(rotated.points[..., [0, 2]], axis=-1),
        np.linalg.norm(plain.points[..., [0, 2]], axis=-1),
        atol=1e-5,
    )
    assert not np.allclose(rotated.points, plain.points, atol=1e-3)
    noisy = SyntheticShapes("train", **base, noise=0.02)
    assert np.array_equal(noisy.seg, plain.seg)
    assert 0.005 < np.abs(noisy.points - plain.points).mean() < 0.05
    part = SyntheticShapes("train", **base, partial=1.0)
    assert part.points.shape == plain.points.shape and not np.allclose(part.points, plain.points)
    np.testing.assert_allclose(np.linalg.norm(part.points, axis=-1).max(axis=1), 1.0, atol=1e-5)


def test_cache_roundtrip(tmp_path, monkeypatch):
    args = dict(num_classes=2, test_per_class=2, base_points=64, npoints=32, cache_dir=str(tmp_path))
    first = SyntheticShapes("test", **args)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and "test" in files[0].name

    def no_generate(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(SyntheticShapes, "_generate", no_generate)
    cached = SyntheticShapes("test", **{**args, "npoints": 16})  # npoints is not a generation argument
    assert np.array_equal(cached.points, first.points) and np.array_equal(cached.seg, first.seg)
    assert cached.seg.dtype == np.int64
    monkeypatch.undo()
    SyntheticShapes("test", **{**args, "noise": 0.01})
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not list(tmp_path.glob("*.tmp"))


def test_corrupt_cache_is_regenerated(tmp_path):
    args = dict(num_classes=1, test_per_class=1, base_points=32, npoints=32, cache_dir=str(tmp_path))
    first = SyntheticShapes("test", **args)
    path = next(tmp_path.glob("*.npz"))
    path.write_bytes(b"not a zip")
    again = SyntheticShapes("test", **args)
    assert np.array_equal(again.points, first.points)


def test_dataloader_collates(test):
    batch = next(iter(torch.utils.data.DataLoader(test, batch_size=4)))
    assert batch["points"].shape == (4, 128, 3) and batch["label"].shape == (4,) and len(batch["name"]) == 4


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(npoints=300, base_points=256), DataError, "npoints=300"),
        (dict(subset="val"), ConfigError, "'val'"),
        (dict(num_classes=len(CLASSES) + 1), ConfigError, "num_classes"),
        (dict(num_classes=0), ConfigError, "num_classes"),
        (dict(samples_per_class=0), ConfigError, "samples_per_class"),
        (dict(seed=-1), ConfigError, "seed"),
        (dict(noise=-0.1), ConfigError, "noise"),
        (dict(partial=1.5), ConfigError, "partial"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SyntheticShapes(
            **{"num_classes": 1, "samples_per_class": 1, "base_points": 256, "npoints": 64, **kwargs}
        )


def test_generation_is_fast():
    import time

    start = time.process_time()
    synthetic.SyntheticShapes("train", num_classes=16, samples_per_class=4, base_points=2048, npoints=1024)
    per_shape = (time.process_time() - start) / 64
    assert per_shape < 0.02  # about 2 ms per 2048-point shape on one CPU core
