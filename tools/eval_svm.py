"""Linear-SVM evaluation of a frozen encoder (SPEC decision 7).

Features: mean + max pooled encoder tokens of the complete (unmasked, un-augmented) cloud.
Classifier: ``sklearn.svm.SVC(kernel="linear", C=C)`` on the raw features (C=0.01 as in GM3D/M2AE).

Standalone::

    python tools/eval_svm.py --config cfgs/pretrain/quickstart.yaml --ckpt experiments/.../ckpt-last.pth
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
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


def linear_svm_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                        C: float = 0.01) -> float:
    """Test accuracy in percent of a linear SVC fitted on the training features."""
    from sklearn.svm import SVC

    if len(np.unique(train_y)) < 2:
        raise ValueError("linear SVM needs at least two classes in the training features")
    clf = SVC(kernel="linear", C=C)
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean() * 100.0)


class SVMEvaluator:
    """Engine evaluator: every ``every`` epochs, SVM accuracy of ``model.extract_features``."""

    name = "svm"

    def __init__(self, train_set: Dataset, test_set: Dataset, *, every: int = 1, C: float = 0.01,
                 batch_size: int = 64, device: torch.device = torch.device("cpu")):
        self.train_set, self.test_set = train_set, test_set
        self.every, self.C, self.batch_size, self.device = every, C, batch_size, device

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            tr = extract_features(model.extract_features, self.train_set, self.batch_size, self.device)
            te = extract_features(model.extract_features, self.test_set, self.batch_size, self.device)
        finally:
            model.train(was_training)
        return {"svm_acc": linear_svm_accuracy(*tr, *te, C=self.C)}


def main(argv: list[str] | None = None) -> int:
    from tools.builders import build_svm_sets, load_pretrained_for_eval
    from utils.config import load_config
    from utils.logging import setup_logging
    from utils.misc import resolve_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config whose model and dataset.svm_* sections to use")
    p.add_argument("--ckpt", default=None, help="checkpoint to evaluate (omit for a randomly initialised encoder)")
    p.add_argument("--C", type=float, default=None, help="SVM C (default: eval.svm_C of the config)")
    p.add_argument("opts", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.opts)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_pretrained_for_eval(cfg, args.ckpt, device)
    train_set, test_set = build_svm_sets(cfg)
    ev = SVMEvaluator(train_set, test_set, C=args.C if args.C is not None else cfg.eval.svm_C,
                      batch_size=cfg.eval.svm_bs, device=device)
    acc = ev(model, -1)["svm_acc"]
    print(f"linear SVM accuracy: {acc:.2f} %  (C={ev.C}, train {len(train_set)} / test {len(test_set)}, "
          f"checkpoint: {args.ckpt or 'random init'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
