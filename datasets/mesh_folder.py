"""A folder of class-labelled meshes, surface-sampled once into a ModelNet-style ``.dat`` cache.

Layouts (one sub-folder per class; classes are the sorted folder names):

* ``root/<class>/{train,test}/*.{obj,off,ply,stl}``: the split is given;
* ``root/<class>/*.{obj,off,ply,stl}``: a seeded split, ``test_fraction`` of each class to test.

Each mesh is sampled with ``raw_points`` area-weighted surface points (trimesh, seeded per file), with the
face normals, then reduced to ``n_points`` by batched FPS, exactly like the ModelNet raw files. The result
is written as ``meshfolder_{subset}_{n_points}pts_fps.dat`` (the ModelNet ``.dat`` pickle layout) plus a
``.json`` side file with the class and shape names, the size and modification time (``st_mtime_ns``) of
every mesh, and the settings; a side file that no longer matches the folder, a mesh's content or the
settings, or that is unreadable, triggers a rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from typing import Literal

import numpy as np
import torch

from datasets.build import DATASETS
from datasets.io import (
    DatasetLayout,
    InMemoryClouds,
    check_points,
    chunks,
    fps_subsample,
    human_size,
    item_rng,
    load_cloud_cache,
    register_layout,
    require_root,
    write_cloud_cache,
)
from utils.errors import ConfigError, DataError
from utils.io import atomic_write

log = logging.getLogger(__name__)

MESH_EXTENSIONS = (".obj", ".off", ".ply", ".stl")

LAYOUT = register_layout(
    DatasetLayout(
        key="mesh-folder",
        title="MeshFolder",
        root_hint="data/MeshFolder",
        tree=(
            "MeshFolder/                     (ROOT; any name)\n"
            "├── chair/                      one folder per class (sorted names = class indices)\n"
            "│   ├── train/a.obj ...         either train/ and test/ sub-folders ...\n"
            "│   └── test/b.off ...\n"
            "└── table/\n"
            "    ├── c.ply                   ... or the meshes directly (seeded split by test_fraction)\n"
            "    └── d.stl"
        ),
        required=(("*/",),),
        source="your own meshes (.obj/.off/.ply/.stl); nothing to download",
    )
)


def scan_mesh_folder(
    root: str, test_fraction: float, seed: int
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Classes and ``{subset: [(relative mesh path, label)]}`` of a mesh folder.

    Args:
        root: the folder.
        test_fraction: share of each flat class folder put in the test subset (rounded).
        seed: seed of the flat-folder split (keyed per class).
    """
    require_root(root, LAYOUT, "ROOT")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"MeshFolder: test_fraction must be in [0, 1), got {test_fraction}")
    classes = sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )
    if not classes:
        raise DataError(f"MeshFolder: '{root}' has no class sub-folders.\n{LAYOUT.describe()}")

    def meshes(folder: str) -> list[str]:
        return sorted(f for f in os.listdir(folder) if f.lower().endswith(MESH_EXTENSIONS))

    subsets: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if any(os.path.isdir(os.path.join(folder, s)) for s in subsets):
            for subset in subsets:
                sub = os.path.join(folder, subset)
                found = meshes(sub) if os.path.isdir(sub) else []
                subsets[subset].extend((f"{name}/{subset}/{f}", label) for f in found)
            continue
        files = meshes(folder)
        if not files:
            raise DataError(
                f"MeshFolder: class folder '{folder}' holds no {'/'.join(MESH_EXTENSIONS)} meshes"
            )
        n_test = int(round(test_fraction * len(files)))
        test = set(item_rng(seed, label).permutation(len(files))[:n_test].tolist())
        for i, f in enumerate(files):
            subsets["test" if i in test else "train"].append((f"{name}/{f}", label))
    return classes, subsets


