"""The restricted unpickler's memory bound: a data pickle of a few KB is refused, quickly and within a small
memory limit, whatever it asks the unpickler to allocate (docs/RELIABILITY.md, promise 10).

Each hostile file is loaded in one child process whose address space is capped at its size after the
imports plus 100 MB (``RLIMIT_AS``): a loader that allocated what the file asks for would die with a
MemoryError (or be refused by the kernel) instead of giving the expected one-line DataError.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasets.io import load_cloud_cache, safe_pickle_load
from tests.conftest import REPO
from utils.errors import DataError

GIB = 1 << 30


def _cache_pickle(protocol: int = 2, n: int = 9) -> bytes:
    """A small valid ModelNet-layout cache (about 11.5 KB at protocol 2 with n=9)."""
    rng = np.random.default_rng(0)
    clouds = [rng.standard_normal((32, 6)).astype(np.float32) for _ in range(n)]
    labels = [np.array([i % 3], np.int32) for i in range(n)]
    return pickle.dumps([clouds, labels], protocol=protocol)


class _Call:
    """Pickles as ``func(*args)`` without running it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _alias_bomb(width: int = 64, depth: int = 5) -> bytes:
    """A nested list of ``width ** depth`` floats in ~700 bytes: each level repeats one memoised list."""
    out = bytearray(b"\x80\x02" + b"G" + struct.pack(">d", 1.0) + b"q\x00")  # memo 0 = 1.0
    for level in range(1, depth + 1):  # memo k = [memo k-1] * width; only the last stays on the stack
        out += b"0](" + (b"h" + bytes([level - 1])) * width + b"e" + b"q" + bytes([level])
    return bytes(out + b".")


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file content, regex the error must match)."""
    legit = _cache_pickle()
    memo_bomb = legit[:2] + b"N" + b"r" + struct.pack("<I", 1_245_676_809) + b"0" + legit[2:]
    files = {
        "memo_bomb": (memo_bomb, r"LONG_BINPUT stores memo index 1245676809, more than a \d+-byte file"),
        "bytearray_50gib": (pickle.dumps(_Call(bytearray, 50 * GIB), protocol=2),
                            r"bytearray\(53687091200\) would allocate 53687091200 bytes, more than the"),
        "bytes_newobj": (b"\x80\x02c__builtin__\nbytes\n" + b"\x8a\x06" + (50 * GIB).to_bytes(6, "little")
                         + b"\x85\x81.", r"bytes\(53687091200\) would allocate"),
        "reconstruct_huge": (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                             b"\x8a\x05" + (10**10).to_bytes(5, "little") + b"\x85C\x01b\x87R.",
                             r"numpy array of shape \(10000000000,\) would allocate"),
        "ndarray_call": (pickle.dumps(_Call(np.ndarray, (10**10,), "b"), protocol=2),
                         r"calling ndarray is not allowed"),
        "object_dtype": (pickle.dumps(np.array([1, None], dtype=object), protocol=2),
                         r"numpy dtype 'O8'; only plain"),
        "dtype_object_flags": (pickle.dumps(np.dtype("V8"), protocol=2).replace(b"K\x00t", b"K?t"),
                               r"numpy dtype state .*; for \|V8 only .* with another byte order is allowed"),
        "dtype_itemsize": (pickle.dumps(np.dtype("V8"), protocol=2).replace(b"K\x08K\x01", b"M\x00\x10K\x01"),
                           r"numpy dtype state \(3, '\|', None, None, None, 4096, 1, 0\); for \|V8 only"),
        "bytearray8_claim": (b"\x80\x05\x96" + struct.pack("<Q", 50 * GIB) + b"ab.",
                             r"asks for 53687091200 bytes at byte 11 but only 3 remain"),
        "binbytes8_claim": (b"\x80\x04\x8e" + struct.pack("<Q", 50 * GIB) + b"ab.",
                            r"asks for 53687091200 bytes"),
        "frame_claim": (b"\x80\x04\x95" + struct.pack("<Q", 50 * GIB) + b"N.", r"asks for 53687091200 bytes"),
        "alias_bomb": (_alias_bomb(), (r"with shared references unfolded, would take 136\.3 MB, more than the "
                                       r"8\.4 MB allowed for a 684 bytes file")),
        "repeated_array": (pickle.dumps([np.zeros(1024, np.float32)] * 3000, protocol=4),
                           r"would take 12\.3 MB, more than the 8\.4 MB allowed for a 10\.3 KB file"),
        "repr_bomb": (_alias_bomb()[:-1].replace(b"\x80\x02", b"\x80\x02c__builtin__\nstr\n", 1) + b"\x85R.",
                      r"str\(\) called on \(list\); only strings and bytes"),
        "hex_doubling": (pickle.dumps(_Call(__import__("codecs").encode, b"ab", "hex"), protocol=2),
                         r"str\(\) called on|only strings and bytes|only latin1"),
    }
    return files


CHILD = r"""
import json, re, resource, sys, time
from datasets.io import safe_pickle_load
from utils.errors import DataError

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))

