"""Command-line pieces shared by the entry scripts: ``key=value`` overrides in any position, and
``--data PATH`` (or ``dataset.root=PATH``), which points a run at a data folder.

``--data`` detects the folder's layout (:func:`datasets.detect.detect_data`), prints it, and turns it into
config overrides placed *before* the user's own, so an explicit ``dataset.train.N_POINTS=...`` still wins:

* ``pretrain``: ``dataset.train`` (train split, ``npoints`` points) and ``dataset.svm_train`` /
  ``dataset.svm_test`` (train / test split) for the linear-SVM probe;
* ``finetune``: ``dataset.train`` / ``dataset.test``, and ``model.cls_dim`` set to the data's class count
  unless given (a given value that disagrees is a ConfigError naming the key); few-shot keeps the
  config's head (the official protocol keeps its 40-way head for 5/10-way episodes);
* ``svm``: ``dataset.svm_train`` / ``dataset.svm_test``;
* ``segment``: a ShapeNetPart folder (``synsetoffset2category.txt``, ``train_test_split/``, one folder per
  synset) becomes ``dataset.train`` (subset ``trainval``, or ``train`` when the config has a
  ``dataset.val``), ``dataset.val`` (if the config has one) and ``dataset.test``, ``NPOINTS`` = the run's
  ``npoints`` (or ``--data-points``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import yaml

from utils.errors import ConfigError

__all__ = ["OVERRIDES_HELP", "add_data_args", "parse_with_overrides", "data_overrides"]

OVERRIDES_HELP = ("config overrides key=value, anywhere on the line (before, between or after the options), "
                  "e.g. max_epoch=10 optimizer.kwargs.lr=5e-4")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """``--data PATH`` and ``--data-points N``."""
    p.add_argument("--data", default=None, metavar="PATH",
                   help="data folder (ModelNet text layout, mesh folder, ScanObjectNN h5 or ShapeNet npy): the "
                        "layout is detected and printed, and the run's data sections are built from it "
                        "(same as the override dataset.root=PATH)")
    p.add_argument("--data-points", type=int, default=None, metavar="N",
                   help="with --data: points per cached shape of a mesh folder (default: its largest existing "
                        "cache, else 2048) or of a new ModelNet cache (default: the raw files' size, at most 8192)")


def add_init_args(p: argparse.ArgumentParser, model: str, test_help: str) -> None:
    """How a fine-tuning run starts: ``--finetune CKPT`` | ``--scratch`` | ``--test CKPT`` (one of them)."""
    init = p.add_mutually_exclusive_group()
    init.add_argument("--finetune", metavar="CKPT", default=None,
                      help=f"pre-trained checkpoint whose encoder initialises the {model}")
    init.add_argument("--scratch", action="store_true", help="train from a random initialisation")
    init.add_argument("--test", metavar="CKPT", default=None, help=test_help)
    p.add_argument("--source", choices=("student", "ema", "teacher"), default=None,
                   help="with --finetune: the encoder to load (sets finetune.source): student, ema (the model_ema "
                        "average; a GM3D checkpoint without one: its EMA teacher) or teacher (GM3D's EMA teacher)")


def check_init_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one way to start, or ``--resume`` alone (an argparse error otherwise)."""
    if not (args.finetune or args.scratch or args.test or args.resume):
        p.error("say how to initialise: --finetune CKPT, --scratch, or --test CKPT (or --resume)")
    if args.resume and (args.finetune or args.scratch or args.test):
        p.error("--resume continues a run with its own weights; drop --finetune / --scratch / --test")
    if getattr(args, "source", None):
        if not args.finetune:
            p.error("--source chooses the encoder of the --finetune checkpoint; it needs --finetune CKPT")
        args.opts = [*args.opts, f"finetune.source={args.source}"]


