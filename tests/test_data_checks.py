"""Data checks that name the file and what is wrong: a ``.dat`` cache against the point count in its name,
non-finite mesh vertices, headers that claim more data than the file holds, and mesh caches found again
by ``--data`` (docs/RELIABILITY.md, promise 11)."""

from __future__ import annotations

import io
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from datasets.detect import detect_data
from datasets.io import load_npy, read_h5
from tests.test_datasets_official import _modelnet, write_modelnet_lists
from utils.errors import DataError


# ------------------------------------------------------------------------------- .dat point count
def _write_cache(root: Path, name_points: int, sizes: list[int]) -> Path:
    ids = write_modelnet_lists(root, train=4, test=3)
    rng = np.random.default_rng(0)
    path = root / f"modelnet3_train_{name_points}pts_fps.dat"
    clouds = [rng.standard_normal((sizes[i % len(sizes)], 6)).astype(np.float32) for i in range(len(ids["train"]))]
    labels = [np.array([i % 3], np.int32) for i in range(len(clouds))]
    path.write_bytes(pickle.dumps([clouds, labels]))
    return path


def test_a_cache_holding_another_point_count_than_its_name_is_refused(tmp_path):
    path = _write_cache(tmp_path / "mn", 32, [64])
    with pytest.raises(DataError) as info:
        _modelnet(tmp_path / "mn")
    assert str(info.value) == (
        f"'{path}': its name says 32 points per cloud, but entry 0 has 64 (clouds by point count: 12 with 64); "
        "rebuild it (prepare_data.py modelnet-cache / mesh-folder --n-points 32) or rename it after the count "
        "it holds")


def test_a_cache_of_mixed_sizes_is_refused_before_any_batch(tmp_path):
    _write_cache(tmp_path / "mn", 32, [32, 32, 40])
    with pytest.raises(DataError, match=r"entry 2 has 40 \(clouds by point count: 8 with 32, 4 with 40\)"):
        _modelnet(tmp_path / "mn")
    _write_cache(tmp_path / "ok", 32, [32])
    assert len(_modelnet(tmp_path / "ok")) == 12  # the right count still loads


# ------------------------------------------------------------------------------- mesh vertices
@pytest.fixture
def trimesh():
    return pytest.importorskip("trimesh")


@pytest.mark.parametrize("ext", ["obj", "off", "ply", "stl"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_mesh_vertex_is_an_error_naming_the_file(trimesh, tmp_path, ext, value):
    from datasets.mesh_folder import sample_mesh

    box = trimesh.creation.box()
    vertices = box.vertices.copy()
    vertices[0, 0] = value
    path = tmp_path / f"bad.{ext}"
    trimesh.Trimesh(vertices, box.faces, process=False).export(path)
    with pytest.raises(DataError, match=rf"'{path}' vertices: vertex \d+, column 0: (nan|inf) is not finite"):
        sample_mesh(str(path), 16, 0, "bad")
    good = tmp_path / f"good.{ext}"
    box.export(good)
    assert sample_mesh(str(good), 16, 0, "good").shape == (16, 6)


def test_mesh_samples_are_unchanged_by_the_vertex_check(trimesh, tmp_path):
    """sample_mesh loads unprocessed, checks, then processes: the same samples as trimesh's processed load."""
    from datasets.io import item_rng
    from datasets.mesh_folder import sample_mesh

    path = tmp_path / "box.obj"
    trimesh.creation.box(extents=(1, 2, 3)).export(path)
    mesh = trimesh.load(path, force="mesh")
    points, _ = trimesh.sample.sample_surface(mesh, 32, seed=item_rng(0, __import__("zlib").crc32(b"box")))
    np.testing.assert_array_equal(sample_mesh(str(path), 32, 0, "box")[:, :3], points.astype(np.float32))


# ------------------------------------------------------------------------------- header claims
def test_an_npy_header_claiming_a_huge_shape_names_the_claim_and_the_real_size(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3)})
    path = tmp_path / "x.npy"
    path.write_bytes(buf.getvalue() + bytes(120))
    with pytest.raises(DataError) as info:
        load_npy(str(path))
    assert str(info.value) == (f"'{path}': its .npy header claims shape (1000000000000, 3) of float32 (12.0 TB of "
                               "data), but the file holds 120 bytes after the header (30 values)")
    np.save(path, np.ones((4, 3), np.float32))
    assert load_npy(str(path)).shape == (4, 3)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_an_h5_data_set_claiming_a_huge_shape_names_the_claim_and_the_real_size(tmp_path, compression):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:  # chunks never written: the header alone claims the size
        f.create_dataset("data", shape=(10**9, 2048, 3), dtype="f4", chunks=(1, 2048, 3), compression=compression)
        f["label"] = np.zeros(3, np.int64)
    with pytest.raises(DataError, match=rf"'{path}': HDF5 key 'data' claims shape \(1000000000, 2048, 3\) of "
                                        r"float32 \(24\.6 TB of data\), but the file is \d\.\d KB"):
        read_h5(str(path), ["data", "label"])
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.zeros((64, 256, 3), np.float32), compression=compression)
        f["label"] = np.zeros(64, np.int64)
    assert read_h5(str(path), ["data", "label"])["data"].shape == (64, 256, 3)


