"""Linear-SVM evaluation of a frozen encoder (docs/METHOD.md, decision 7): the command line (the library is
``tools/tasks/svm.py``).

Features: mean + max pooled encoder tokens of the complete (unmasked, un-augmented) cloud.
Classifier: ``sklearn.svm.SVC(kernel="linear", C=C)`` on the raw features (C=0.01 as in GM3D/M2AE).
Optional, for data sets where the official C does not fit (``eval.svm_C_grid``, ``eval.svm_standardize``):
C chosen by 3-fold stratified cross-validation on the TRAIN features only (never the test split), and
features standardised with the train statistics. The engine logs the C it used as ``svm_C``.

Standalone: any pre-trained checkpoint (official Point-MAE ``pretrain.pth``, this project's Point-MAE or
GM3D ``ckpt-*.pth``, even a fine-tuned classifier) in, accuracy out, on any classification data set::

    python tools/eval_svm.py --config cfgs/pretrain/quickstart.yaml --ckpt experiments/.../ckpt-last.pth
    python tools/eval_svm.py --config cfgs/pretrain/point_mae.yaml --ckpt pretrain.pth \
        --dataset-config cfgs/dataset_configs/ScanObjectNN_objectbg.yaml

The config gives the encoder's architecture (its ``model`` section: a pre-training ``transformer_config``
or the flat fine-tune keys) and ``npoints``; the checkpoint's encoder is found by
:meth:`models.adapters.PointMAEAdapter.encoder_weights` (every encoder key required, shapes checked). Data, in
order of precedence: ``--dataset-config FILE`` (its train / test subsets), the config's
``dataset.svm_train`` / ``dataset.svm_test``, else its ``dataset.train`` / ``dataset.test``. Clouds with
more than ``npoints`` points are reduced by deterministic FPS. ``--data PATH`` points it at any data
folder instead (layout detected and printed).

Small test splits: every accuracy is printed with its count of test items and a 95 % Wilson interval;
``--repeats K`` re-samples the clouds K times (repeat ``r`` with seed ``--seed + r``, printed beside it;
``--seed S --repeats 1`` reproduces that line) and prints each accuracy, mean ± std (ddof=1) and a 95 %
t-interval; ``--kfold K`` adds a pooled stratified K-fold
estimate over train + test::

    python tools/eval_svm.py --config cfgs/pretrain/quickstart.yaml --ckpt CKPT --repeats 5
    python tools/eval_svm.py --config cfgs/pretrain/quickstart.yaml --data my_meshes/ --kfold 5
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

if __name__ == "__main__":  # before torch loads the OpenMP runtime (utils/omp.py)
    from utils.omp import apply_wait_policy

    apply_wait_policy()

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger(__name__)


def _dataset_file_sets(path: str, npoints: int | None, data_root: str | None):
    """Train and test sets of an official data-set YAML (e.g. cfgs/dataset_configs/ModelNet40.yaml)."""
    import inspect

    from datasets import DATASETS, build_dataset
    from datasets.build import dataset_kwargs
    from utils.config import load_config

    section = load_config(path, defaults=None).to_dict()
    name = dataset_kwargs(section)["NAME"]
    accepts_npoints = "npoints" in inspect.signature(DATASETS.get(name)).parameters
    sets = []
    for subset in ("train", "test"):
        extra = {"subset": subset}
        if accepts_npoints and npoints:
            extra["npoints"] = npoints
        sets.append(build_dataset(section, data_root=data_root, where=f"{path} ({subset})", **extra))
    return sets


def svm_data(cfg, dataset_config: str | None = None):
    """(train set, test set, description) by the precedence of the module docstring."""
    from tools.engine.builders import build_split

    if dataset_config:
        tr, te = _dataset_file_sets(dataset_config, int(cfg.npoints), cfg.get("data_root"))
        return tr, te, dataset_config
    for a, b in (("svm_train", "svm_test"), ("train", "test")):
        if cfg.dataset.get(a) and cfg.dataset.get(b):
            return build_split(cfg, a), build_split(cfg, b), f"dataset.{a} / dataset.{b}"
    raise ValueError("no data for the SVM: pass --dataset-config or set dataset.svm_train / svm_test")


def main(argv: list[str] | None = None) -> int:
    from tools.engine.cli import OVERRIDES_HELP, add_data_args, data_overrides, parse_with_overrides
    from tools.tasks.stats import format_accuracy, format_mean, wilson_interval
    from tools.tasks.svm import SVMEvaluator, feature_model, extract_features, kfold_svm, repeated_svm
    from utils.config import load_config
    from utils.errors import CheckpointError, ConfigError, DataError
    from utils.io import atomic_write
    from utils.logging import setup_logging
    from utils.misc import resolve_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="config whose model section (encoder shape), npoints and data sections to use")
    p.add_argument("--ckpt", default=None,
                   help="checkpoint: official pretrain.pth, ours (Point-MAE / GM3D), or a fine-tuned classifier "
                        "(omit for a randomly initialised encoder)")
    p.add_argument("--dataset-config", default=None,
                   help="official data-set YAML, e.g. cfgs/dataset_configs/ModelNet40.yaml (train/test subsets)")
    add_data_args(p)
    p.add_argument("--source", choices=("student", "ema", "teacher"), default="student",
                   help="GM3D checkpoints: the student's encoder or the EMA teacher's (default: student)")
    p.add_argument("--C", type=float, default=None, help="SVM C (default: eval.svm_C of the config)")
    p.add_argument("--repeats", type=int, default=0, metavar="K",
                   help="K seeded re-samplings of the clouds (random point order -> a different FPS start and "
                        "subset per repeat; repeat r uses seed --seed + r); prints each accuracy, mean ± std and a 95 %% "
                        "t-interval (default: one plain evaluation)")
    p.add_argument("--kfold", type=int, default=0, metavar="K",
                   help="also a pooled stratified K-fold estimate over train + test (for small test splits): "
                        "every shape tested once by an SVM fitted on the other folds")
    p.add_argument("--seed", type=int, default=None, help="seed of the re-sampling and folds (default: cfg seed)")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="also write the results to OUT as JSON (accuracy, C, test count, repeats)")
    p.add_argument("opts", nargs="*", help=OVERRIDES_HELP)
    args = parse_with_overrides(p, argv)
    if args.data and args.dataset_config:
        p.error("give the data once: --data PATH or --dataset-config FILE")
    setup_logging()
    try:
        if args.data:
            args.opts = data_overrides(args.data, "svm", args.config, args.opts, args.data_points)
        cfg = load_config(args.config, args.opts)
        seed = int(cfg.seed if args.seed is None else args.seed)
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = feature_model(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model),
                              int(cfg.npoints))
        layout = "random init"
        if args.ckpt:
            layout = model.load_checkpoint(args.ckpt, args.source)["layout"]
        model.to(device).eval()
        train_set, test_set, where = svm_data(cfg, args.dataset_config)
        C = args.C if args.C is not None else cfg.eval.svm_C
        C_grid = () if args.C is not None else cfg.eval.svm_C_grid
        ev = SVMEvaluator(train_set, test_set, C=C, batch_size=cfg.eval.svm_bs, device=device, C_grid=C_grid,
                          standardize=cfg.eval.svm_standardize)
        res = ev(model, -1)
        acc, ev.C = res["svm_acc"], res["svm_C"]
        runs = repeated_svm(model.extract_features, train_set, test_set, repeats=args.repeats, seed=seed, C=C,
                            C_grid=C_grid, standardize=cfg.eval.svm_standardize, batch_size=cfg.eval.svm_bs,
                            device=device) if args.repeats else []
        kfold = None
        if args.kfold:
            tr = extract_features(model.extract_features, train_set, cfg.eval.svm_bs, device)
            te = extract_features(model.extract_features, test_set, cfg.eval.svm_bs, device)
            kfold = kfold_svm(np.concatenate([tr[0], te[0]]), np.concatenate([tr[1], te[1]]), folds=args.kfold,
                              seed=seed, C=C, C_grid=C_grid, standardize=cfg.eval.svm_standardize)
    except (ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        logging.getLogger("eval_svm").error("%s: %s", type(e).__name__, e)
        return 2
    n_test = len(test_set)
    print(f"linear SVM accuracy: {acc:.2f} %  (C={ev.C}, data {where}: train {len(train_set)} / test "
          f"{n_test}, checkpoint: {args.ckpt or 'random init'} [{layout}])", flush=True)
    print(f"  {format_accuracy(acc, n_test)}; one test item = {100.0 / n_test:.2f} points", flush=True)
    if runs:
        for r in runs:
            lo, hi = wilson_interval(r["acc"], n_test)
            print(f"  repeat {r['repeat']} (seed {r['seed']}): {r['acc']:.2f} %  (C={r['C']}, n={n_test}, "
                  f"95 % interval {lo:.1f}-{hi:.1f} %)")
        print(f"re-sampled x{len(runs)}: {format_mean([r['acc'] for r in runs], 'repeats')}", flush=True)
    if kfold:
        folds = ", ".join(f"{a:.1f}" for a in kfold["fold_acc"])
        print(f"pooled {args.kfold}-fold over train + test: {kfold['acc']:.2f} %  ({kfold['correct']} / "
              f"{kfold['n']} correct; {format_accuracy(kfold['acc'], kfold['n'])}; folds {folds})", flush=True)
    if args.json:
        record = {"svm_acc": acc, "svm_C": ev.C, "n_train": len(train_set), "n_test": n_test,
                  "checkpoint": args.ckpt, "source": args.source, "layout": layout,
                  "repeats": [r["acc"] for r in runs], "repeat_seeds": [r["seed"] for r in runs],
                  "kfold_acc": kfold["acc"] if kfold else None}
        atomic_write(Path(args.json), lambda f: f.write(json.dumps(record, indent=1) + "\n"), binary=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
