"""utils.io: the shared atomic write (permissions, failure clean-up) and stale temp removal."""

import os
import pickle
import stat

import numpy as np
import pytest
import torch

from utils.io import atomic_write, remove_stale_temps


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.bin") == 0o666 & ~umask == _mode(tmp_path / "plain.bin")


def test_atomic_write_replaces_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write(target, lambda f: f.write("old"), binary=False)

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom, binary=False)
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_every_writer_goes_through_the_helper(tmp_path, monkeypatch):
    """checkpoint, pickle cache, config and synthetic cache writes all call utils.io.atomic_write."""
    import utils.io
    from datasets import io as dio
    from datasets.synthetic import SyntheticShapes
    from tools.engine import checkpoint
    from utils.config import Config, save_config

    seen = []
    real = utils.io.atomic_write

    def spy(path, write_fn, **kw):
        seen.append(os.path.basename(path))
        return real(path, write_fn, **kw)

    for mod in (checkpoint, dio, __import__("utils.config", fromlist=["x"]),
                __import__("datasets.synthetic.dataset", fromlist=["x"])):
        monkeypatch.setattr(mod, "atomic_write", spy)
    checkpoint.atomic_save({"w": torch.ones(2)}, tmp_path / "c.pth")
    dio.atomic_pickle_dump([1, 2], str(tmp_path / "p.pkl"))
    save_config(Config({"a": 1}), tmp_path / "config.yaml")
    ds = SyntheticShapes.__new__(SyntheticShapes)
    ds._cache_path = lambda d, g: os.path.join(d, "s.npz")
    ds._save_cache(str(tmp_path), {}, (np.zeros((1, 2, 3), np.float32), np.zeros((1, 2)), np.zeros(1)))
    assert seen == ["c.pth", "p.pkl", "config.yaml", "s.npz"]
    assert torch.load(tmp_path / "c.pth", weights_only=True)["w"].sum() == 2
    assert pickle.loads((tmp_path / "p.pkl").read_bytes()) == [1, 2]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_remove_stale_temps_only_removes_temp_files(tmp_path):
    (tmp_path / ".ckpt-last.pth.abc123.tmp").write_bytes(b"x" * 100)
    (tmp_path / ".metrics.jsonl.q.tmp").write_text("{")
    (tmp_path / "ckpt-last.pth").write_bytes(b"keep")
    (tmp_path / "notes.tmp").write_text("a user's file, not hidden: kept")
    (tmp_path / ".lock").write_text("")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".ckpt-last.pth.abc123.tmp", ".metrics.jsonl.q.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-last.pth", "notes.tmp"]