cases = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 100 * 2**20, resource.RLIM_INFINITY))
out = {}
for name, path in cases.items():
    t0 = time.perf_counter()
    try:
        safe_pickle_load(path)
        out[name] = ["loaded", "", time.perf_counter() - t0]
    except DataError as e:
        out[name] = ["DataError", str(e), time.perf_counter() - t0]
    except BaseException as e:
        out[name] = [type(e).__name__, str(e), time.perf_counter() - t0]
print(json.dumps(out))
"""


def test_hostile_pickles_are_refused_fast_within_100_mb(tmp_path: Path) -> None:
    files = hostile_files()
    paths = {}
    for name, (content, _) in files.items():
        paths[name] = str(tmp_path / f"{name}.dat")
        Path(paths[name]).write_bytes(content)
    assert len(files["memo_bomb"][0]) > 11_000  # the size of the reported file
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, pattern) in files.items():
        kind, message, seconds = results[name]
        assert kind == "DataError", (name, kind, message)
        assert "\n" not in message and paths[name] in message, (name, message)
        assert __import__("re").search(pattern, message), (name, message)
        assert seconds < 1.0, (name, seconds)


def test_the_memo_bomb_is_what_the_c_unpickler_cannot_bound(tmp_path: Path) -> None:
    """Without the bound, Python's own unpickler asks for ~20 GB for the same 11.5 KB (here: refused by the
    100 MB cap with a MemoryError), so the test above really exercises the bound."""
    memo_bomb = hostile_files()["memo_bomb"][0]
    code = ("import resource, pickle, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (512 * 2**20, resource.RLIM_INFINITY))\n"
            "try:\n    pickle.loads(sys.stdin.buffer.read())\nexcept MemoryError:\n    print('MemoryError')\n")
    proc = subprocess.run([sys.executable, "-c", code], input=memo_bomb, capture_output=True, timeout=60,
                          check=False)
    assert proc.stdout.decode().strip() == "MemoryError", proc.stderr


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_caches_and_episodes_still_load(tmp_path: Path, protocol: int) -> None:
    cache = tmp_path / "modelnet3_train_32pts_fps.dat"
    cache.write_bytes(_cache_pickle(protocol, n=40))
    clouds, labels = load_cloud_cache(str(cache), 3, 32, 6)
    assert len(clouds) == 40 and clouds[0].shape == (32, 6) and labels.tolist()[:4] == [0, 1, 2, 0]
    rng = np.random.default_rng(1)
    episode = {s: [(rng.standard_normal((32, 6)).astype(np.float32), k % 2, 10 + k % 2) for k in range(6)]
               for s in ("train", "test")}
    pkl = tmp_path / "0.pkl"
    pkl.write_bytes(pickle.dumps(episode, protocol=protocol))
    back = safe_pickle_load(str(pkl))
    np.testing.assert_array_equal(back["test"][5][0], episode["test"][5][0])
    assert back["train"][3][1:] == (1, 11)


def test_shared_references_within_the_bound_still_load(tmp_path: Path) -> None:
    """Aliasing is legal up to the bound: the same label list referenced 100 times."""
    shared = [np.array([1], np.int32)] * 3
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps([shared] * 100, protocol=4))
    out = safe_pickle_load(str(path))
    assert len(out) == 100 and out[99][2][0] == 1
    path.write_bytes(pickle.dumps(np.array([[1.5, 2.0]], dtype=">f8"), protocol=2))
    assert safe_pickle_load(str(path)).tolist() == [[1.5, 2.0]]


def test_a_cycle_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    loop: list = []
    loop.append(loop)
    path = tmp_path / "loop.pkl"
    path.write_bytes(pickle.dumps(loop))
    with pytest.raises(DataError, match=r"loop\.pkl' is not a safe data pickle: a container holds itself"):
        safe_pickle_load(str(path))
    path.write_bytes(b"\x80\x02" + b"]" * 500 + b"a" * 499 + b".")  # 500 lists, each in the one before
    with pytest.raises(DataError, match=r"nest deeper than 100 levels"):
        safe_pickle_load(str(path))
