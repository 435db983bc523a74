"""Property-based tests of the official-format loaders: start from a valid fixture file, mutate its
bytes, values, shapes or dtypes, and require one of two outcomes: a DataError that names the file, or a
data set whose every item is valid (finite float32 points of the right shape, integer labels in range).
Any other exception, a non-finite value or a hang (a 20 s alarm) fails.

Deterministic (``derandomize=True``): CI replays the same examples every run. ``FUZZ_EXAMPLES=250``
runs a longer hunt locally (about ten times the default 25 examples per test).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasets import DATASETS
from tests.test_datasets_official import (
    write_fewshot,
    write_h5,
    write_modelnet_cache,
    write_modelnet_raw,
    write_shapenet,
    write_shapenetpart,
)
from utils.errors import DataError

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")),  # raise it for a longer local hunt
    derandomize=True,
    deadline=None,  # the alarm below bounds each example instead
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPECIAL = [np.nan, np.inf, -np.inf, 1e20, -3e19, 1e300, -1e39, 3.4e38, 2e6, 1e6, 1e-45, 5e-324, 0.0, -0.0]
DTYPES = ["float64", "float16", "int8", "int64", "uint8", "bool", "complex64", "<U4", "S4"]


# ------------------------------------------------------------------------------------- helpers
@contextmanager
def alarm(seconds: int = 20):
    """Fail instead of hanging."""

    def boom(signum, frame):
        raise TimeoutError(f"loader did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def copy_of(fixture: Path):
    """A scratch copy of a fixture tree, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / fixture.name
        shutil.copytree(fixture, dst)
        yield dst


def check_outcome(load: Callable[[], torch.utils.data.Dataset], culprit: Path, bound: float = 1.0001) -> None:
    """Build the data set and read every item: either all items are valid or a DataError names ``culprit``.

    ``bound``: the largest coordinate magnitude a valid item may have (1 after normalisation).
    """
    try:
        with alarm():
            ds = load()
            items = [ds[i] for i in range(len(ds))]
    except DataError as exc:
        assert culprit.name in str(exc), f"DataError does not name {culprit.name}: {exc}"
        return
    assert len(items) > 0
    for item in items:
        points = item["points"]
        assert points.dtype == torch.float32 and points.dim() == 2 and points.shape[1] == 3
        assert bool(points.isfinite().all()) and float(points.abs().max()) <= bound
        label = item["label"]
        assert label.dtype == torch.int64 and 0 <= int(label) < ds.num_classes
        if "seg" in item:
            seg = item["seg"]
            assert seg.dtype == torch.int64 and 0 <= int(seg.min()) <= int(seg.max()) < 50
        if "normals" in item:
            assert bool(item["normals"].isfinite().all())


