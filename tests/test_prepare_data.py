"""tools/prepare_data.py end to end on tiny fixtures, plus the caches the data sets build themselves."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import DATASETS
from datasets.io import load_cloud_cache, safe_pickle_load
from tests.test_datasets_official import (
    MN_CLASSES,
    assert_item,
    assert_normalised,
    write_modelnet_cache,
    write_modelnet_raw,
    write_shapenet,
)
from tests.helpers import child_env
from tools.prepare_data import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("modelnet-cache", "fewshot", "mesh-folder", "pack", "layout")


# ------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_documents_itself(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"prepare_data.py {command}" in out and len(out.splitlines()) > 5


@pytest.mark.slow
def test_script_runs_from_the_repo_root() -> None:
    proc = subprocess.run(
        [sys.executable, "tools/prepare_data.py", "--help"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for command in SUBCOMMANDS:
        assert command in proc.stdout


def test_parser_requires_a_subcommand() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


# -------------------------------------------------------------------------------- modelnet-cache
def test_modelnet_cache_from_raw_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    ids = write_modelnet_raw(root, raw_points=40)
    argv = [
        "modelnet-cache",
        "--root",
        str(root),
        "--num-category",
        "10",
        "--n-points",
        "16",
        "--batch-size",
        "5",
    ]
    (root / "modelnet10_shape_names.txt").write_text("\n".join(MN_CLASSES * 4))
    assert main(argv) == 2  # 12 names for NUM_CATEGORY 10: a one-line error, no traceback
    assert "lists 12 classes but NUM_CATEGORY is 10: set NUM_CATEGORY: 12" in capsys.readouterr().err
    for split in ("train", "test"):
        (root / f"modelnet3_{split}.txt").rename(root / f"modelnet10_{split}.txt")
    (root / "modelnet10_shape_names.txt").write_text(
        "\n".join([*MN_CLASSES, *[f"extra{i}" for i in range(7)]])
    )
    assert main(argv) == 0
    for split in ("train", "test"):
        cache = root / f"modelnet10_{split}_16pts_fps.dat"
        points, labels = safe_pickle_load(str(cache))
        assert len(points) == len(ids[split]) and all(
            p.shape == (16, 6) and p.dtype == np.float32 for p in points
        )
        assert all(lab.dtype == np.int32 and lab.shape == (1,) for lab in labels)
        assert [int(lab[0]) for lab in labels] == [MN_CLASSES.index(i.rsplit("_", 1)[0]) for i in ids[split]]
        first_id = ids[split][-1]
        raw = np.loadtxt(
            root / first_id.rsplit("_", 1)[0] / f"{first_id}.txt", delimiter=",", dtype=np.float32
        )
        np.testing.assert_allclose(points[-1][0], raw[0])  # FPS starts at index 0
        assert len({tuple(r) for r in points[-1]}) == 16 and all(
            any(np.allclose(r, q) for q in raw) for r in points[-1]
        )
    assert main(argv) == 0
    assert "exists, skipped" in capsys.readouterr().out
    ds = DATASETS.get("ModelNet")(data_path=str(root), n_points=16, num_category=10, subset="test")
    assert len(ds) == 9 and ds[0]["points"].shape == (16, 3)


def test_modelnet_builds_a_missing_cache(tmp_path: Path) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet_raw(root, raw_points=24, train=2, test=1)
    ds = DATASETS.get("ModelNet")(data_path=str(root), n_points=8, num_category=3, subset="test")
    assert (root / "modelnet3_test_8pts_fps.dat").is_file() and len(ds) == 3
    assert_item(ds[1], 8)
    assert_normalised(ds[1]["points"])


def test_modelnet_cache_reports_too_few_points(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet_raw(root, raw_points=10, train=1, test=1)
    assert main(["modelnet-cache", "--root", str(root), "--num-category", "10", "--n-points", "16"]) == 2
    # no modelnet10_* lists: the folder's one list (modelnet3_*, 3 classes) disagrees with --num-category 10
    assert "lists 3 classes but NUM_CATEGORY is 10: set NUM_CATEGORY: 3" in capsys.readouterr().err
    (root / "modelnet3_train.txt").rename(root / "modelnet10_train.txt")
    (root / "modelnet10_shape_names.txt").write_text("\n".join([*MN_CLASSES, *[f"x{i}" for i in range(7)]]))
    assert (
        main(
            [
                "modelnet-cache",
                "--root",
                str(root),
                "--num-category",
                "10",
                "--n-points",
                "16",
                "--splits",
                "train",
            ]
        )
        == 2
    )
    assert "too few points: 10 < 16" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- fewshot
def _episodes(out: Path, way: int, shot: int) -> list[dict]:
    return [safe_pickle_load(str(out / f"{way}way{shot}shot" / f"{fold}.pkl")) for fold in range(3)]


def test_fewshot_folds_follow_the_protocol(tmp_path: Path) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet_cache(root, n_points=8, train=5, test=4)
    out = tmp_path / "ModelNetFewshot"
    base = [
        "fewshot",
        "--modelnet-root",
        str(root),
        "--num-category",
        "3",
        "--n-points",
        "8",
        "--folds",
        "3",
        "--query",
        "4",
        "--ways",
        "2",
        "--shots",
        "3",
    ]
    assert main([*base, "--out", str(out)]) == 0
    train_clouds, train_labels = load_cloud_cache(str(root / "modelnet3_train_8pts_fps.dat"), 3)
    test_clouds, test_labels = load_cloud_cache(str(root / "modelnet3_test_8pts_fps.dat"), 3)

    def source(cloud: np.ndarray, clouds: list[np.ndarray]) -> int:
        hits = [i for i, c in enumerate(clouds) if np.array_equal(c, cloud)]
        return hits[0] if hits else -1

    episodes = _episodes(out, 2, 3)
    for episode in episodes:
        assert len(episode["train"]) == 2 * 3 and len(episode["test"]) == 2 * 4
        mapping = {}
        for subset, clouds, labels in (
            ("train", train_clouds, train_labels),
            ("test", test_clouds, test_labels),
        ):
            picked = []
            for points, label, original in episode[subset]:
                assert points.shape == (8, 6) and points.dtype == np.float32 and 0 <= label < 2
                assert mapping.setdefault(label, original) == original
                index = source(points, clouds)
                assert index >= 0 and labels[index] == original
                picked.append(index)
            assert len(set(picked)) == len(picked)
            assert sorted(lab for _, lab, _ in episode[subset]) == sorted(
                [0, 1] * (3 if subset == "train" else 4)
            )
        support = {p.tobytes() for p, _, _ in episode["train"]}
        assert not support & {p.tobytes() for p, _, _ in episode["test"]}
    assert len({tuple(p.tobytes() for p, _, _ in e["train"]) for e in episodes}) == 3  # folds differ

    again = tmp_path / "again"
    assert main([*base, "--out", str(again)]) == 0
    for first, second in zip(episodes, _episodes(again, 2, 3), strict=True):
        for subset in ("train", "test"):
            assert [(p.tobytes(), lab, o) for p, lab, o in first[subset]] == [
                (p.tobytes(), lab, o) for p, lab, o in second[subset]
            ]
    other = tmp_path / "other"
    assert main([*base, "--out", str(other), "--seed", "1"]) == 0
    assert any(
        a["train"][i][0].tobytes() != b["train"][i][0].tobytes()
        for a, b in zip(episodes, _episodes(other, 2, 3), strict=True)
        for i in range(6)
    )

    ds = DATASETS.get("ModelNetFewShot")(
        data_path=str(out), n_points=8, num_category=3, way=2, shot=3, fold=2
    )
    assert len(ds) == 6 and ds.num_classes == 2
    assert_item(ds[0], 8)


def test_fewshot_needs_enough_shapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet_cache(root, n_points=8, train=2, test=2)
    assert (
        main(
            [
                "fewshot",
                "--modelnet-root",
                str(root),
                "--out",
                str(tmp_path / "o"),
                "--num-category",
                "3",
                "--n-points",
                "8",
                "--ways",
                "2",
                "--shots",
                "3",
            ]
        )
        == 2
    )
    assert "only 0 qualify" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- mesh-folder
@pytest.fixture
def trimesh():
    """The trimesh module (a pinned requirement); the mesh tests skip where it is absent."""
    return pytest.importorskip("trimesh")


def _write_meshes(trimesh, root: Path, split_layout: bool) -> None:
    shapes = {
        "box": lambda i: trimesh.creation.box(extents=(1 + i, 1, 2)),
        "ball": lambda i: trimesh.creation.icosphere(subdivisions=1, radius=1 + i),
    }
    exts = (".obj", ".off", ".ply", ".stl", ".obj")
    for name, make in shapes.items():
        for i, ext in enumerate(exts):
            folder = root / name / ("test" if i == 4 else "train") if split_layout else root / name
            folder.mkdir(parents=True, exist_ok=True)
            make(i).export(folder / f"{name}{i}{ext}")


def test_mesh_folder_with_split_folders(trimesh, tmp_path: Path) -> None:
    root = tmp_path / "meshes"
    _write_meshes(trimesh, root, split_layout=True)
    assert main(["mesh-folder", "--root", str(root), "--n-points", "16", "--raw-points", "64"]) == 0
    points, labels = safe_pickle_load(str(root / "meshfolder_train_16pts_fps.dat"))
    assert len(points) == 8 and points[0].shape == (16, 6) and labels[0].dtype == np.int32
    train = DATASETS.get("MeshFolder")(root=str(root), n_points=16, raw_points=64)
    test = DATASETS.get("MeshFolder")(
        root=str(root), subset="test", n_points=16, raw_points=64, use_normals=True
    )
    assert (len(train), len(test), train.classes, train.num_classes) == (8, 2, ["ball", "box"], 2)
    item = test[1]
    assert_item(item, 16)
    assert_normalised(item["points"])
    assert item["name"] == "box/test/box4.obj" and item["label"].item() == 1
    assert torch.allclose(item["normals"].norm(dim=1), torch.ones(16), atol=1e-4)


def test_mesh_folder_seeded_split_sampling_and_rebuild(trimesh, tmp_path: Path) -> None:
    root = tmp_path / "meshes"
    _write_meshes(trimesh, root, split_layout=False)
    kw = {"n_points": 16, "raw_points": 48, "test_fraction": 0.4}
    test = DATASETS.get("MeshFolder")(root=str(root), subset="test", **kw)
    assert len(test) == 4 and len(DATASETS.get("MeshFolder")(root=str(root), **kw)) == 6
    again = DATASETS.get("MeshFolder")(root=str(root), subset="test", cache_dir=str(tmp_path / "c"), **kw)
    assert again.names == test.names
    assert all(np.array_equal(a, b) for a, b in zip(again.clouds, test.clouds, strict=True))
    other = DATASETS.get("MeshFolder")(
        root=str(root), subset="test", cache_dir=str(tmp_path / "d"), **{**kw, "seed": 1}
    )
    assert other.names != test.names or not all(
        np.array_equal(a, b) for a, b in zip(other.clouds, test.clouds, strict=True)
    )
    trimesh.creation.box().export(root / "box" / "box9.obj")
    trimesh.creation.box().export(root / "ball" / "extra.obj")
    rebuilt_test = DATASETS.get("MeshFolder")(root=str(root), subset="test", **kw)
    rebuilt_train = DATASETS.get("MeshFolder")(root=str(root), **kw)
    assert (len(rebuilt_test), len(rebuilt_train)) == (4, 8)  # round(0.4 * 6) = 2 test meshes per class
    exts = (".obj", ".off", ".ply", ".stl", ".obj")
    assert sorted(rebuilt_test.names + rebuilt_train.names) == sorted(
        [f"{c}/{c}{i}{e}" for c in ("ball", "box") for i, e in enumerate(exts)]
        + ["box/box9.obj", "ball/extra.obj"]
    )


def test_mesh_folder_errors(trimesh, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "meshes"
    (root / "empty").mkdir(parents=True)
    assert main(["mesh-folder", "--root", str(root)]) == 2
    assert "holds no .obj/.off/.ply/.stl meshes" in capsys.readouterr().err
    (root / "empty" / "broken.off").write_text("OFF\n3 1 0\n0 0\n")
    assert (
        main(
            [
                "mesh-folder",
                "--root",
                str(root),
                "--n-points",
                "4",
                "--raw-points",
                "8",
                "--test-fraction",
                "0",
            ]
        )
        == 2
    )
    assert "broken.off" in capsys.readouterr().err
    assert main(["mesh-folder", "--root", str(tmp_path / "absent")]) == 2
    assert "MeshFolder: ROOT" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- layout
def test_layout_lists_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_shapenet(tmp_path / "ShapeNet55-34", n_points=8)
    assert main(["layout", "shapenet", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "shapenet_pc/" in out and "Official copy" in out and "OK:" in out
    (root / "ShapeNet-55" / "test.txt").unlink()
    assert main(["layout", "shapenet", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "  - ShapeNet-55/test.txt | ShapeNet-34/test.txt" in out
    assert main(["layout", "scanobjectnn", "--root", str(tmp_path / "none")]) == 1
    out = capsys.readouterr().out
    assert "hkust-vgd" in out and "the root itself" in out
    (tmp_path / "few" / "5way10shot").mkdir(parents=True)
    assert main(["layout", "modelnet-fewshot", "--root", str(tmp_path / "few")]) == 1
    assert "5way10shot/0.pkl" in capsys.readouterr().out


def test_layout_of_a_modelnet_cache_only_copy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    root.mkdir()
    for name in (
        "modelnet40_shape_names.txt",
        "modelnet40_train.txt",
        "modelnet40_test.txt",
        "modelnet40_train_8192pts_fps.dat",
        "modelnet40_test_8192pts_fps.dat",
    ):
        (root / name).write_bytes(pickle.dumps([]))
    assert main(["layout", "modelnet40", "--root", str(root)]) == 0