_PLY_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
              "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def check_mesh_header(path: str) -> None:
    """Refuse a PLY, OFF or binary STL whose header claims more elements than the file can hold, with
    the claim and the file's real size (trimesh trusts these counts and fails later with a message about
    array shapes, or allocates for them).

    The bound is a lower one: a binary PLY element needs its fixed-size properties (a list property at
    least its count), an ASCII PLY element at least two bytes, an OFF vertex three numbers and a face
    four, a binary STL 50 bytes per triangle after its 84-byte header.
    """
    size = os.path.getsize(path)
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if ext == ".stl" and size >= 84 and head[:5].lower() != b"solid":
        (triangles,) = np.frombuffer(head[80:84], "<u4")
        if 84 + 50 * int(triangles) > size:  # fewer (a zero count, trailing bytes) is what trimesh reads anyway
            raise DataError(
                f"'{path}': its binary STL header claims {int(triangles)} triangles ({human_size(84 + 50 * int(triangles))}), "
                f"but the file holds {human_size(size)} ({(size - 84) // 50} triangles)"
            )
        return
    if ext == ".ply" and head.startswith(b"ply"):
        end = head.find(b"end_header")
        if end < 0:
            return  # trimesh reports the damaged header
        newline = head.find(b"\n", end)
        body = size - (newline + 1) if newline >= 0 else 0
        lines = head[:end].decode("latin1").splitlines()
        binary = any(ln.split()[:2] in (["format", "binary_little_endian"], ["format", "binary_big_endian"])
                     for ln in lines if ln.strip())
        need, claims = 0, []
        element: list | None = None
        for ln in lines:
            words = ln.split()
            if words[:1] == ["element"] and len(words) == 3 and words[2].isdigit():
                element = [words[1], int(words[2]), 0]
                claims.append(element)
            elif words[:1] == ["property"] and element is not None:
                kind = words[2] if words[1] == "list" and len(words) > 2 else words[1]
                element[2] += _PLY_SIZES.get(kind, 1)
        for _name, count, width in claims:
            need += count * (width if binary else 2)  # ASCII: at least one value and a newline
        if need > body:
            said = ", ".join(f"{count} '{name}'" for name, count, _ in claims) + " elements"
            raise DataError(
                f"'{path}': its PLY header claims {said} (at least {human_size(need)} of data), but only "
                f"{human_size(body)} follow the header"
            )
        return
    if ext == ".off":
        first = head.split(b"\n", 2)
        words = b" ".join(ln.split(b"#")[0] for ln in first[:2]).split()
        if words[:1] in ([b"OFF"], [b"NOFF"], [b"COFF"]) and len(words) >= 3 and words[1].isdigit() \
                and words[2].isdigit():
            vertices, faces = int(words[1]), int(words[2])
            with open(path, "rb") as f:  # tokens after the keyword and the counts
                header = 1 + sum(1 for w in words[1:4] if w.isdigit())  # the keyword, then 2 or 3 counts
                tokens = sum(len(ln.split(b"#")[0].split()) for ln in f) - header
            need = 3 * vertices + 4 * faces  # x y z per vertex; a count and >= 3 indices per face
            if need > tokens:
                raise DataError(
                    f"'{path}': its OFF header claims {vertices} vertices and {faces} faces (at least {need} "
                    f"numbers), but the file holds {max(tokens, 0)} numbers after the header ({human_size(size)})"
                )


