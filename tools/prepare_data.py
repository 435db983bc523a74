"""Prepare the on-disk data sets: FPS caches, few-shot folds, mesh caches, layout checks.

Run from the repository root, e.g.::

    python tools/prepare_data.py layout modelnet40 --root data/ModelNet/modelnet40_normal_resampled
    python tools/prepare_data.py modelnet-cache --root data/ModelNet/modelnet40_normal_resampled
    python tools/prepare_data.py fewshot --modelnet-root data/ModelNet/modelnet40_normal_resampled
    python tools/prepare_data.py mesh-folder --root data/MeshFolder
    python tools/prepare_data.py pack shapenet --root data/ShapeNet55-34

See docs/DATA.md for every layout and where the official copies are published.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()

import argparse  # noqa: E402
import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from datasets.io import LAYOUTS  # noqa: E402
from datasets.mesh_folder import build_mesh_cache  # noqa: E402
from datasets.modelnet40 import build_modelnet_cache, find_modelnet_prefix, modelnet_cache_path  # noqa: E402
from datasets.modelnet_fewshot import generate_fewshot  # noqa: E402
from datasets.packed import pack_paths  # noqa: E402
from datasets.shapenet55 import pack_shapenet  # noqa: E402
from datasets.shapenetpart import pack_shapenetpart  # noqa: E402
from utils.errors import ConfigError, DataError  # noqa: E402

log = logging.getLogger("prepare_data")

MODELNET_ROOT = "data/ModelNet/modelnet40_normal_resampled"
PACKERS = {  # data set -> (default root, default pack stem under the root, packer(root, out))
    "shapenet": ("data/ShapeNet55-34", "shapenet_pc.pack",
                 lambda root, out: pack_shapenet(os.path.join(root, "shapenet_pc"), out)),
    "shapenetpart": ("data/shapenetcore_partanno_segmentation_benchmark_v0_normal", "shapenetpart.pack",
                     pack_shapenetpart),
}


def cmd_modelnet_cache(args: argparse.Namespace) -> int:
    """Build the ``{prefix}_{split}_{N}pts_fps.dat`` caches that are missing (or all with --force)."""
    prefix = find_modelnet_prefix(args.root, args.num_category)
    for split in args.splits:
        path = modelnet_cache_path(args.root, prefix, split, args.n_points)
        if os.path.isfile(path) and not args.force:
            print(f"exists, skipped: {path} (use --force to rebuild)")
            continue
        path = build_modelnet_cache(
            args.root, args.num_category, split, args.n_points, args.batch_size, args.device, args.fps_order
        )
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    """Write seeded few-shot folds for every (way, shot) pair."""
    for way in args.ways:
        for shot in args.shots:
            paths = generate_fewshot(
                args.modelnet_root,
                args.out,
                way,
                shot,
                args.folds,
                args.query,
                args.seed,
                args.num_category,
                args.n_points,
            )
            print(f"wrote {len(paths)} folds to {os.path.dirname(paths[0])}")
    return 0


def cmd_mesh_folder(args: argparse.Namespace) -> int:
    """Sample every mesh of each subset into its ``.dat`` cache."""
    for subset in args.splits:
        path = build_mesh_cache(
            args.root,
            subset,
            args.n_points,
            args.raw_points,
            args.test_fraction,
            args.seed,
            args.cache_dir,
            args.batch_size,
            args.device,
        )
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    """Pack a per-file data set into one memory-mapped ``.npy`` plus its ``.json`` manifest."""
    default_root, stem, packer = PACKERS[args.dataset]
    root = args.root or default_root
    manifest_path, data_path = pack_paths(args.out or os.path.join(root, stem))
    if os.path.isfile(manifest_path) and not args.force:
        print(f"exists, skipped: {manifest_path} (use --force to rebuild)")
        return 0
    manifest = packer(root, manifest_path)
    print(f"wrote {data_path} ({manifest['data_bytes'] / 1e6:.1f} MB, {manifest['count']} items, "
          f"{manifest['rows']} x {manifest['columns']} float32) and {manifest_path}")
    print(f"use it with the data-set key PACKED_PATH: {manifest_path} (or dataset.<split>.packed_path=...)")
    return 0


def cmd_layout(args: argparse.Namespace) -> int:
    """Print the expected tree of a data set and what is missing under ``--root``; 1 if anything is."""
    layout = LAYOUTS[args.dataset]
    root = args.root or layout.root_hint
    print(layout.describe())
    missing = layout.missing(root)
    if missing:
        print(f"\nMISSING under {root}:")
        for entry in missing:
            print(f"  - {entry}")
        return 1
    print(f"\nOK: {root} has every required entry")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per preparation step."""
    parser = argparse.ArgumentParser(
        prog="prepare_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    device_help = "torch device for FPS (default: cuda when available, else cpu)"

    p = sub.add_parser(
        "modelnet-cache",
        help="build the ModelNet FPS .dat caches from the raw txt files",
        description="Read <root>/<class>/<id>.txt (comma-separated, N x 6) for every id of the "
        "split lists (the folder's P_shape_names.txt / P_train.txt / P_test.txt, any prefix P), reduce "
        "each to --n-points by batched farthest point sampling (start index 0) and write "
        "P_{split}_{N}pts_fps.dat, the pickle "
        "[list of float32 (N, 6), list of int32 array([cls])].",
    )
    p.add_argument(
        "--root", default=MODELNET_ROOT, help="the modelnet40_normal_resampled folder (default: %(default)s)"
    )
    p.add_argument(
        "--num-category",
        type=int,
        default=None,
        help="class count, checked against the folder's *_shape_names.txt; selects modelnet10_* or "
        "modelnet40_* when both are present (default: the one class list the folder holds, official names first)",
    )
    p.add_argument("--n-points", type=int, default=8192, help="points kept per shape (default: %(default)s)")
    p.add_argument(
        "--splits",
        nargs="+",
        choices=("train", "test"),
        default=["train", "test"],
        help="splits to build (default: train test)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="shapes per FPS call (default: %(default)s)")
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument("--force", action="store_true", help="rebuild caches that already exist")
    p.add_argument(
        "--fps-order",
        action="store_true",
        help="run FPS on clouds that already have --n-points points too (default: store them as read, "
        "since FPS would only reorder them)",
    )
    p.set_defaults(func=cmd_modelnet_cache)

    p = sub.add_parser(
        "fewshot",
        help="generate seeded ModelNet40 few-shot folds from the .dat caches",
        description="Official protocol: per fold draw WAY classes, SHOT support shapes per class "
        "from the train cache and QUERY (20) query shapes per class from the test "
        "cache, labels 0..WAY-1; write <out>/{way}way{shot}shot/{fold}.pkl as "
        "{'train': [(points, label, class)], 'test': [...]}. Seeded by "
        "(seed, way, shot, fold), so the folds are reproducible.",
    )
    p.add_argument(
        "--modelnet-root",
        default=MODELNET_ROOT,
        help="folder with modelnet{C}_{train,test}_{N}pts_fps.dat (default: %(default)s)",
    )
    p.add_argument("--out", default="data/ModelNetFewshot", help="output folder (default: %(default)s)")
    p.add_argument("--ways", type=int, nargs="+", default=[5, 10], help="ways (default: 5 10)")
    p.add_argument("--shots", type=int, nargs="+", default=[10, 20], help="shots (default: 10 20)")
    p.add_argument("--folds", type=int, default=10, help="folds per setting (default: %(default)s)")
    p.add_argument("--query", type=int, default=20, help="query shapes per class (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    p.add_argument(
        "--num-category", type=int, default=40, help="classes of the caches (default: %(default)s)"
    )
    p.add_argument(
        "--n-points", type=int, default=8192, help="points per cached shape (default: %(default)s)"
    )
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser(
        "mesh-folder",
        help="surface-sample a folder of meshes into .dat caches",
        description="Scan <root>/<class>/{train,test}/*.{obj,off,ply,stl} or <root>/<class>/* "
        "(seeded split by --test-fraction), sample --raw-points area-weighted surface "
        "points per mesh (trimesh, seeded), reduce them to --n-points by FPS and write "
        "meshfolder_{subset}_{N}pts_fps.dat (ModelNet .dat layout) plus a .json side "
        "file with the class and shape names.",
    )
    p.add_argument("--root", required=True, help="the mesh folder")
    p.add_argument(
        "--splits",
        nargs="+",
        choices=("train", "test"),
        default=["train", "test"],
        help="subsets to build (default: train test)",
    )
    p.add_argument("--n-points", type=int, default=2048, help="points kept per shape (default: %(default)s)")
    p.add_argument(
        "--raw-points", type=int, default=10000, help="surface samples before FPS (default: %(default)s)"
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="share of each flat class folder put in test (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="split and sampling seed (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="where to write the caches (default: --root)")
    p.add_argument("--batch-size", type=int, default=32, help="meshes per FPS call (default: %(default)s)")
    p.add_argument("--device", default=None, help=device_help)
    p.set_defaults(func=cmd_mesh_folder)

    p = sub.add_parser(
        "pack",
        help="pack a per-file data set (ShapeNet-55/34, ShapeNetPart) into one memory-mapped file",
        description="Read every cloud of a per-file data set once (ShapeNet: <root>/shapenet_pc/*.npy, xyz; "
        "ShapeNetPart: <root>/<synset>/<id>.txt, 7 columns), check it like the loader does, and write "
        "<out>.npy (float32 rows of all clouds, memory-mapped on read) and <out>.json (manifest: source, "
        "item count, names, row offsets, sizes), each atomically, the manifest last. Point a data set at it "
        "with PACKED_PATH: <out>.json; the split lists are still read from the data set's folder.",
    )
    p.add_argument("dataset", choices=sorted(PACKERS), help="which data set")
    p.add_argument("--root", default=None, help="the data set's root (default: its data/... path)")
    p.add_argument("--out", default=None,
                   help="the pack's manifest .json or stem (default: <root>/shapenet_pc.pack.json or "
                   "<root>/shapenetpart.pack.json)")
    p.add_argument("--force", action="store_true", help="rebuild a pack that already exists")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "layout",
        help="print the expected folder tree of a data set and check what is missing",
        description="Print the expected layout of DATASET and where the official copy is "
        "published, then list the required entries missing under --root. Exit "
        "status 1 when something is missing.",
    )
    p.add_argument("dataset", choices=sorted(LAYOUTS), help="which data set")
    p.add_argument("--root", default=None, help="the data set's root (default: its data/... path)")
    p.set_defaults(func=cmd_layout)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the sub-command; data and config errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
