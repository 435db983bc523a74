"""Linear-SVM evaluation of a frozen encoder (docs/METHOD.md, decision 7).

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
more than ``npoints`` points are reduced by deterministic FPS.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
                     device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Run ``feature_fn(points (B,N,3)) -> (B,C)`` over a data set; returns (features, labels)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    for batch in loader:
        feats.append(feature_fn(batch["points"].to(device)).float().cpu())
        labels.append(batch["label"].reshape(-1))
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def _svc(C: float, standardize: bool):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(kernel="linear", C=C)) if standardize else SVC(kernel="linear", C=C)


def select_C(train_x: np.ndarray, train_y: np.ndarray, grid: Sequence[float], standardize: bool = False,
             folds: int = 3, seed: int = 0) -> float:
    """The C of ``grid`` with the best mean accuracy in stratified k-fold CV on the training features."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = [cross_val_score(_svc(c, standardize), train_x, train_y, cv=cv).mean() for c in grid]
    return float(grid[int(np.argmax(scores))])


def linear_svm_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                        C: float = 0.01, standardize: bool = False) -> float:
    """Test accuracy in percent of a linear SVC fitted on the training features."""
    if len(np.unique(train_y)) < 2:
        raise ValueError("linear SVM needs at least two classes in the training features")
    clf = _svc(C, standardize)
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean() * 100.0)


class SVMEvaluator:
    """Engine evaluator: every ``every`` epochs, SVM accuracy of ``model.extract_features``."""

    name = "svm"

    def __init__(self, train_set: Dataset, test_set: Dataset, *, every: int = 1, C: float = 0.01,
                 batch_size: int = 64, device: torch.device = torch.device("cpu"),
                 C_grid: Sequence[float] = (), standardize: bool = False):
        self.train_set, self.test_set = train_set, test_set
        self.every, self.C, self.batch_size, self.device = every, C, batch_size, device
        self.C_grid, self.standardize = list(C_grid), standardize

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            tr = extract_features(model.extract_features, self.train_set, self.batch_size, self.device)
            te = extract_features(model.extract_features, self.test_set, self.batch_size, self.device)
        finally:
            model.train(was_training)
        C = select_C(*tr, self.C_grid, self.standardize) if self.C_grid else self.C
        return {"svm_acc": linear_svm_accuracy(*tr, *te, C=C, standardize=self.standardize), "svm_C": C}


class EncoderFeatures(nn.Module):
    """A bare Point-MAE encoder with the linear-SVM feature, for checkpoints of any layout.

    Args:
        trans_dim, depth, num_heads: encoder shape.
        group_size, num_group: patching.
        npoints: clouds with more points are reduced to this many by deterministic FPS (None: as given).
    """

    def __init__(self, trans_dim: int, depth: int, num_heads: int, group_size: int, num_group: int,
                 npoints: int | None = None):
        super().__init__()
        from models.point_mae import PointMAEEncoder

        self.group_size, self.num_group, self.npoints = group_size, num_group, npoints
        self.encoder = PointMAEEncoder(trans_dim, trans_dim, depth, num_heads, 0.0, embed_visible_only=False)

    @classmethod
    def from_model_cfg(cls, model_cfg, npoints: int | None = None) -> "EncoderFeatures":
        """From a config ``model`` section: pre-training (``transformer_config``) or fine-tune (flat keys)."""
        tc = model_cfg.get("transformer_config") or model_cfg
        return cls(int(tc.get("trans_dim", 384)), int(tc.get("depth", 12)), int(tc.get("num_heads", 6)),
                   int(model_cfg.get("group_size", 32)), int(model_cfg.get("num_group", 64)), npoints)

    def load_checkpoint(self, path: str, source: str = "student") -> dict:
        """Load the encoder of any supported checkpoint; every encoder key must be present."""
        from models.adapters import PointMAEAdapter
        from tools import checkpoint as ckpt_io

        state, info = PointMAEAdapter().encoder_weights(ckpt_io.load_file(path), source=source, where=str(path))
        info.pop("extra")
        ckpt_io.load_state_dict_checked(self.encoder, state, what=f"encoder of {path} ({info['layout']})")
        return info

    @torch.no_grad()
    def extract_features(self, points: torch.Tensor) -> torch.Tensor:
        from extensions import fps, gather, group
        from models.point_mae import pool_tokens

        if self.npoints is not None and points.shape[1] > self.npoints:
            points = gather(points, fps(points, self.npoints))
        p = group(points, self.num_group, self.group_size)
        return pool_tokens(self.encoder(p.neighborhood, p.center))


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
    from tools.builders import build_split

    if dataset_config:
        tr, te = _dataset_file_sets(dataset_config, int(cfg.npoints), cfg.get("data_root"))
        return tr, te, dataset_config
    for a, b in (("svm_train", "svm_test"), ("train", "test")):
        if cfg.dataset.get(a) and cfg.dataset.get(b):
            return build_split(cfg, a), build_split(cfg, b), f"dataset.{a} / dataset.{b}"
    raise ValueError("no data for the SVM: pass --dataset-config or set dataset.svm_train / svm_test")


def main(argv: list[str] | None = None) -> int:
    from utils.config import load_config
    from utils.errors import CheckpointError, ConfigError, DataError
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
    p.add_argument("--source", choices=("student", "ema"), default="student",
                   help="GM3D checkpoints: the student's encoder or the EMA teacher's (default: student)")
    p.add_argument("--C", type=float, default=None, help="SVM C (default: eval.svm_C of the config)")
    p.add_argument("opts", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.opts)
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = EncoderFeatures.from_model_cfg(cfg.model, int(cfg.npoints))
        layout = "random init"
        if args.ckpt:
            layout = model.load_checkpoint(args.ckpt, args.source)["layout"]
        model.to(device).eval()
        train_set, test_set, where = svm_data(cfg, args.dataset_config)
        ev = SVMEvaluator(train_set, test_set, C=args.C if args.C is not None else cfg.eval.svm_C,
                          batch_size=cfg.eval.svm_bs, device=device,
                          C_grid=() if args.C is not None else cfg.eval.svm_C_grid,
                          standardize=cfg.eval.svm_standardize)
        res = ev(model, -1)
        acc, ev.C = res["svm_acc"], res["svm_C"]
    except (ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        logging.getLogger("eval_svm").error("%s: %s", type(e).__name__, e)
        return 2
    print(f"linear SVM accuracy: {acc:.2f} %  (C={ev.C}, data {where}: train {len(train_set)} / test "
          f"{len(test_set)}, checkpoint: {args.ckpt or 'random init'} [{layout}])", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
