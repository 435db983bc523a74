"""Your own data set: an 11-class ModelNet-layout folder and an 11-class mesh folder, run through the real
command lines with --data (no YAML written, no renaming), plus the statistics and the cache file mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"shape{c:02d}" for c in range(11)]
PER_SPLIT = 3
RAW_POINTS = 160


def _cloud(c: int, i: int) -> np.ndarray:
    """A class-dependent ellipsoid surface with normals, (RAW_POINTS, 6)."""
    rng = np.random.default_rng([c, i])
    v = rng.normal(size=(RAW_POINTS, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pts = v * np.array([1.0 + 0.3 * c, 1.0, 0.5 + 0.1 * (c % 3)]) + 0.01 * rng.normal(size=(RAW_POINTS, 3))
    return np.concatenate([pts, v], axis=1)


def write_modelnet_folder(root: Path, prefix: str = "mydata") -> Path:
    root.mkdir(parents=True)
    (root / f"{prefix}_shape_names.txt").write_text("\n".join(CLASSES) + "\n")
    for split, offset in (("train", 0), ("test", 100)):
        ids = []
        for c, name in enumerate(CLASSES):
            (root / name).mkdir(exist_ok=True)
            for i in range(PER_SPLIT):
                sid = f"{name}_{offset + i + 1:04d}"
                np.savetxt(root / name / f"{sid}.txt", _cloud(c, offset + i), delimiter=",", fmt="%.5f")
                ids.append(sid)
        (root / f"{prefix}_{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_mesh_folder(root: Path) -> Path:
    trimesh = pytest.importorskip("trimesh")
    for c, name in enumerate(CLASSES):
        for split in ("train", "test"):
            folder = root / name / split
            folder.mkdir(parents=True)
            for i in range(PER_SPLIT):
                mesh = trimesh.creation.box(extents=(1 + 0.3 * c, 1 + 0.1 * i, 0.5 + 0.1 * (c % 3)))
                mesh.export(folder / f"{name}_{split}{i}.obj")
    return root


TINY_ENC = ["model.trans_dim=32", "model.encoder_dims=32", "model.depth=1", "model.num_heads=2",
            "model.num_group=8", "model.group_size=8", "npoints=64", "threads=1"]
SVM_ENC = ["model.transformer_config.trans_dim=32", "model.transformer_config.encoder_dims=32",
           "model.transformer_config.depth=1", "model.transformer_config.num_heads=2", "model.num_group=8",
           "model.group_size=8", "npoints=64", "eval.svm_bs=16", "threads=1"]
FT = ["max_epoch=1", "scheduler.kwargs.epochs=1", "scheduler.kwargs.initial_epochs=0", "total_bs=11",
      "log.progress_bar=false", "log.tensorboard=false", "finetune.eval_bs=16", "finetune.votes=1"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("own")
    return {"modelnet": write_modelnet_folder(base / "modelnet_layout"), "mesh": write_mesh_folder(base / "meshes")}


@pytest.mark.parametrize("kind", ["modelnet", "mesh"])
def test_linear_svm_on_own_folder(folders, kind, tmp_path):
    r = _run(str(REPO / "tools/eval_svm.py"), "--config", str(REPO / "cfgs/pretrain/quickstart.yaml"),
             *SVM_ENC[:3], "--data", str(folders[kind]), "--data-points", "128", *SVM_ENC[3:], "--repeats", "2",
             "--kfold", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    layout = "ModelNet text" if kind == "modelnet" else "mesh folder"
    assert f"data: {layout} layout at {folders[kind]}" in out and "11 classes, 128 points per cloud" in out
    assert "train 33 / test 33" in out and "n=33 test items, 95 % interval" in out
    assert "repeat 0 (seed 0):" in out and "repeat 1 (seed 1):" in out  # repeat r uses seed --seed + r
    assert "re-sampled x2: " in out and "over 2 repeats (std ddof=1), 95 % interval" in out
    assert "pooled 3-fold over train + test:" in out and "/ 66 correct" in out


@pytest.mark.parametrize("kind", ["modelnet", "mesh"])
def test_tiny_finetune_on_own_folder_takes_the_class_count(folders, kind, tmp_path):
    r = _run(str(REPO / "main_finetune.py"), *FT[:2], "--config", str(REPO / "cfgs/finetune/quickstart_cls.yaml"),
             "--scratch", *TINY_ENC, "--data", str(folders[kind]), "--data-points", "128", "--run_dir",
             str(tmp_path / "run"), *FT[2:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "-> dataset.train, dataset.test, model.cls_dim=11" in r.stdout
    assert "test accuracy, last epoch (0):" in r.stdout and "n=33 test items, 95 % interval" in r.stdout
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "cls_dim: 11" in saved


def test_class_count_mismatch_is_one_line_naming_the_key(folders, tmp_path):
    r = _run(str(REPO / "main_finetune.py"), "--config", str(REPO / "cfgs/finetune/quickstart_cls.yaml"),
             "--scratch", "--data", str(folders["modelnet"]), "model.cls_dim=16", *TINY_ENC, cwd=tmp_path)
    assert r.returncode == 2
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if "Error" in ln]
    assert len(errors) == 1 and "has 11 classes but model.cls_dim=16 was given: set model.cls_dim=11" in errors[0]


def test_config_defined_head_mismatch_is_an_error_not_info():
    from tools.tasks.finetune import _check_classes
    from utils.errors import ConfigError

    class Head:
        cls_dim = 16

    class Data:
        num_classes = 11

    with pytest.raises(ConfigError, match=r"dataset.train has 11 classes but model.cls_dim is 16: "
                                          r"set model.cls_dim=11"):
        _check_classes(Head(), Data(), "dataset.train")
    _check_classes(Head(), Data(), "dataset.train", allow_wider_head=True)  # few-shot: official wide head


def test_wrong_layout_is_one_line_naming_the_fix(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    r = _run(str(REPO / "tools/eval_svm.py"), "--config", str(REPO / "cfgs/pretrain/quickstart.yaml"),
             "--data", str(tmp_path / "junk"), cwd=tmp_path)
    assert r.returncode == 2
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if "Error" in ln]
    assert len(errors) == 1 and "no known data layout there" in errors[0]
    assert "python tools/prepare_data.py layout" in errors[0]


def test_overrides_in_any_position_and_dataset_root():
    import main_finetune

    ns = main_finetune.parse_args(["a=1", "--config", "c.yaml", "--exp_name", "x", "b=2", "--scratch",
                                   "dataset.root=/d"])
    assert ns.opts == ["a=1", "b=2"] and ns.exp_name == "x" and ns.data == "/d"
    with pytest.raises(SystemExit):
        main_finetune.parse_args(["--config", "c.yaml", "--scratch", "--bogus"])


def test_layout_checker_and_cache_tool_accept_any_prefix(folders, tmp_path, capsys):
    import shutil

    from tools.prepare_data import main

    root = tmp_path / "copy"
    shutil.copytree(folders["modelnet"], root)
    for cache in root.glob("*.dat"):  # caches other tests built in the shared folder
        cache.unlink()
    assert main(["layout", "modelnet40", "--root", str(root)]) == 0
    assert main(["modelnet-cache", "--root", str(root), "--n-points", str(RAW_POINTS), "--splits", "test"]) == 0
    out = capsys.readouterr().out
    cache = root / f"mydata_test_{RAW_POINTS}pts_fps.dat"
    assert f"wrote {cache} (" in out and " MB)" in out
    # already-sized clouds are stored as read (no FPS reordering)
    from datasets.io import safe_pickle_load

    points, labels = safe_pickle_load(str(cache))
    np.testing.assert_allclose(points[0], np.loadtxt(root / CLASSES[0] / f"{CLASSES[0]}_0101.txt",
                                                     delimiter=","), atol=1e-5)
    assert main(["modelnet-cache", "--root", str(root), "--num-category", "40"]) == 2
    assert "lists 11 classes but NUM_CATEGORY is 40: set NUM_CATEGORY: 11" in capsys.readouterr().err
    shutil.rmtree(root / CLASSES[3])
    assert main(["layout", "modelnet40", "--root", str(root)]) == 1  # train has no cache and a class folder gone
    assert f"the class folders {CLASSES[3]}/" in capsys.readouterr().out


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_and_checkpoint_modes_follow_the_umask(tmp_path, umask):
    import torch

    from datasets.io import write_cloud_cache
    from tools.engine.checkpoint import atomic_save

    old = os.umask(umask)
    try:
        write_cloud_cache(str(tmp_path / "c.dat"), [np.zeros((4, 3), np.float32)], [0])
        atomic_save({"x": torch.zeros(1)}, tmp_path / "ckpt.pth")
    finally:
        os.umask(old)
    for name in ("c.dat", "ckpt.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_intervals_against_direct_formulas():
    from scipy import stats as st

    from tools.tasks.stats import mean_std, t_interval, wilson_interval

    lo, hi = wilson_interval(50.0, 87)
    # Wilson bounds solve |p - p_hat| = z sqrt(p (1 - p) / n)
    for b in (lo / 100, hi / 100):
        assert abs(abs(b - 0.5) - 1.959963984540054 * np.sqrt(b * (1 - b) / 87)) < 1e-9
    assert wilson_interval(100.0, 10)[1] == pytest.approx(100.0) and wilson_interval(0.0, 10)[0] == pytest.approx(0.0)
    xs = [60.0, 62.5, 58.0, 64.0, 61.0]
    m, s = mean_std(xs)
    assert s == pytest.approx(np.std(xs, ddof=1))
    half = st.t.ppf(0.975, 4) * s / np.sqrt(5)
    assert t_interval(xs) == pytest.approx((m - half, m + half))
    with pytest.raises(ValueError, match="at least one test item"):
        wilson_interval(50.0, 0)
