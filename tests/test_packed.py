"""Packed data sets: ``prepare_data.py pack`` on official-format fixtures gives the per-file loaders' items,
the pack is checked on read, and an interrupted pack leaves nothing that reads as complete."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import DATASETS, build_dataset
from datasets.packed import PackedClouds, write_pack
from tests.test_datasets_official import write_shapenet, write_shapenetpart
from tools.prepare_data import main
from utils.errors import DataError


def assert_same_items(a: torch.utils.data.Dataset, b: torch.utils.data.Dataset) -> None:
    """Same length, and every item has the same keys and equal values (tensors exactly)."""
    assert len(a) == len(b) and a.classes == b.classes
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            if torch.is_tensor(x[key]):
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (i, key)
            else:
                assert x[key] == y[key], (i, key)


# ------------------------------------------------------------------------------------- ShapeNet
@pytest.fixture
def shapenet_pack(tmp_path: Path) -> tuple[Path, Path]:
    root = write_shapenet(tmp_path / "ShapeNet55-34")
    assert main(["pack", "shapenet", "--root", str(root)]) == 0
    return root, root / "shapenet_pc.pack.json"


def _shapenet(root: Path, **kw) -> torch.utils.data.Dataset:
    kw = {"n_points": 64, "npoints": 16, **kw}
    return DATASETS.get("ShapeNet")(data_path=str(root / "ShapeNet-55"), pc_path=str(root / "shapenet_pc"),
                                    **kw)


@pytest.mark.parametrize("kw", [{}, {"subset": "test"}, {"whole": True}, {"npoints": 64, "seed": 5}])
def test_shapenet_pack_gives_the_per_file_items(shapenet_pack, kw) -> None:
    root, pack = shapenet_pack
    per_file, packed = _shapenet(root, **kw), _shapenet(root, packed_path=str(pack), **kw)
    assert_same_items(per_file, packed)
    per_file.set_epoch(3)
    packed.set_epoch(3)
    assert_same_items(per_file, packed)


def test_shapenet_pack_manifest_and_format(shapenet_pack) -> None:
    root, pack = shapenet_pack
    m = json.loads(pack.read_text())
    files = sorted(p.name for p in (root / "shapenet_pc").glob("*.npy"))
    assert (m["dataset"], m["count"], m["columns"], m["rows"]) == ("ShapeNet", 10, 3, 640)
    assert m["names"] == files and m["source"] == str(root / "shapenet_pc")
    data = np.load(root / "shapenet_pc.pack.npy", mmap_mode="r")
    assert isinstance(data, np.memmap) and data.dtype == np.float32
    np.testing.assert_array_equal(data[64:128], np.load(root / "shapenet_pc" / files[1]))


def test_shapenet_pack_from_config_without_the_npy_folder(shapenet_pack) -> None:
    root, pack = shapenet_pack
    (root / "shapenet_pc").rename(root / "elsewhere")  # the pack alone must do
    per_file = DATASETS.get("ShapeNet")(data_path=str(root / "ShapeNet-55"), pc_path=str(root / "elsewhere"),
                                        n_points=64, npoints=16)
    section = {"NAME": "ShapeNet", "DATA_PATH": "data/ShapeNet55-34/ShapeNet-55", "N_POINTS": 64,
               "PC_PATH": "data/ShapeNet55-34/shapenet_pc",
               "PACKED_PATH": "data/ShapeNet55-34/shapenet_pc.pack.json",
               "others": {"subset": "train", "npoints": 16}}
    packed = build_dataset(section, data_root=str(root.parent))
    assert packed.packed.manifest_path == str(pack)
    assert_same_items(per_file, packed)
    loaded = pickle.loads(pickle.dumps(packed))  # what a spawned DataLoader worker receives
    assert len(pickle.dumps(packed)) < 20_000 and torch.equal(loaded[3]["points"], packed[3]["points"])


def test_pack_is_checked_on_read(shapenet_pack, tmp_path: Path) -> None:
    root, pack = shapenet_pack
    data = root / "shapenet_pc.pack.npy"
    with pytest.raises(DataError, match=r"was built for 'ShapeNet', not for 'ShapeNetPart'"):
        PackedClouds(str(pack), "ShapeNetPart", 7)
    with pytest.raises(DataError, match=r"missing pack manifest '.*nope.json'.*run it again"):
        _shapenet(root, packed_path=str(tmp_path / "nope.json"))
    good = data.read_bytes()
    data.write_bytes(good[:-12])
    with pytest.raises(DataError, match=r"shapenet_pc.pack.npy' has 7796 bytes; .* records 7808 \(truncated"):
        _shapenet(root, packed_path=str(pack))
    data.write_bytes(good)
    m = json.loads(pack.read_text())
    pack.write_text(json.dumps({**m, "count": 9}))
    with pytest.raises(DataError, match=r"'names' must list 9 distinct item names"):
        _shapenet(root, packed_path=str(pack))
    pack.write_text(json.dumps(m)[:50])
    with pytest.raises(DataError, match=r"shapenet_pc.pack.json' is truncated or corrupt"):
        _shapenet(root, packed_path=str(pack))
    # A pack that lacks listed shapes, and one whose values were edited after packing.
    arrays = [np.load(root / "shapenet_pc" / n) for n in m["names"]]
    small = tmp_path / "small.json"
    keep = [(n, a) for n, a in zip(m["names"], arrays) if n != "03001627-train0002.npy"]
    write_pack(str(small), keep, dataset="ShapeNet", source=str(root), columns=3)
    with pytest.raises(DataError, match=r"1 file\(s\) listed in .*train\.txt' are missing from the pack "
                                        r"'.*small.json'"):
        _shapenet(root, packed_path=str(small))
    arrays[m["names"].index("02691156-train0000.npy")][:] = np.nan
    write_pack(str(small), zip(m["names"], arrays), dataset="ShapeNet", source=str(root), columns=3)
    with pytest.raises(DataError,
                       match=r"small.npy' item '02691156-train0000.npy': point 0, column 0: nan is not"):
        _shapenet(root, packed_path=str(small))[0]


def test_interrupted_pack_leaves_no_pack(shapenet_pack, tmp_path: Path) -> None:
    root, pack = shapenet_pack

    def items():
        yield "a.npy", np.zeros((4, 3), np.float32)
        raise KeyboardInterrupt  # the user stops the packer half-way

    with pytest.raises(KeyboardInterrupt):
        write_pack(str(pack), items(), dataset="ShapeNet", source=str(root), columns=3)
    assert not pack.exists()  # the old manifest went first: the old data may be half replaced
    assert (root / "shapenet_pc.pack.npy").read_bytes()[:6] == b"\x93NUMPY"  # the old data, intact
    assert not list(root.glob(".*.tmp"))
    with pytest.raises(DataError, match="missing pack manifest"):
        _shapenet(root, packed_path=str(pack))
    assert main(["pack", "shapenet", "--root", str(root)]) == 0
    assert_same_items(_shapenet(root), _shapenet(root, packed_path=str(pack)))


def test_pack_subcommand_skips_an_existing_pack(shapenet_pack, capsys) -> None:
    root, pack = shapenet_pack
    assert main(["pack", "shapenet", "--root", str(root)]) == 0
    assert "exists, skipped" in capsys.readouterr().out
    assert main(["pack", "shapenet", "--root", str(root), "--out", str(root / "other"), "--force"]) == 0
    assert json.loads((root / "other.json").read_text())["names"] == json.loads(pack.read_text())["names"]
    assert main(["pack", "shapenet", "--root", str(root / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- ShapeNetPart
@pytest.mark.parametrize("kw", [{}, {"subset": "test", "use_normals": True}, {"sampling": "official"},
                                {"class_choice": ["Mug"], "npoints": 64}])
def test_shapenetpart_pack_gives_the_per_file_items(tmp_path: Path, kw) -> None:
    root = write_shapenetpart(tmp_path / "part")
    assert main(["pack", "shapenetpart", "--root", str(root)]) == 0
    pack = root / "shapenetpart.pack.json"
    assert json.loads(pack.read_text())["count"] == 12
    make = DATASETS.get("ShapeNetPart")
    kw = {"npoints": 32, **kw}
    per_file, packed = make(str(root), **kw), make(str(root), packed_path=str(pack), **kw)
    assert_same_items(per_file, packed)
    per_file.set_epoch(1)
    packed.set_epoch(1)
    assert_same_items(per_file, packed)
    assert "seg" in packed[0] and packed[0]["seg"].dtype == torch.int64
