"""The official-format loaders on tiny fixtures written in exactly the official layouts."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from datasets import DATASETS, build_dataset, dataset_kwargs
from datasets.transforms import pc_norm
from datasets.io import LAYOUTS, load_cloud_cache, safe_pickle_load, sample_indices
from datasets.scanobjectnn import CLASSES as SCAN_CLASSES
from datasets.shapenetpart import SEG_CLASSES
from utils.errors import ConfigError, DataError
from utils.registry import check_kwargs

REPO = Path(__file__).resolve().parents[1]
SYNSETS = ("02691156", "03001627")
MN_CLASSES = ("airplane", "night_stand", "cup")
PART_SYNSETS = {
    "Airplane": "02691156",
    "Bag": "02773838",
    "Cap": "02954340",
    "Car": "02958343",
    "Chair": "03001627",
    "Earphone": "03261776",
    "Guitar": "03467517",
    "Knife": "03624134",
    "Lamp": "03636649",
    "Laptop": "03642806",
    "Motorbike": "03790512",
    "Mug": "03797390",
    "Pistol": "03948459",
    "Rocket": "04099429",
    "Skateboard": "04225987",
    "Table": "04379243",
}


def _cloud(rng: np.random.Generator, n: int, columns: int = 3) -> np.ndarray:
    """A random cloud, off-centre and not unit-scaled, so normalisation is visible."""
    cloud = rng.normal(size=(n, columns)).astype(np.float32)
    cloud[:, :3] = cloud[:, :3] * 3.0 + 5.0
    return cloud


# ------------------------------------------------------------------------------- fixture writers
def write_shapenet(root: Path, n_points: int = 64, train: int = 3, test: int = 2) -> Path:
    """``ShapeNet55-34/{shapenet_pc/*.npy, ShapeNet-55/{train,test}.txt}``."""
    rng = np.random.default_rng(0)
    (root / "shapenet_pc").mkdir(parents=True)
    (root / "ShapeNet-55").mkdir()
    for split, count in (("train", train), ("test", test)):
        names = [f"{syn}-{split}{i:04d}.npy" for syn in SYNSETS for i in range(count)]
        for name in names:
            np.save(root / "shapenet_pc" / name, _cloud(rng, n_points))
        (root / "ShapeNet-55" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def write_modelnet_lists(root: Path, train: int = 4, test: int = 3) -> dict[str, list[str]]:
    """Shape names and split lists of ``modelnet40_normal_resampled`` (3 classes; NUM_CATEGORY=3)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet3_shape_names.txt").write_text("\n".join(MN_CLASSES) + "\n")
    ids = {
        split: [
            f"{c}_{i + 1 + (100 if split == 'test' else 0):04d}" for c in MN_CLASSES for i in range(count)
        ]
        for split, count in (("train", train), ("test", test))
    }
    for split, names in ids.items():
        (root / f"modelnet3_{split}.txt").write_text("\n".join(names) + "\n")
    return ids


def write_modelnet_raw(
    root: Path, raw_points: int = 40, train: int = 4, test: int = 3
) -> dict[str, list[str]]:
    """The raw ``<class>/<id>.txt`` files, comma-separated N x 6."""
    ids = write_modelnet_lists(root, train, test)
    rng = np.random.default_rng(1)
    for names in ids.values():
        for shape_id in names:
            cls = shape_id.rsplit("_", 1)[0]
            (root / cls).mkdir(exist_ok=True)
            np.savetxt(root / cls / f"{shape_id}.txt", _cloud(rng, raw_points, 6), delimiter=",", fmt="%.6f")
    return ids


def write_modelnet_cache(
    root: Path, n_points: int = 32, train: int = 4, test: int = 3, seed: int = 2
) -> None:
    """``modelnet3_{split}_{n}pts_fps.dat`` written as the official pickle, without FPS."""
    ids = write_modelnet_lists(root, train, test)
    rng = np.random.default_rng(seed)
    for split, names in ids.items():
        points = [_cloud(rng, n_points, 6) for _ in names]
        labels = [np.array([MN_CLASSES.index(n.rsplit("_", 1)[0])]).astype(np.int32) for n in names]
        with open(root / f"modelnet3_{split}_{n_points}pts_fps.dat", "wb") as f:
            pickle.dump([points, labels], f)


def write_fewshot(
    root: Path, way: int = 2, shot: int = 3, fold: int = 0, n_points: int = 32, query: int = 4
) -> Path:
    """``{way}way{shot}shot/{fold}.pkl`` (the official folder name) with official tuples."""
    rng = np.random.default_rng(3)
    folder = root / f"{way}way{shot}shot"
    folder.mkdir(parents=True, exist_ok=True)
    episode = {
        subset: [(_cloud(rng, n_points, 6), label, 10 + label) for label in range(way) for _ in range(count)]
        for subset, count in (("train", shot), ("test", query))
    }
    with open(folder / f"{fold}.pkl", "wb") as f:
        pickle.dump(episode, f)
    return folder / f"{fold}.pkl"


def write_h5(
    path: Path, n: int = 6, p: int = 16, seed: int = 4, **override: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One ScanObjectNN h5 file with ``data`` (n, p, 3) and ``label`` (n,)."""
    rng = np.random.default_rng(seed)
    data = {"data": _cloud(rng, n * p).reshape(n, p, 3), "label": rng.integers(0, 15, n).astype(np.int64)}
    data.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
    return data.get("data"), data.get("label")


def write_scanobjectnn(root: Path) -> dict[str, np.ndarray]:
    """All six official files, each with distinct contents (seed per file)."""
    files = {
        "main_split/training_objectdataset_augmentedrot_scale75.h5": 10,
        "main_split/test_objectdataset_augmentedrot_scale75.h5": 11,
        "main_split/training_objectdataset.h5": 12,
        "main_split/test_objectdataset.h5": 13,
        "main_split_nobg/training_objectdataset.h5": 14,
        "main_split_nobg/test_objectdataset.h5": 15,
    }
    return {rel: write_h5(root / rel, seed=seed)[0] for rel, seed in files.items()}


def write_shapenetpart(root: Path, counts: dict[str, int] | None = None, n: int = 50) -> Path:
    """``synsetoffset2category.txt``, the three split jsons and 7-column txt files for Airplane and Mug."""
    counts = counts or {"train": 3, "val": 1, "test": 2}
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text("".join(f"{c}\t{s}\n" for c, s in PART_SYNSETS.items()))
    (root / "train_test_split").mkdir()
    for split, count in counts.items():
        entries = []
        for cat in ("Airplane", "Mug"):
            syn = PART_SYNSETS[cat]
            (root / syn).mkdir(exist_ok=True)
            for i in range(count):
                sid = f"{split}{cat.lower()}{i}"
                parts = rng.choice(SEG_CLASSES[cat], n).astype(np.float32)
                data = np.concatenate([_cloud(rng, n, 6), parts[:, None]], axis=1)
                np.savetxt(root / syn / f"{sid}.txt", data, fmt="%.6f")
                entries.append(f"shape_data/{syn}/{sid}")
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    return root


def assert_normalised(points: torch.Tensor) -> None:
    """Centred on the mean, farthest point on the unit sphere."""
    assert torch.allclose(points.mean(0), torch.zeros(3), atol=1e-5)
    assert points.norm(dim=1).max().item() == pytest.approx(1.0, abs=1e-5)


def assert_item(item: dict, npoints: int) -> None:
    """The item contract: float32 (npoints, 3) points, int64 scalar label, str name."""
    assert item["points"].dtype == torch.float32 and item["points"].shape == (npoints, 3)
    assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    assert isinstance(item["name"], str)


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` hold the same rows in some order."""
    return np.allclose(np.sort(a, axis=0), np.sort(b, axis=0), atol=1e-6)


# ------------------------------------------------------------------------------------ io helpers
def test_pc_norm_centres_and_scales() -> None:
    out = pc_norm(np.array([[0, 0, 0], [2, 0, 0], [4, 0, 0]], np.float32))
    np.testing.assert_allclose(out, [[-1, 0, 0], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_allclose(pc_norm(np.ones((4, 3), np.float32)), 0)


def test_sample_indices_without_replacement_and_fill() -> None:
    rng = np.random.default_rng(0)
    idx = sample_indices(10, 6, rng)
    assert len(set(idx.tolist())) == 6
    idx = sample_indices(4, 7, rng)
    assert set(idx.tolist()) == {0, 1, 2, 3} and len(idx) == 7


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_safe_pickle_round_trips_numpy_payloads(tmp_path: Path, protocol: int) -> None:
    payload = [
        [np.arange(6, dtype=np.float32).reshape(2, 3)],
        [np.array([3], np.int32)],
        {"k": (1, 2.5, "s", b"b", True, None, np.int64(7), np.float32(0.5))},
    ]
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    out = safe_pickle_load(str(path))
    np.testing.assert_array_equal(out[0][0], payload[0][0])
    assert out[1][0].dtype == np.int32 and out[2]["k"][:6] == payload[2]["k"][:6]
    assert out[2]["k"][6] == 7 and out[2]["k"][7] == np.float32(0.5)


class _SystemCall:
    """Unpickling this runs ``os.system`` (the classic malicious pickle)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_safe_pickle_refuses_os_system_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.dat"
    path.write_bytes(pickle.dumps([[np.zeros((2, 3))], [_SystemCall(f"touch {marker}")]]))
    with pytest.raises(DataError, match=r"evil\.dat.*refused.*(posix|os)\.system"):
        safe_pickle_load(str(path))
    assert not marker.exists()
    path.write_bytes(pickle.dumps(_Eval()))
    with pytest.raises(DataError, match=r"refused.*builtins\.eval"):
        safe_pickle_load(str(path))


def test_safe_pickle_truncated_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "cut.dat"
    path.write_bytes(pickle.dumps([[np.zeros((50, 6), np.float32)], [np.array([0], np.int32)]])[:-40])
    with pytest.raises(DataError, match=r"cut\.dat' is truncated or corrupt"):
        safe_pickle_load(str(path))
    with pytest.raises(DataError, match=r"missing file .*nothing\.dat"):
        safe_pickle_load(str(tmp_path / "nothing.dat"))


def test_cache_layout_and_label_checks(tmp_path: Path) -> None:
    path = tmp_path / "c.dat"
    path.write_bytes(pickle.dumps({"points": []}))
    with pytest.raises(DataError, match="cache layout"):
        load_cloud_cache(str(path), 3)
    path.write_bytes(pickle.dumps([[np.zeros((4, 6), np.float32)], [np.array([7], np.int32)]]))
    with pytest.raises(DataError, match=r"label out of range: 7; expected integers in \[0, 3\)"):
        load_cloud_cache(str(path), 3)


# ------------------------------------------------------------------------------------- ShapeNet
@pytest.fixture
def shapenet(tmp_path: Path) -> Path:
    return write_shapenet(tmp_path / "ShapeNet55-34")


def _shapenet(root: Path, **kw) -> torch.utils.data.Dataset:
    kw = {"n_points": 64, "npoints": 16, **kw}
    return DATASETS.get("ShapeNet")(
        data_path=str(root / "ShapeNet-55"), pc_path=str(root / "shapenet_pc"), **kw
    )


def test_shapenet_items_labels_and_normalisation(shapenet: Path) -> None:
    train, test = _shapenet(shapenet), _shapenet(shapenet, subset="test")
    assert (len(train), len(test)) == (6, 4)
    assert train.classes == list(SYNSETS) and train.num_classes == 2
    item = train[4]
    assert_item(item, 16)
    assert_normalised(item["points"])
    assert item["name"] == f"{SYNSETS[1]}-train0001" and item["label"].item() == 1
    assert len(_shapenet(shapenet, whole=True)) == 10


def test_shapenet_sampling_is_seeded_per_epoch(shapenet: Path) -> None:
    a, b = _shapenet(shapenet, seed=3), _shapenet(shapenet, seed=3)
    assert torch.equal(a[2]["points"], b[2]["points"])
    first = a[2]["points"]
    a.set_epoch(1)
    assert not torch.equal(first, a[2]["points"])
    assert not torch.equal(first, _shapenet(shapenet, seed=4)[2]["points"])
    raw = np.load(shapenet / "shapenet_pc" / f"{SYNSETS[0]}-train0002.npy")
    whole = _shapenet(shapenet, npoints=64, seed=None)[2]["points"].numpy()
    assert _same_rows(whole, pc_norm(raw))


def test_shapenet_errors(shapenet: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"(?s)does not exist.*shapenet_pc.*Official copy: Point-BERT"):
        DATASETS.get("ShapeNet")(data_path=str(tmp_path / "nope"), pc_path=str(shapenet / "shapenet_pc"))
    with pytest.raises(ConfigError, match="not valid for subset 'test'"):
        _shapenet(shapenet, subset="test", whole=True)
    npy = shapenet / "shapenet_pc" / f"{SYNSETS[0]}-train0000.npy"
    npy.write_bytes(npy.read_bytes()[:100])
    with pytest.raises(DataError, match=r"train0000\.npy' is truncated or corrupt"):
        _shapenet(shapenet)[0]
    np.save(npy, np.full((64, 3), np.nan, np.float32))
    with pytest.raises(DataError, match="NaN"):
        _shapenet(shapenet)[0]
    np.save(npy, np.zeros((10, 3), np.float32))
    with pytest.raises(DataError, match=r"too few points: 10 < 64"):
        _shapenet(shapenet)[0]
    npy.unlink()
    with pytest.raises(DataError, match=r"1 file\(s\) listed in .*train\.txt' are missing"):
        _shapenet(shapenet)


# ------------------------------------------------------------------------------------- ModelNet
@pytest.fixture
def modelnet(tmp_path: Path) -> Path:
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet_cache(root)
    return root


def _modelnet(root: Path, **kw) -> torch.utils.data.Dataset:
    return DATASETS.get("ModelNet")(data_path=str(root), **{"n_points": 32, "num_category": 3, **kw})


def test_modelnet_from_cache(modelnet: Path) -> None:
    train, test = _modelnet(modelnet), _modelnet(modelnet, subset="test")
    assert (len(train), len(test)) == (12, 9)
    assert train.classes == list(MN_CLASSES) and train.num_classes == 3
    item = test[4]
    assert_item(item, 32)
    assert_normalised(item["points"])
    assert item["name"] == "night_stand_0102" and item["label"].item() == 1
    points, labels = pickle.loads((modelnet / "modelnet3_test_32pts_fps.dat").read_bytes())
    np.testing.assert_allclose(item["points"].numpy(), pc_norm(points[4][:, :3]), atol=1e-6)
    assert [int(x[0]) for x in labels] == test.labels.tolist()
    assert "normals" not in item


def test_modelnet_train_shuffle_normals_and_prefix(modelnet: Path) -> None:
    train = _modelnet(modelnet, seed=1)
    test = _modelnet(modelnet, subset="test")
    points, _ = pickle.loads((modelnet / "modelnet3_train_32pts_fps.dat").read_bytes())
    a = train[0]["points"]
    assert _same_rows(a.numpy(), pc_norm(points[0][:, :3])) and not np.allclose(
        a, pc_norm(points[0][:, :3])
    )
    assert torch.equal(a, _modelnet(modelnet, seed=1)[0]["points"])
    train.set_epoch(5)
    assert not torch.equal(a, train[0]["points"])
    assert torch.equal(test[0]["points"], test[0]["points"])
    with_normals = _modelnet(modelnet, subset="test", use_normals=True)[0]
    assert with_normals["normals"].shape == (32, 3)
    prefix = _modelnet(modelnet, subset="test", npoints=8)[0]["points"].numpy()
    raw_points, _ = pickle.loads((modelnet / "modelnet3_test_32pts_fps.dat").read_bytes())
    np.testing.assert_allclose(prefix, pc_norm(raw_points[0][:8, :3]), atol=1e-6)


def test_modelnet_errors(modelnet: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"(?s)ModelNet40: DATA_PATH .* does not exist.*modelnet40_shape_names"
    ):
        _modelnet(tmp_path / "absent")
    with pytest.raises(ConfigError, match="lists 3 classes but NUM_CATEGORY is 40: set NUM_CATEGORY: 3"):
        (modelnet / "modelnet40_shape_names.txt").write_text("\n".join(MN_CLASSES))
        _modelnet(modelnet, num_category=40)
    cache = modelnet / "modelnet3_train_32pts_fps.dat"
    points, labels = pickle.loads(cache.read_bytes())
    cache.write_bytes(pickle.dumps([points, [np.array([9], np.int32)] * len(points)]))
    with pytest.raises(DataError, match=r"label out of range: 9"):
        _modelnet(modelnet)
    points[1][3, 0] = np.nan
    cache.write_bytes(pickle.dumps([points, labels]))
    with pytest.raises(DataError, match=r"entry 1: point 3, column 0: nan is not finite as float32"):
        _modelnet(modelnet)
    with pytest.raises(DataError, match=r"too few points: 32 < 64"):
        _modelnet(modelnet, subset="test", npoints=64)
    cache.write_bytes(cache.read_bytes()[:-30])
    with pytest.raises(DataError, match="truncated or corrupt"):
        _modelnet(modelnet)
    (modelnet / "modelnet3_shape_names.txt").unlink()
    with pytest.raises(
        DataError, match=r"missing file .*\*_shape_names\.txt' \(expected the class names, one per line, with "
        r"matching \*_train\.txt and \*_test\.txt"
    ):
        _modelnet(modelnet)


# ------------------------------------------------------------------------------------- few-shot
def test_fewshot_fold(tmp_path: Path) -> None:
    write_fewshot(tmp_path, way=2, shot=3, fold=1)
    cls = DATASETS.get("ModelNetFewShot")
    train = cls(data_path=str(tmp_path), n_points=32, way=2, shot=3, fold=1)
    test = cls(data_path=str(tmp_path), n_points=32, way=2, shot=3, fold=1, subset="test")
    assert (len(train), len(test), train.num_classes) == (6, 8, 2)
    assert sorted(test.labels.tolist()) == [0] * 4 + [1] * 4
    item = train[5]
    assert_item(item, 32)
    assert_normalised(item["points"])
    with pytest.raises(ConfigError, match=r"needs way, shot and fold \(got way=-1, shot=-1, fold=-1\)"):
        cls(data_path=str(tmp_path))
    with pytest.raises(
        DataError, match=r"missing file .*2way3shot/4\.pkl' \(or .*\) \(expected fold 4.*holds \['1\.pkl'\]"
    ):
        cls(data_path=str(tmp_path), n_points=32, way=2, shot=3, fold=4)


def test_fewshot_bad_labels_and_layout(tmp_path: Path) -> None:
    path = write_fewshot(tmp_path, way=2, shot=1)
    episode = pickle.loads(path.read_bytes())
    episode["train"][0] = (episode["train"][0][0], 5, 10)
    path.write_bytes(pickle.dumps(episode))
    with pytest.raises(
        DataError, match=r"train labels: label out of range: 5; expected integers in \[0, 2\)"
    ):
        DATASETS.get("ModelNetFewShot")(data_path=str(tmp_path), n_points=32, way=2, shot=1, fold=0)
    path.write_bytes(pickle.dumps({"support": []}))
    with pytest.raises(DataError, match="is not a few-shot episode"):
        DATASETS.get("ModelNetFewShot")(data_path=str(tmp_path), n_points=32, way=2, shot=1, fold=0)


# ---------------------------------------------------------------------------------- ScanObjectNN
@pytest.fixture
def scan(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "ScanObjectNN"
    return root, write_scanobjectnn(root)


@pytest.mark.parametrize(
    "name, folder, split, rel",
    [
        ("ScanObjectNN", "main_split", None, "main_split/test_objectdataset.h5"),
        ("ScanObjectNN", "main_split_nobg", None, "main_split_nobg/test_objectdataset.h5"),
        ("ScanObjectNN_hardest", "main_split", None, "main_split/test_objectdataset_augmentedrot_scale75.h5"),
        ("ScanObjectNN", "", "OBJ", "main_split_nobg/test_objectdataset.h5"),
        ("ScanObjectNN", "main_split", "OBJ-BG", "main_split/test_objectdataset.h5"),
        ("ScanObjectNN", "", "PB", "main_split/test_objectdataset_augmentedrot_scale75.h5"),
    ],
)
def test_scanobjectnn_selects_the_official_file_and_keeps_points(scan, name, folder, split, rel) -> None:
    root, data = scan
    kwargs = {"split": split} if split else {}
    ds = DATASETS.get(name)(root=str(root / folder) if folder else str(root), subset="test", **kwargs)
    assert len(ds) == 6 and ds.num_classes == 15 and ds.classes == SCAN_CLASSES
    item = ds[3]
    assert_item(item, 16)
    np.testing.assert_array_equal(item["points"].numpy(), data[rel][3])


def test_scanobjectnn_train_shuffle_is_seeded(scan) -> None:
    root, data = scan
    ds = DATASETS.get("ScanObjectNN")(root=str(root / "main_split"), subset="train", seed=0)
    a = ds[2]["points"].numpy()
    stored = data["main_split/training_objectdataset.h5"][2]
    assert _same_rows(a, stored) and not np.array_equal(a, stored)
    assert np.array_equal(
        a, DATASETS.get("ScanObjectNN")(root=str(root / "main_split"), seed=0)[2]["points"].numpy()
    )
    assert DATASETS.get("ScanObjectNN")(root=str(root / "main_split"), split="PB", n_points=8)[0][
        "points"
    ].shape == (8, 3)


def test_scanobjectnn_errors(scan, tmp_path: Path) -> None:
    root, _ = scan
    with pytest.raises(ConfigError, match="SPLIT 'OBJ' is stored in 'main_split_nobg/'"):
        DATASETS.get("ScanObjectNN")(root=str(root / "main_split"), split="OBJ")
    with pytest.raises(DataError, match=r"(?s)ScanObjectNN: ROOT .* does not exist.*hkust-vgd"):
        DATASETS.get("ScanObjectNN")(root=str(tmp_path / "none"))
    bad = tmp_path / "bad"
    write_h5(bad / "test_objectdataset.h5")
    with h5py.File(bad / "training_objectdataset.h5", "w") as f:
        f.create_dataset("points", data=np.zeros((2, 4, 3)))
    with pytest.raises(DataError, match=r"lacks HDF5 key\(s\) \['data', 'label'\]: found \['points'\]"):
        DATASETS.get("ScanObjectNN")(root=str(bad))
    write_h5(bad / "training_objectdataset.h5", label=np.array([0, 1, 2, 3, 4, 15]))
    with pytest.raises(DataError, match=r"label out of range: 15; expected integers in \[0, 15\)"):
        DATASETS.get("ScanObjectNN")(root=str(bad))
    write_h5(bad / "training_objectdataset.h5", data=np.full((6, 16, 3), np.nan, np.float32))
    with pytest.raises(DataError, match="'data': cloud 0, point 0, column 0: nan is not finite"):
        DATASETS.get("ScanObjectNN")(root=str(bad))
    with pytest.raises(DataError, match="too few points: 16 per cloud < N_POINTS=2048"):
        DATASETS.get("ScanObjectNN")(root=str(bad), subset="test", n_points=2048)
    (bad / "training_objectdataset.h5").write_bytes(b"\x89HDF\r\n" + b"0" * 64)
    with pytest.raises(DataError, match="truncated or corrupt: cannot read it as HDF5"):
        DATASETS.get("ScanObjectNN")(root=str(bad))


# ---------------------------------------------------------------------------------- ShapeNetPart
@pytest.fixture
def part(tmp_path: Path) -> Path:
    return write_shapenetpart(tmp_path / "shapenetcore_partanno_segmentation_benchmark_v0_normal")


def _part(root: Path, **kw) -> torch.utils.data.Dataset:
    return DATASETS.get("ShapeNetPart")(root=str(root), **{"npoints": 32, **kw})


def test_shapenetpart_items(part: Path) -> None:
    trainval, test = _part(part), _part(part, subset="test")
    assert (len(trainval), len(test), len(_part(part, subset="val"))) == (8, 4, 2)
    assert trainval.num_classes == 16 and trainval.classes[11] == "Mug" and trainval.num_parts == 50
    item = test[3]
    assert_item(item, 32)
    assert item["seg"].dtype == torch.int64 and item["seg"].shape == (32,)
    assert item["category"] == 11 and item["label"].item() == 11 and item["name"].startswith("03797390/")
    assert set(item["seg"].tolist()) <= set(SEG_CLASSES["Mug"])
    assert item["points"].norm(dim=1).max() <= 1 + 1e-5
    assert len(set(map(tuple, item["points"].tolist()))) == 32  # distinct points (no replacement)
    assert _part(part, subset="test", use_normals=True)[0]["normals"].shape == (32, 3)
    assert len(_part(part, class_choice=["Mug"])) == 4


def test_shapenetpart_test_sampling_is_fixed_and_train_varies(part: Path) -> None:
    test = _part(part, subset="test")
    first = test[0]
    test.set_epoch(7)
    again = test[0]
    assert torch.equal(first["points"], again["points"]) and torch.equal(first["seg"], again["seg"])
    train = _part(part)
    a = train[0]["points"]
    train.set_epoch(1)
    assert not torch.equal(a, train[0]["points"])
    official = _part(part, subset="test", sampling="official", npoints=200)
    b = official[0]["points"]
    assert len(set(map(tuple, b.tolist()))) < 200  # with replacement: 200 draws of 50 points
    official.set_epoch(1)
    assert not torch.equal(b, official[0]["points"])


def test_shapenetpart_errors(part: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"(?s)ShapeNetPart: ROOT .* does not exist.*synsetoffset2category"):
        _part(tmp_path / "missing")
    path = part / PART_SYNSETS["Mug"] / "testmug1.txt"
    data = np.loadtxt(path)
    data[0, 6] = 3  # an Airplane part on a Mug
    np.savetxt(path, data)
    with pytest.raises(DataError, match=r"part label out of range: 3\.0; expected 36\.\.37 for Mug"):
        _part(part, subset="test")[3]
    path.unlink()
    with pytest.raises(DataError, match=r"1 shape\(s\) of 'Mug' listed for 'test' are missing"):
        _part(part, subset="test")
    (part / "train_test_split" / "shuffled_val_file_list.json").write_text('["shape_data/0269')
    with pytest.raises(DataError, match="shuffled_val_file_list.json' is truncated or corrupt"):
        _part(part)


# ------------------------------------------------------------------------------------ configs
CONFIG_RUN_KEYS = {"ModelNetFewShot": {"way": 2, "shot": 1, "fold": 0}}


@pytest.mark.parametrize(
    "path", sorted((REPO / "cfgs" / "dataset_configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_dataset_configs_use_official_keys(path: Path, tmp_path: Path) -> None:
    section = yaml.safe_load(path.read_text())
    kwargs = dataset_kwargs(
        section, data_root=str(tmp_path), subset="test", **CONFIG_RUN_KEYS.get(section["NAME"], {})
    )
    assert all(v.startswith(str(tmp_path)) for k, v in kwargs.items() if k.endswith(("path", "root")))
    check_kwargs(DATASETS.get(section["NAME"]), {k: v for k, v in kwargs.items() if k != "NAME"}, path.name)


def test_build_from_official_config(shapenet: Path) -> None:
    section = yaml.safe_load((REPO / "cfgs" / "dataset_configs" / "ShapeNet-55.yaml").read_text())
    ds = build_dataset(
        {**section, "N_POINTS": 64, "others": {"subset": "train", "npoints": 8}},
        data_root=str(shapenet.parent),
    )
    assert len(ds) == 6 and ds[0]["points"].shape == (8, 3)


def test_layouts_cover_every_official_data_set() -> None:
    assert set(LAYOUTS) == {
        "shapenet",
        "modelnet40",
        "modelnet-fewshot",
        "scanobjectnn",
        "shapenetpart",
        "mesh-folder",
    }