def sample_mesh(path: str, count: int, seed: int, key: str) -> np.ndarray:
    """``count`` area-weighted surface points of a mesh with their face normals: float32 (count, 6).

    The draw is seeded by ``(seed, crc32(key))`` (``key``: the path relative to the root, so the draw
    does not depend on where the folder lives); scenes are merged into one mesh.
    """
    import trimesh

    check_mesh_header(path)
    try:
        # process=False: trimesh's processing drops non-finite vertices silently; they are an error here.
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for unreadable files
        raise DataError(
            f"'{path}' is truncated or corrupt: trimesh cannot read it as a mesh ({exc})"
        ) from exc
    # Check the vertices before the areas: huge or NaN coordinates make the area test meaningless.
    if isinstance(mesh, trimesh.Trimesh):
        check_points(mesh.vertices, f"'{path}' vertices", ("vertex", "column"))
        mesh.process()  # what trimesh.load(process=True) does: the same vertices and faces
    try:
        usable = isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) > 0 and mesh.area > 0
        if usable:
            rng = item_rng(seed, zlib.crc32(key.encode()))
            points, faces = trimesh.sample.sample_surface(mesh, count, seed=rng)
            cloud = np.concatenate([points, mesh.face_normals[faces]], axis=1)
    except (ValueError, IndexError, TypeError, FloatingPointError) as exc:  # faces naming absent vertices
        raise DataError(
            f"'{path}': malformed mesh, cannot sample its surface ({type(exc).__name__}: {exc})"
        ) from exc
    if not usable:
        raise DataError(f"'{path}': mesh has no faces of positive area; cannot sample its surface")
    return check_points(cloud, f"'{path}' surface samples")


def mesh_cache_paths(cache_dir: str, subset: str, n_points: int) -> tuple[str, str]:
    """The ``.dat`` cache and its ``.json`` side file."""
    dat = os.path.join(cache_dir, f"meshfolder_{subset}_{n_points}pts_fps.dat")
    return dat, dat + ".json"


def mesh_caches(cache_dir: str) -> dict[int, dict]:
    """The mesh caches in ``cache_dir`` that exist for both subsets with agreeing side files:
    ``{n_points: {"raw_points": ..., "test_fraction": ..., "seed": ...}}`` (the settings they were built
    with, e.g. by ``prepare_data.py mesh-folder``). Whether they still match the meshes is checked on load."""
    found: dict[int, dict] = {}
    if not os.path.isdir(cache_dir):
        return found
    for name in os.listdir(cache_dir):
        head, tail = "meshfolder_train_", "pts_fps.dat"
        if not (name.startswith(head) and name.endswith(tail) and name[len(head):-len(tail)].isdigit()):
            continue
        n_points = int(name[len(head):-len(tail)])
        settings = []
        for subset in ("train", "test"):
            dat, meta = mesh_cache_paths(cache_dir, subset, n_points)
            try:
                with open(meta, encoding="utf-8") as f:
                    content = json.load(f)
                settings.append({k: content[k] for k in ("raw_points", "test_fraction", "seed")}
                                if os.path.isfile(dat) and content.get("n_points") == n_points else None)
            except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
                settings.append(None)
        if settings[0] is not None and settings[0] == settings[1]:
            found[n_points] = settings[0]
    return found