def parse_with_overrides(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the options; every other token of the form ``key=value`` is a config override (``ns.opts``,
    in order), wherever it stands. Anything else left over is the usual argparse error."""
    ns, rest = p.parse_known_args(argv)
    opts, bad = [], []
    for token in rest:
        (bad if token.startswith("-") or "=" not in token else opts).append(token)
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are written key=value)")
    ns.opts = list(getattr(ns, "opts", None) or []) + opts
    root = [o for o in ns.opts if o.split("=", 1)[0].strip() == "dataset.root"]
    if root:
        if getattr(ns, "data", None):
            p.error("give the data folder once: --data PATH or dataset.root=PATH")
        ns.data = root[-1].split("=", 1)[1].strip()
        ns.opts = [o for o in ns.opts if o not in root]
    return ns


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20).strip()


def data_overrides(data: str, task: str, config: str, opts: Sequence[str], points: int | None = None,
                   fewshot: bool = False, echo=print) -> list[str]:
    """The overrides that point a ``task`` (``pretrain``, ``finetune``, ``svm``) at folder ``data``,
    followed by ``opts``; prints the detected layout with ``echo``."""
    from datasets.detect import detect_data
    from utils.config import load_config, parse_override

    if task == "segment":
        return _segment_overrides(data, config, opts, points, echo)
    det = detect_data(data, points)
    cfg = load_config(config, list(opts))
    npoints = int(cfg.npoints)
    if det.points < npoints and task != "svm":
        raise ConfigError(f"--data {data}: clouds have {det.points} points but npoints={npoints}; pass "
                          f"npoints={det.points} (or a larger --data-points for a mesh folder)")

    def entry(subset: str, with_npoints: bool) -> str:
        others = {"subset": subset, **({"npoints": npoints} if with_npoints else {})}
        return _flow({"_replace_": True, **det.section, "others": others})

    sections = {"pretrain": [("train", "train", True), ("svm_train", "train", True), ("svm_test", "test", True)],
                "finetune": [("train", "train", False), ("test", "test", False)],
                "svm": [("svm_train", "train", False), ("svm_test", "test", False)]}[task]
    out = [f"dataset.{name}={entry(subset, np_)}" for name, subset, np_ in sections]
    if task == "finetune" and not fewshot:
        given = [parse_override(o)[1] for o in opts if o.split("=", 1)[0].strip() == "model.cls_dim"]
        if given and int(given[-1]) != det.num_classes:
            raise ConfigError(f"--data {data} has {det.num_classes} classes but model.cls_dim={given[-1]} was "
                              f"given: set model.cls_dim={det.num_classes} (or drop it to take the data's count)")
        if not given:
            out.append(f"model.cls_dim={det.num_classes}")
    echo(f"{det.describe()} -> {', '.join('dataset.' + s[0] for s in sections)}"
         + (f", model.cls_dim={det.num_classes}" if task == "finetune" and not fewshot else ""), flush=True)
    return out + list(opts)


def _segment_overrides(data: str, config: str, opts: Sequence[str], points: int | None, echo) -> list[str]:
    """``--data`` for segmentation: the folder must have the ShapeNetPart layout."""
    import os

    from datasets.shapenetpart import LAYOUT
    from utils.config import load_config
    from utils.errors import DataError

    root = os.path.abspath(os.path.expanduser(data))
    if not os.path.isdir(root):
        raise DataError(f"--data '{data}' is not a folder; pass the ShapeNetPart folder (synsetoffset2category.txt, "
                        f"train_test_split/, one folder per synset)")
    missing = LAYOUT.missing(root)
    if missing:
        raise DataError(f"--data '{data}' is not a ShapeNetPart layout (missing: {'; '.join(missing)}); check a copy "
                        f"with `python tools/prepare_data.py layout shapenetpart --root {data}` (docs/DATA.md)")
    cfg = load_config(config, list(opts))
    has_val = bool(cfg.dataset.get("val"))
    n = int(points or cfg.npoints)
    splits = [("train", "train" if has_val else "trainval")] + ([("val", "val")] if has_val else []) + [("test", "test")]
    out = [f"dataset.{name}=" + _flow({"_replace_": True, "NAME": "ShapeNetPart", "ROOT": root, "NPOINTS": n,
                                       "USE_NORMALS": False, "others": {"subset": subset}})
           for name, subset in splits]
    echo(f"data: ShapeNetPart layout at {root} ({n} points per shape) -> "
         + ", ".join(f"dataset.{name} ({subset})" for name, subset in splits), flush=True)
    return out + list(opts)