def test_mesh_headers_claiming_more_than_the_file_holds(trimesh, tmp_path):
    from datasets.mesh_folder import check_mesh_header, sample_mesh

    box = trimesh.creation.box()
    for ext in ("ply", "stl", "off"):
        box.export(tmp_path / f"ok.{ext}")
        check_mesh_header(str(tmp_path / f"ok.{ext}"))
    box.export(tmp_path / "ascii.ply", encoding="ascii")
    check_mesh_header(str(tmp_path / "ascii.ply"))
    ply = tmp_path / "big.ply"
    ply.write_bytes((tmp_path / "ok.ply").read_bytes().replace(b"element vertex 8\n", b"element vertex 1000000000000\n"))
    with pytest.raises(DataError, match=r"big\.ply': its PLY header claims 1000000000000 'vertex', 12 'face' elements "
                                        r"\(at least 12\.0 TB of data\), but only \d+ bytes follow the header"):
        sample_mesh(str(ply), 16, 0, "big")
    stl = bytearray((tmp_path / "ok.stl").read_bytes())
    stl[80:84] = struct.pack("<I", 4_000_000_000)
    (tmp_path / "big.stl").write_bytes(bytes(stl))
    with pytest.raises(DataError, match=r"big\.stl': its binary STL header claims 4000000000 triangles \(200\.0 GB\), "
                                        r"but the file holds 684 bytes \(12 triangles\)"):
        sample_mesh(str(tmp_path / "big.stl"), 16, 0, "big")
    off = tmp_path / "big.off"
    off.write_bytes((tmp_path / "ok.off").read_bytes().replace(b"8 12 0", b"800000000 12 0", 1))
    with pytest.raises(DataError, match=r"big\.off': its OFF header claims 800000000 vertices and 12 faces \(at least "
                                        r"2400000048 numbers\), but the file holds 72 numbers"):
        sample_mesh(str(off), 16, 0, "big")


# ------------------------------------------------------------------------------- mesh caches and --data
def _mesh_folder(trimesh, root: Path) -> Path:
    for c, name in enumerate(("box", "slab")):
        for split in ("train", "test"):
            (root / name / split).mkdir(parents=True)
            for i in range(2):
                trimesh.creation.box(extents=(1 + c, 1 + 0.2 * i, 0.5)).export(root / name / split / f"{i}.obj")
    return root


def test_mesh_caches_from_prepare_data_are_found_and_used_by_data(trimesh, tmp_path, caplog, monkeypatch):
    from datasets import mesh_folder
    from datasets.mesh_folder import MeshFolder, build_mesh_cache

    root = _mesh_folder(trimesh, tmp_path / "meshes")
    for subset in ("train", "test"):  # prepare_data.py mesh-folder --n-points 64 --raw-points 300 --seed 3
        build_mesh_cache(str(root), subset, n_points=64, raw_points=300, seed=3, device="cpu")
    det = detect_data(str(root))
    assert det.points == 64 and "using the existing meshfolder_{train,test}_64pts_fps.dat" in det.detail
    assert (det.section["RAW_POINTS"], det.section["SEED"], det.section["TEST_FRACTION"]) == (300, 3, 0.2)
    assert detect_data(str(root), 64).section == det.section  # the same count asked for explicitly
    monkeypatch.setattr(mesh_folder, "build_mesh_cache", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    s = det.section
    with caplog.at_level(logging.WARNING):
        ds = MeshFolder(root=s["ROOT"], subset="train", n_points=s["N_POINTS"], raw_points=s["RAW_POINTS"],
                        test_fraction=s["TEST_FRACTION"], seed=s["SEED"], npoints=32)
    assert len(ds) == 4 and tuple(ds[0]["points"].shape) == (32, 3) and "stale" not in caplog.text
    other = detect_data(str(root), 128)  # another count: built on first use, with the defaults
    assert other.section["RAW_POINTS"] == 10000 and "sampled into" in other.detail


def test_a_fewshot_episode_of_mixed_sizes_is_refused_unless_npoints_takes_a_prefix(tmp_path):
    from datasets.build import DATASETS

    rng = np.random.default_rng(0)
    episode = {s: [(rng.standard_normal((32 if k != 3 else 40, 6)).astype(np.float32), k % 2, 10 + k % 2)
                   for k in range(4)] for s in ("train", "test")}
    folder = tmp_path / "2way2shot"
    folder.mkdir()
    (folder / "0.pkl").write_bytes(pickle.dumps(episode))
    make = DATASETS.get("ModelNetFewShot")
    with pytest.raises(DataError, match=r"0\.pkl': train\[3\] has 40 points but N_POINTS is 32 \(clouds by point "
                                        r"count: 3 with 32, 1 with 40\); set N_POINTS"):
        make(data_path=str(tmp_path), n_points=32, way=2, shot=2, fold=0)
    ds = make(data_path=str(tmp_path), n_points=32, way=2, shot=2, fold=0, npoints=32)
    assert len(ds) == 4 and tuple(ds[3]["points"].shape) == (32, 3)