def build_mesh_cache(
    root: str,
    subset: str = "train",
    n_points: int = 2048,
    raw_points: int = 10000,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> str:
    """Sample every mesh of ``subset`` and write the ``.dat`` cache and its ``.json`` side file.

    Args:
        root: the mesh folder.
        subset: ``train`` or ``test``.
        n_points: points kept per shape (FPS of the surface samples).
        raw_points: surface samples per mesh before FPS (>= n_points).
        test_fraction, seed: the split of flat class folders, and the surface-sampling seed.
        cache_dir: where to write; default ``root``.
        batch_size: meshes per FPS call.
        device: torch device for FPS; default CUDA when available.

    Returns:
        The ``.dat`` path.
    """
    if raw_points < n_points:
        raise ConfigError(f"MeshFolder: raw_points={raw_points} must be >= n_points={n_points}")
    classes, subsets = scan_mesh_folder(root, test_fraction, seed)
    entries = subsets[subset]
    if not entries:
        raise DataError(f"MeshFolder: subset '{subset}' of '{root}' is empty (test_fraction={test_fraction})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    content = _meta(classes, entries, n_points, raw_points, test_fraction, seed, root)  # before reading
    clouds: list[np.ndarray] = []
    for chunk in chunks(entries, batch_size):
        raw = [sample_mesh(os.path.join(root, rel), raw_points, seed, rel) for rel, _ in chunk]
        clouds.extend(fps_subsample(raw, n_points, batch_size=batch_size, device=device))
        log.info("mesh cache %s: %d / %d meshes", subset, len(clouds), len(entries))
    dat, meta = mesh_cache_paths(cache_dir or root, subset, n_points)
    if os.path.exists(meta):  # no side file may vouch for a half-written cache
        os.remove(meta)
    write_cloud_cache(dat, clouds, [label for _, label in entries])
    atomic_write(meta, lambda f: json.dump(content, f, indent=1), binary=False)
    log.info("wrote %s (%d meshes, %.1f MB)", dat, len(clouds), os.path.getsize(dat) / 1e6)
    return dat


def _meta(
    classes: list[str],
    entries: list[tuple[str, int]],
    n_points: int,
    raw_points: int,
    test_fraction: float,
    seed: int,
    root: str,
) -> dict:
    """The side-file content that identifies a cache: names, ``[size, st_mtime_ns]`` of each mesh, settings.

    Keyed on each mesh's size and modification time, so an edited mesh (same name) triggers a rebuild.
    """
    stats = [os.stat(os.path.join(root, rel)) for rel, _ in entries]
    return {
        "classes": classes,
        "names": [rel for rel, _ in entries],
        "files": [[st.st_size, st.st_mtime_ns] for st in stats],
        "n_points": n_points,
        "raw_points": raw_points,
        "test_fraction": test_fraction,
        "seed": seed,
    }


@DATASETS.register("MeshFolder")
class MeshFolder(InMemoryClouds):
    """Class-labelled meshes, loaded like ModelNet40 from their sampled cache (built or rebuilt as needed).

    Items: ``pc_norm`` on xyz, normals dropped unless ``use_normals``, point order shuffled (seeded) for
    train; ``name`` is the mesh path relative to ``root``.

    Args:
        root: the mesh folder (``ROOT``).
        subset: ``train`` or ``test``.
        n_points: points per cached shape (``N_POINTS``).
        raw_points: surface samples per mesh before FPS.
        test_fraction: share of each flat class folder in the test subset.
        use_normals: also return the face normals (``USE_NORMALS``).
        npoints: points per item (a prefix of the FPS order); None for all ``n_points``.
        seed: seed of the split, of the surface sampling and of the train shuffle.
        cache_dir: where the cache lives; default ``root``.
    """

    def __init__(
        self,
        root: str,
        subset: Literal["train", "test"] = "train",
        n_points: int = 2048,
        raw_points: int = 10000,
        test_fraction: float = 0.2,
        use_normals: bool = False,
        npoints: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        classes, subsets = scan_mesh_folder(root, test_fraction, seed)
        entries = subsets[subset]
        dat, meta_path = mesh_cache_paths(cache_dir or root, subset, n_points)
        expected = _meta(classes, entries, n_points, raw_points, test_fraction, seed, root)
        current = None
        if os.path.isfile(dat) and os.path.isfile(meta_path):
            try:
                with open(meta_path, encoding="utf-8") as f:
                    current = json.load(f)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError included
                log.warning("%s is unreadable (%s): rebuilding its cache", meta_path, exc)
        if current != expected:
            log.warning("%s missing or stale: sampling %d meshes", dat, len(entries))
            build_mesh_cache(root, subset, n_points, raw_points, test_fraction, seed, cache_dir)
        clouds, labels = load_cloud_cache(dat, len(classes), npoints or n_points, 6 if use_normals else 3,
                                          n_points=n_points)
        super().__init__(
            clouds,
            labels,
            expected["names"],
            npoints,
            normalize=True,
            use_normals=use_normals,
            shuffle=subset == "train",
            seed=seed,
        )
        self.classes = classes
        self.num_classes = len(classes)
