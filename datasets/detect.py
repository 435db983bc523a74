"""Recognise the layout of a data folder and describe it as a data-set config section.

:func:`detect_data` looks at a folder (``--data PATH`` on the command line) and returns which loader
reads it, the section that builds it (the keys of the matching ``cfgs/dataset_configs`` file), its
classes and a one-line description. Recognised, in this order:

* ModelNet text layout: ``P_shape_names.txt`` + ``P_train.txt`` + ``P_test.txt`` (any prefix ``P``) with
  ``P_{split}_{N}pts_fps.dat`` caches or the raw ``<class>/<class>_<n>.txt`` files;
* ScanObjectNN h5: ``training_objectdataset[_augmentedrot_scale75].h5`` + ``test_...h5``;
* ShapeNet-style npy: ``shapenet_pc/*.npy`` + ``ShapeNet-55/{train,test}.txt``;
* a mesh folder: ``<class>/*.{obj,off,ply,stl}`` or ``<class>/{train,test}/*...``.

Anything else is a :class:`DataError` of one line naming the layouts and the layout checker.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any

from utils.errors import DataError

__all__ = ["DetectedData", "detect_data"]

DEFAULT_MESH_POINTS = 2048


@dataclass
class DetectedData:
    """A recognised data folder.

    Attributes:
        kind: ``modelnet``, ``scanobjectnn``, ``shapenet`` or ``mesh-folder`` (the ``prepare_data.py
            layout`` key is ``layout_key``).
        root: the folder.
        section: the data-set section without the run keys (``subset``, ``npoints``).
        classes: class names when known (None for h5 / npy data, whose count is ``num_classes``).
        num_classes: the class count.
        points: points per stored / cached cloud.
        detail: what was found, for the printed line.
    """

    kind: str
    root: str
    section: dict[str, Any]
    num_classes: int
    points: int
    detail: str
    layout_key: str
    classes: list[str] | None = field(default=None)

    def describe(self) -> str:
        return (f"data: {self.kind} layout at {self.root} ({self.detail}; {self.num_classes} classes, "
                f"{self.points} points per cloud)")


_LAYOUTS_HINT = (
    "expected one of: ModelNet text (P_shape_names.txt + P_train.txt + P_test.txt), a mesh folder "
    "(<class>/*.obj|off|ply|stl), ScanObjectNN h5 (training_*.h5 + test_*.h5), ShapeNet npy "
    "(shapenet_pc/ + ShapeNet-55/); check a copy with `python tools/prepare_data.py layout "
    "{modelnet40,mesh-folder,scanobjectnn,shapenet} --root {root}`"
)


def detect_data(path: str, mesh_points: int | None = None) -> DetectedData:
    """The layout of ``path`` (see the module docstring), checked; DataError when none fits.

    Args:
        path: the folder.
        mesh_points: points per cached shape for a mesh folder (``N_POINTS``; default: the largest
            count of the caches already in the folder, with the settings in their side files, else 2048),
            or the upper bound for a ModelNet folder without caches (default 8192, capped at the raw
            files' size).
    """
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"--data '{path}' is not a folder; pass the folder that holds the data set")
    for probe in (_modelnet, _scanobjectnn, _shapenet, _mesh_folder):
        found = probe(root, mesh_points)
        if found is not None:
            return found
    raise DataError(f"--data '{path}': no known data layout there; " + _LAYOUTS_HINT.replace("{root}", path))


def _modelnet(root: str, mesh_points: int | None) -> DetectedData | None:
    from datasets.io import read_lines
    from datasets.modelnet40 import LAYOUT, modelnet_prefixes

    prefixes = modelnet_prefixes(root)
    if not prefixes:
        return None
    prefix = prefixes[0]
    classes = read_lines(os.path.join(root, f"{prefix}_shape_names.txt"), "class names, one per line")
    missing = LAYOUT.missing(root)
    if missing:
        raise DataError(f"--data '{root}': ModelNet text layout ({prefix}_*) but missing: {'; '.join(missing)}")
    sizes = [sorted(int(os.path.basename(f)[len(f"{prefix}_{s}_"):-len("pts_fps.dat")])
                    for f in glob.glob(os.path.join(root, f"{prefix}_{s}_*pts_fps.dat"))
                    if os.path.basename(f)[len(f"{prefix}_{s}_"):-len("pts_fps.dat")].isdigit())
             for s in ("train", "test")]
    both = sorted(set(sizes[0]) & set(sizes[1]))
    if both and (mesh_points is None or mesh_points in both):
        points = mesh_points or both[-1]
        detail = f"lists {prefix}_*, caches {prefix}_{{train,test}}_{points}pts_fps.dat"
    else:
        first = read_lines(os.path.join(root, f"{prefix}_train.txt"), "shape ids")[0]
        raw = os.path.join(root, first.rsplit("_", 1)[0], f"{first}.txt")
        with open(raw, encoding="utf-8") as f:
            raw_points = sum(1 for line in f if line.strip())
        points = min(mesh_points or 8192, raw_points)
        detail = f"lists {prefix}_*, raw txt files ({raw_points} points in {first}.txt); cache built on first use"
    section = {"NAME": "ModelNet", "DATA_PATH": root, "N_POINTS": points, "NUM_CATEGORY": len(classes),
               "USE_NORMALS": False}
    return DetectedData("ModelNet text", root, section, len(classes), points, detail, "modelnet40", classes)


def _scanobjectnn(root: str, mesh_points: int | None) -> DetectedData | None:
    for stem, name in (("objectdataset_augmentedrot_scale75", "ScanObjectNN_hardest"),
                       ("objectdataset", "ScanObjectNN")):
        train, test = (os.path.join(root, f"{s}_{stem}.h5") for s in ("training", "test"))
        if os.path.isfile(train) and os.path.isfile(test):
            from datasets.io import read_h5

            data = read_h5(train, ("data", "label"))
            n = int(data["label"].max()) + 1
            section = {"NAME": name, "ROOT": root}
            return DetectedData("ScanObjectNN h5", root, section, n, int(data["data"].shape[1]),
                                f"training_{stem}.h5 / test_{stem}.h5", "scanobjectnn")
    return None


def _shapenet(root: str, mesh_points: int | None) -> DetectedData | None:
    lists = os.path.join(root, "ShapeNet-55")
    if not (os.path.isdir(os.path.join(root, "shapenet_pc")) and os.path.isdir(lists)):
        return None
    from datasets.io import read_lines

    names = [n for s in ("train", "test") for n in read_lines(os.path.join(lists, f"{s}.txt"), "file names")]
    synsets = {n.split("-", 1)[0] for n in names}
    section = {"NAME": "ShapeNet", "DATA_PATH": lists, "PC_PATH": os.path.join(root, "shapenet_pc"),
               "N_POINTS": 8192}
    return DetectedData("ShapeNet npy", root, section, len(synsets), 8192,
                        "shapenet_pc/*.npy with ShapeNet-55/{train,test}.txt", "shapenet")


def _mesh_folder(root: str, mesh_points: int | None) -> DetectedData | None:
    from datasets.mesh_folder import MESH_EXTENSIONS, mesh_caches, scan_mesh_folder

    def has_meshes(folder: str) -> bool:
        return os.path.isdir(folder) and any(f.lower().endswith(MESH_EXTENSIONS) for f in os.listdir(folder))

    subdirs = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    if not subdirs or not any(has_meshes(os.path.join(root, d)) or has_meshes(os.path.join(root, d, "train"))
                              for d in subdirs):
        return None
    # Existing caches (e.g. from prepare_data.py mesh-folder --n-points N) are used with the settings they
    # were built with: the largest N when --data-points does not choose, else the one of that N.
    caches = mesh_caches(root)
    points = mesh_points or (max(caches) if caches else DEFAULT_MESH_POINTS)
    built = caches.get(points)
    settings = built or {"raw_points": max(10000, points), "test_fraction": 0.2, "seed": 0}
    classes, subsets = scan_mesh_folder(root, settings["test_fraction"], settings["seed"])
    for subset, entries in subsets.items():
        if not entries:
            raise DataError(f"--data '{root}': mesh folder without any {subset} mesh; add <class>/{subset}/ "
                            f"meshes or put the meshes directly in <class>/ for a seeded split")
    section = {"NAME": "MeshFolder", "ROOT": root, "N_POINTS": points, "RAW_POINTS": settings["raw_points"],
               "TEST_FRACTION": settings["test_fraction"], "USE_NORMALS": False, "SEED": settings["seed"]}
    how = "using the existing" if built else "sampled into"
    detail = (f"{len(subsets['train'])} train / {len(subsets['test'])} test meshes, {how} "
              f"meshfolder_{{train,test}}_{points}pts_fps.dat")
    return DetectedData("mesh folder", root, section, len(classes), points, detail, "mesh-folder", classes)