@st.composite
def byte_edits(draw, size: int) -> list[tuple[str, int, bytes]]:
    """A few edits of a byte string of length ``size``: truncate, overwrite, insert or flip."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "overwrite", "insert", "flip"]))
        pos = draw(st.integers(0, max(size - 1, 0)))
        edits.append((op, pos, draw(st.binary(min_size=1, max_size=8))))
    return edits


def apply_edits(raw: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(raw)
    for op, pos, blob in edits:
        pos = min(pos, len(out))
        if op == "truncate":
            del out[pos:]
        elif op == "overwrite":
            out[pos : pos + len(blob)] = blob
        elif op == "insert":
            out[pos:pos] = blob
        elif pos < len(out):
            out[pos] ^= blob[0] or 0xFF
    return bytes(out)


def mutate_bytes(path: Path, edits) -> None:
    path.write_bytes(apply_edits(path.read_bytes(), edits))


@st.composite
def array_mutations(draw) -> tuple:
    """A change of one array: one value, the dtype, or the shape."""
    kind = draw(st.sampled_from(["value", "dtype", "shape"]))
    if kind == "value":
        return kind, draw(st.integers(0, 10**6)), draw(st.sampled_from(SPECIAL)), draw(st.booleans())
    if kind == "dtype":
        return kind, draw(st.sampled_from(DTYPES))
    return kind, draw(st.sampled_from(["columns", "rows", "flat", "extra_axis", "empty", "transpose"]))


def mutate_array(arr: np.ndarray, mutation: tuple) -> np.ndarray:
    kind = mutation[0]
    if kind == "value":
        _, where, value, as_float64 = mutation
        out = arr.astype(np.float64 if as_float64 else np.float32)
        with np.errstate(over="ignore"):
            out.reshape(-1)[where % out.size] = value
        return out
    if kind == "dtype":
        with np.errstate(all="ignore"):
            return arr.astype(mutation[1])
    shape = mutation[1]
    if shape == "columns":
        return arr[..., :2]
    if shape == "rows":
        return arr[..., :3, :]
    if shape == "flat":
        return arr.reshape(-1)
    if shape == "extra_axis":
        return arr[None]
    if shape == "empty":
        return arr[..., :0, :]
    return arr.swapaxes(-1, -2)


LABEL_VALUES = [1.5, -1, 3, 40, 2**40, 2**70, np.nan, "a", None, np.array([[1, 2]]), [], 0.0, True]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fuzz")
    out = {
        "shapenet": write_shapenet(base / "ShapeNet55-34", n_points=32, train=1, test=1),
        "fewshot": write_fewshot(base / "ModelNetFewshot", way=2, shot=2, n_points=16, query=2).parents[1],
        "part": write_shapenetpart(base / "shapenetpart", counts={"train": 1, "val": 1, "test": 1}, n=20),
    }
    write_modelnet_cache(base / "modelnet", n_points=16, train=1, test=1)
    write_modelnet_raw(base / "modelnet_raw", raw_points=20, train=1, test=1)
    write_h5(base / "scan" / "training_objectdataset.h5", n=3, p=8)
    write_h5(base / "scan" / "test_objectdataset.h5", n=3, p=8)
    out.update(modelnet=base / "modelnet", modelnet_raw=base / "modelnet_raw", scan=base / "scan")
    trimesh = pytest.importorskip("trimesh")
    meshes = base / "meshes"
    for cls, make in (("box", trimesh.creation.box), ("ball", trimesh.creation.icosphere)):
        for subset, ext in (("train", ".obj"), ("test", ".off")):
            (meshes / cls / subset).mkdir(parents=True)
            make().export(meshes / cls / subset / f"{cls}{ext}")
    out["meshes"] = meshes
    return out


def _shapenet(root: Path):
    return lambda: DATASETS.get("ShapeNet")(
        data_path=str(root / "ShapeNet-55"), pc_path=str(root / "shapenet_pc"), n_points=32, npoints=8
    )


def _modelnet(root: Path, n_points: int = 16):
    return lambda: DATASETS.get("ModelNet")(data_path=str(root), n_points=n_points, num_category=3)


def _fewshot(root: Path, subset: str = "train"):
    return lambda: DATASETS.get("ModelNetFewShot")(
        data_path=str(root), n_points=16, way=2, shot=2, fold=0, subset=subset, use_normals=True
    )


def _scan(root: Path):
    return lambda: DATASETS.get("ScanObjectNN")(root=str(root), subset="train")


def _part(root: Path):
    return lambda: DATASETS.get("ShapeNetPart")(root=str(root), subset="test", npoints=8, use_normals=True)


def _meshes(root: Path):
    return lambda: DATASETS.get("MeshFolder")(root=str(root), n_points=8, raw_points=16, use_normals=True)


def test_fixtures_are_valid(fixtures) -> None:
    """The unmutated fixtures load: every failure below comes from the mutation."""
    for load, bound in (
        (_shapenet(fixtures["shapenet"]), 1.0001),
        (_modelnet(fixtures["modelnet"]), 1.0001),
        (_fewshot(fixtures["fewshot"]), 1.0001),
        (_scan(fixtures["scan"]), 1e6),
        (_part(fixtures["part"]), 1.0001),
    ):
        check_outcome(load, Path("no DataError expected"), bound)
        assert len(load()) > 0


# ---------------------------------------------------------------------------------- ShapeNet
@FUZZ
@given(edits=byte_edits(200))
def test_shapenet_npy_bytes(fixtures, edits) -> None:
    with copy_of(fixtures["shapenet"]) as root:
        npy = next(iter(sorted((root / "shapenet_pc").glob("*train*.npy"))))
        mutate_bytes(npy, edits)
        check_outcome(_shapenet(root), npy)


@FUZZ
@given(mutation=array_mutations())
def test_shapenet_npy_values(fixtures, mutation) -> None:
    with copy_of(fixtures["shapenet"]) as root:
        npy = next(iter(sorted((root / "shapenet_pc").glob("*train*.npy"))))
        np.save(npy, mutate_array(np.load(npy), mutation))
        check_outcome(_shapenet(root), npy)


@FUZZ
@given(edits=byte_edits(60))
def test_shapenet_split_txt_bytes(fixtures, edits) -> None:
    with copy_of(fixtures["shapenet"]) as root:
        split = root / "ShapeNet-55" / "train.txt"
        mutate_bytes(split, edits)
        check_outcome(_shapenet(root), split)


# ---------------------------------------------------------------------------------- ModelNet
@FUZZ
@given(edits=byte_edits(1200))
def test_modelnet_dat_bytes(fixtures, edits) -> None:
    with copy_of(fixtures["modelnet"]) as root:
        dat = root / "modelnet3_train_16pts_fps.dat"
        mutate_bytes(dat, edits)
        check_outcome(_modelnet(root), dat)


@FUZZ
@given(
    target=st.sampled_from(["cloud", "label", "layout"]),
    mutation=array_mutations(),
    label=st.sampled_from(LABEL_VALUES),
    index=st.integers(0, 2),
)
def test_modelnet_dat_values(fixtures, target, mutation, label, index) -> None:
    with copy_of(fixtures["modelnet"]) as root:
        dat = root / "modelnet3_train_16pts_fps.dat"
        points, labels = pickle.loads(dat.read_bytes())
        payload: object = [points, labels]
        if target == "cloud":
            points[index] = mutate_array(points[index], mutation)
        elif target == "label":
            labels[index] = label
        else:
            layouts = [[[points[0], label], labels], [points, labels[:1]], label]
            payload = layouts[index]
        dat.write_bytes(pickle.dumps(payload))
        check_outcome(_modelnet(root), dat)


@FUZZ
@given(edits=byte_edits(600), which=st.integers(0, 2))
def test_modelnet_raw_txt_bytes(fixtures, edits, which) -> None:
    with copy_of(fixtures["modelnet_raw"]) as root:
        txt = sorted(root.glob("*/*.txt"))[which]
        mutate_bytes(txt, edits)
        check_outcome(_modelnet(root, n_points=8), txt)


# ---------------------------------------------------------------------------------- few-shot
@FUZZ
@given(edits=byte_edits(1500))
def test_fewshot_pkl_bytes(fixtures, edits) -> None:
    with copy_of(fixtures["fewshot"]) as root:
        pkl = root / "2way2shot" / "0.pkl"
        mutate_bytes(pkl, edits)
        check_outcome(_fewshot(root), pkl)


@FUZZ
@given(
    target=st.sampled_from(["points", "label", "class", "item"]),
    mutation=array_mutations(),
    label=st.sampled_from(LABEL_VALUES),
    index=st.integers(0, 3),
)
def test_fewshot_pkl_values(fixtures, target, mutation, label, index) -> None:
    with copy_of(fixtures["fewshot"]) as root:
        pkl = root / "2way2shot" / "0.pkl"
        episode = pickle.loads(pkl.read_bytes())
        points, lab, cls = episode["train"][index]
        if target == "points":
            episode["train"][index] = (mutate_array(points, mutation), lab, cls)
        elif target == "label":
            episode["train"][index] = (points, label, cls)
        elif target == "class":
            episode["train"][index] = (points, lab, label)
        else:
            episode["train"][index] = label
        pkl.write_bytes(pickle.dumps(episode))
        check_outcome(_fewshot(root), pkl)


# ------------------------------------------------------------------------------ ScanObjectNN
@FUZZ
@given(edits=byte_edits(3000))
def test_scanobjectnn_h5_bytes(fixtures, edits) -> None:
    with copy_of(fixtures["scan"]) as root:
        h5 = root / "training_objectdataset.h5"
        mutate_bytes(h5, edits)
        check_outcome(_scan(root), h5, bound=1e6)


@FUZZ
@given(
    key=st.sampled_from(["data", "label"]),
    mutation=array_mutations(),
    label=st.sampled_from(LABEL_VALUES[:7]),
)
def test_scanobjectnn_h5_values(fixtures, key, mutation, label) -> None:
    with copy_of(fixtures["scan"]) as root:
        h5 = root / "training_objectdataset.h5"
        with h5py.File(h5, "r") as f:
            data, labels = f["data"][()], f["label"][()]
        if key == "data":
            data = mutate_array(data, mutation)
        else:
            if mutation[0] == "value":
                labels = np.asarray([label] * len(labels))
            else:
                labels = mutate_array(labels[:, None], mutation)
        try:
            write_h5(h5, data=data, label=labels)
        except (TypeError, ValueError):  # h5py cannot store this dtype at all (e.g. unicode)
            return
        check_outcome(_scan(root), h5, bound=1e6)


# ------------------------------------------------------------------------------ ShapeNetPart
@FUZZ
@given(edits=byte_edits(900), target=st.sampled_from(["txt", "json", "categories"]))
def test_shapenetpart_bytes(fixtures, edits, target) -> None:
    with copy_of(fixtures["part"]) as root:
        if target == "txt":
            path = sorted((root / "03797390").glob("test*.txt"))[0]
        elif target == "json":
            path = root / "train_test_split" / "shuffled_test_file_list.json"
        else:
            path = root / "synsetoffset2category.txt"
        mutate_bytes(path, edits)
        check_outcome(_part(root), path)


@FUZZ
@given(
    entry=st.recursive(
        st.none() | st.booleans() | st.floats() | st.sampled_from(["shape_data/03797390/x", "a/b/c", "a//"]),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["a", "b"]), c, max_size=2),
        max_leaves=4,
    )
)
def test_shapenetpart_json_values(fixtures, entry) -> None:
    with copy_of(fixtures["part"]) as root:
        path = root / "train_test_split" / "shuffled_test_file_list.json"
        entries = json.loads(path.read_text())
        path.write_text(json.dumps(entries + [entry]))
        check_outcome(_part(root), path)


# ------------------------------------------------------------------------------- mesh folder
@settings(FUZZ, max_examples=max(FUZZ.max_examples * 3 // 5, 1))
@given(edits=byte_edits(400), target=st.sampled_from(["obj", "off", "side"]))
def test_mesh_folder_bytes(fixtures, edits, target) -> None:
    with copy_of(fixtures["meshes"]) as root:
        if target == "side":
            _meshes(root)()  # build the cache, then damage its side file
            path = root / "meshfolder_train_8pts_fps.dat.json"
        else:
            path = root / "box" / ("train/box.obj" if target == "obj" else "test/box.off")
            if target == "off":  # the test subset is never loaded here; make it the train mesh instead
                os.replace(root / "box" / "train" / "box.obj", root / "box" / "test" / "box.obj")
                os.replace(path, root / "box" / "train" / "box.off")
                path = root / "box" / "train" / "box.off"
        mutate_bytes(path, edits)
        check_outcome(_meshes(root), path)
