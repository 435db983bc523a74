"""Loaders refuse silently wrong data: out-of-range coordinates, non-integer labels, non-numeric
dtypes and unreadable files are a DataError naming the file (and the item and the value)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from datasets import DATASETS
from datasets.io import MAX_ABS_COORD, LAYOUTS, load_cloud_cache, load_npy, read_h5, read_lines
from datasets.modelnet_fewshot import fewshot_path
from tests.test_datasets_official import (
    write_fewshot,
    write_h5,
    write_modelnet_cache,
    write_shapenet,
    write_shapenetpart,
)
from utils.errors import DataError

SYN = "02691156"


def _shapenet(root: Path):
    return DATASETS.get("ShapeNet")(
        data_path=str(root / "ShapeNet-55"), pc_path=str(root / "shapenet_pc"), n_points=64, npoints=16
    )


def _cache(path: Path, clouds, labels) -> None:
    path.write_bytes(pickle.dumps([list(clouds), list(labels)]))


# ------------------------------------------------------------------------- coordinate range
def test_bound_keeps_normalisation_and_squared_distances_finite() -> None:
    # Three squared coordinates of twice the bound must stay far inside float32 (|x| < 3.4e38).
    assert 3 * (2 * MAX_ABS_COORD) ** 2 < np.finfo(np.float32).max / 1e6


def test_shapenet_float64_beyond_float32_range_is_named(tmp_path: Path) -> None:
    root = write_shapenet(tmp_path / "S")
    npy = root / "shapenet_pc" / f"{SYN}-train0001.npy"
    cloud = np.load(npy).astype(np.float64)
    cloud[7, 2] = 1e300
    np.save(npy, cloud)
    with pytest.raises(
        DataError, match=r"train0001\.npy': point 7, column 2: 1e\+300 is not finite as float32"
    ):
        _shapenet(root)[1]


def test_shapenet_huge_float32_coordinates_are_refused_not_zeroed(tmp_path: Path) -> None:
    root = write_shapenet(tmp_path / "S")
    npy = root / "shapenet_pc" / f"{SYN}-train0000.npy"
    cloud = np.load(npy)
    cloud[3, 0] = 1e20
    np.save(npy, cloud)
    with pytest.raises(
        DataError, match=r"train0000\.npy': point 3, column 0: 1e\+20 exceeds the coordinate bound 1e\+06"
    ):
        _shapenet(root)[0]
    cloud[3, 0] = -0.9 * MAX_ABS_COORD  # inside the bound: loads, normalised and finite
    np.save(npy, cloud)
    points = _shapenet(root)[0]["points"]
    assert bool(points.isfinite().all()) and points.abs().max() > 0.5


@pytest.mark.parametrize("dtype", ["<U8", object, np.complex64])
def test_shapenet_non_numeric_dtype_is_named(tmp_path: Path, dtype) -> None:
    root = write_shapenet(tmp_path / "S")
    npy = root / "shapenet_pc" / f"{SYN}-train0000.npy"
    arr = np.load(npy).astype(dtype)
    if arr.dtype == object:
        arr.dump(npy)  # an object array can only be stored as a pickle
        with pytest.raises(DataError, match=r"train0000\.npy' is truncated or corrupt"):
            _shapenet(root)[0]
        return
    np.save(npy, arr)
    with pytest.raises(DataError, match=r"train0000\.npy': point cloud has dtype .*; expected real numbers"):
        _shapenet(root)[0]


def test_modelnet_dat_float64_overflow_and_huge_values(tmp_path: Path) -> None:
    root = tmp_path / "mn"
    write_modelnet_cache(root)
    dat = root / "modelnet3_train_32pts_fps.dat"
    points, labels = pickle.loads(dat.read_bytes())
    bad = [p.astype(np.float64) for p in points]
    bad[5][9, 4] = -3e39
    _cache(dat, bad, labels)
    with pytest.raises(DataError, match=r"fps\.dat' entry 5: point 9, column 4: -3e\+39 is not finite"):
        load_cloud_cache(str(dat), 3)
    bad[5][9, 4] = 0.0
    bad[2][0, 1] = 2e7
    _cache(dat, bad, labels)
    with pytest.raises(DataError, match=r"entry 2: point 0, column 1: 2e\+07 exceeds the coordinate bound"):
        load_cloud_cache(str(dat), 3)


def test_modelnet_dat_fractional_label_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "mn"
    write_modelnet_cache(root)
    dat = root / "modelnet3_train_32pts_fps.dat"
    points, labels = pickle.loads(dat.read_bytes())
    labels[4] = np.array([1.5])
    _cache(dat, points, labels)
    with pytest.raises(
        DataError, match=r"fps\.dat': label 4 is 1\.5, not an integer; expected integers in \[0, 3\)"
    ):
        load_cloud_cache(str(dat), 3)
    labels[4] = np.array(["chair"])
    _cache(dat, points, labels)
    with pytest.raises(DataError, match=r"fps\.dat': labels have dtype <U\d+; expected integer class"):
        load_cloud_cache(str(dat), 3)


def test_dat_ragged_or_string_clouds_are_named(tmp_path: Path) -> None:
    dat = tmp_path / "x.dat"
    _cache(dat, [[[0.0, 1.0, 2.0], [1.0, 2.0]]], [np.array([0])])
    with pytest.raises(DataError, match=r"x\.dat' entry 0: point cloud is not a numeric array"):
        load_cloud_cache(str(dat), 3)
    _cache(dat, [np.array([["a", "b", "c"]])], [np.array([0])])
    with pytest.raises(DataError, match=r"x\.dat' entry 0: point cloud has dtype <U1; expected real numbers"):
        load_cloud_cache(str(dat), 3)


def test_pickle_overflow_error_is_named(tmp_path: Path) -> None:
    dat = tmp_path / "o.dat"
    # A BINBYTES8 opcode whose length field claims 2**64 - 1 bytes: pickle raises OverflowError.
    dat.write_bytes(b"\x80\x04\x8e" + (2**64 - 1).to_bytes(8, "little"))
    with pytest.raises(DataError, match=r"o\.dat' is truncated or corrupt"):
        load_cloud_cache(str(dat), 3)


def test_scanobjectnn_float64_overflow_and_bound(tmp_path: Path) -> None:
    folder = tmp_path / "main_split"
    write_h5(folder / "test_objectdataset.h5")
    data = np.random.default_rng(0).normal(size=(6, 16, 3))
    data[4, 11, 1] = 1e300
    write_h5(folder / "training_objectdataset.h5", data=data)
    with pytest.raises(
        DataError, match=r"objectdataset\.h5' 'data': cloud 4, point 11, column 1: 1e\+300 is not finite"
    ):
        DATASETS.get("ScanObjectNN")(root=str(folder))
    data[4, 11, 1] = 5e19
    write_h5(folder / "training_objectdataset.h5", data=data.astype(np.float32))
    with pytest.raises(DataError, match=r"cloud 4, point 11, column 1: 5e\+19 exceeds the coordinate bound"):
        DATASETS.get("ScanObjectNN")(root=str(folder))
    write_h5(folder / "training_objectdataset.h5", data=np.zeros((6, 0, 3), np.float32))
    with pytest.raises(DataError, match=r"training_objectdataset\.h5': too few points: 0 per cloud < N_POINTS=1"):
        DATASETS.get("ScanObjectNN")(root=str(folder))
    write_h5(folder / "training_objectdataset.h5", data=np.array([[[b"a", b"b", b"c"]]] * 6))
    with pytest.raises(DataError, match=r"'data': point cloud has dtype \|S1; expected real numbers"):
        DATASETS.get("ScanObjectNN")(root=str(folder))


def test_fewshot_object_points_and_fractional_label(tmp_path: Path) -> None:
    path = write_fewshot(tmp_path, way=2, shot=1)
    episode = pickle.loads(path.read_bytes())
    episode["train"][1] = ("not points", 1, 11)
    path.write_bytes(pickle.dumps(episode))
    kw = {"data_path": str(tmp_path), "n_points": 32, "way": 2, "shot": 1, "fold": 0}
    with pytest.raises(DataError, match=r"0\.pkl' train\[1\]: point cloud has dtype <U10; expected real"):
        DATASETS.get("ModelNetFewShot")(**kw)
    episode["train"][1] = (episode["train"][0][0], 0.5, 11)
    path.write_bytes(pickle.dumps(episode))
    with pytest.raises(DataError, match=r"train labels: label 1 is 0\.5, not an integer"):
        DATASETS.get("ModelNetFewShot")(**kw)
    path.write_bytes(pickle.dumps({1: [], "x": []}))
    with pytest.raises(DataError, match=r"not a few-shot episode: expected a dict .*, found \['x', 1\]"):
        DATASETS.get("ModelNetFewShot")(**kw)


# ----------------------------------------------------------------------- unreadable files
def test_binary_split_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    with pytest.raises(DataError, match=r"train\.txt' is not a UTF-8 text file \(expected names\)"):
        read_lines(str(path), "names")


def test_npy_corrupt_header_memory_and_token_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.npy"
    np.save(path, np.zeros((4, 3), np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"(4, 3)", b"(4,(3)"))
    with pytest.raises(DataError, match=r"c\.npy' is truncated or corrupt"):
        load_npy(str(path))
    header_end = raw.index(b"\n") + 1
    body = raw[10:header_end].replace(b"'shape': (4, 3)", b"'shape': (99999999999999, 3)")
    path.write_bytes(raw[:8] + len(body).to_bytes(2, "little") + body + raw[header_end:])
    with pytest.raises(DataError, match=r"c\.npy': its \.npy header claims shape \(99999999999999, 3\) of float32 "
                                        r"\(1200\.0 TB of data\), but the file holds 48 bytes after the header"):
        load_npy(str(path))
    path.write_bytes(raw[:10] + raw[10:header_end].replace(b"{", b"{'''", 1) + raw[header_end:])
    with pytest.raises(DataError, match=r"c\.npy' is truncated or corrupt"):
        load_npy(str(path))


def test_h5_group_instead_of_dataset_and_corrupt_superblock(tmp_path: Path) -> None:
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as f:
        f.create_group("data")
        f.create_dataset("label", data=np.zeros(3))
    with pytest.raises(DataError, match=r"g\.h5': HDF5 key 'data' is a group; expected a dataset"):
        read_h5(str(path), ("data", "label"))
    write_h5(path)
    raw = bytearray(path.read_bytes())
    raw[40:48] = b"\xff" * 8  # the superblock's end-of-file address
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"g\.h5' is truncated or corrupt"):
        read_h5(str(path), ("data", "label"))


def test_shapenetpart_deeply_nested_json_is_named(tmp_path: Path) -> None:
    root = write_shapenetpart(tmp_path / "P")
    (root / "train_test_split" / "shuffled_test_file_list.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match=r"shuffled_test_file_list\.json' is truncated or corrupt"):
        DATASETS.get("ShapeNetPart")(root=str(root), subset="test", npoints=8)


# ---------------------------------------------------------------------------- mesh folder
def _meshes(root: Path):
    trimesh = pytest.importorskip("trimesh")
    for cls, make in (("box", trimesh.creation.box), ("ball", trimesh.creation.icosphere)):
        (root / cls / "train").mkdir(parents=True)
        (root / cls / "test").mkdir()
        make().export(root / cls / "train" / f"{cls}0.obj")
        make().export(root / cls / "test" / f"{cls}1.obj")
    return trimesh


def test_mesh_folder_cache_follows_mesh_content(tmp_path: Path) -> None:
    root = tmp_path / "meshes"
    trimesh = _meshes(root)
    kw = {"root": str(root), "n_points": 16, "raw_points": 32}
    before = DATASETS.get("MeshFolder")(**kw).clouds[1].copy()
    mesh = root / "box" / "train" / "box0.obj"
    trimesh.creation.box(extents=(5, 1, 1)).export(mesh)
    stat = os.stat(mesh)
    os.utime(mesh, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later edit, however coarse the clock
    after = DATASETS.get("MeshFolder")(**kw).clouds[1]
    assert np.ptp(after[:, 0]) > 4 and np.ptp(before[:, 0]) < 1.5


def test_mesh_folder_truncated_side_file_rebuilds(tmp_path: Path, caplog) -> None:
    root = tmp_path / "meshes"
    _meshes(root)
    kw = {"root": str(root), "n_points": 16, "raw_points": 32}
    first = DATASETS.get("MeshFolder")(**kw).clouds
    side = root / "meshfolder_train_16pts_fps.dat.json"
    side.write_text(side.read_text()[:25])
    with caplog.at_level("WARNING"):
        again = DATASETS.get("MeshFolder")(**kw).clouds
    assert "meshfolder_train_16pts_fps.dat.json" in caplog.text and "unreadable" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_mesh_with_huge_vertices_is_named(tmp_path: Path) -> None:
    root = tmp_path / "meshes"
    _meshes(root)
    (root / "box" / "train" / "box0.obj").write_text("v 0 0 0\nv 1e30 0 0\nv 0 1e30 0\nf 1 2 3\n")
    with pytest.raises(
        DataError, match=r"box0\.obj' vertices: vertex 1, column 0: 1e\+30 exceeds the coordinate bound"
    ):
        DATASETS.get("MeshFolder")(root=str(root), n_points=4, raw_points=8)


# ------------------------------------------------------------------------------ few-shot layout
def test_fewshot_layout_is_the_official_one_everywhere(tmp_path: Path) -> None:
    assert fewshot_path(str(tmp_path), 5, 10, 3) == str(tmp_path / "5way10shot" / "3.pkl")
    layout = LAYOUTS["modelnet-fewshot"]
    for w in (5, 10):
        for s in (10, 20):
            for f in range(10):
                (tmp_path / f"{w}way{s}shot").mkdir(exist_ok=True)
                (tmp_path / f"{w}way{s}shot" / f"{f}.pkl").write_bytes(b"")
    assert layout.missing(str(tmp_path)) == []
    doc = (Path(__file__).resolve().parents[1] / "docs" / "DATA.md").read_text()
    assert "├── 5way10shot/0.pkl" in doc


def test_fewshot_reads_the_official_folder_and_the_underscore_variant(tmp_path: Path) -> None:
    official = write_fewshot(tmp_path / "a", way=2, shot=3)
    assert official.parent.name == "2way3shot"
    kw = {"n_points": 32, "way": 2, "shot": 3, "fold": 0}
    assert len(DATASETS.get("ModelNetFewShot")(data_path=str(tmp_path / "a"), **kw)) == 6
    legacy = tmp_path / "b" / "2way_3shot"  # the folder name the official loader code reads
    legacy.mkdir(parents=True)
    os.replace(official, legacy / "0.pkl")
    assert fewshot_path(str(tmp_path / "b"), 2, 3, 0) == str(legacy / "0.pkl")
    assert len(DATASETS.get("ModelNetFewShot")(data_path=str(tmp_path / "b"), **kw)) == 6
    with pytest.raises(
        DataError,
        match=r"missing file .*2way3shot/1\.pkl' \(or .*2way_3shot/1\.pkl'\).*2way_3shot holds \['0\.pkl'\]",
    ):
        DATASETS.get("ModelNetFewShot")(data_path=str(tmp_path / "b"), **{**kw, "fold": 1})
