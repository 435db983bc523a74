"""Linear-SVM evaluation of a frozen encoder: features, the SVC fit and C selection, the engine
evaluator, a bare encoder for any checkpoint, and the small-data estimates (seeded re-sampling repeats,
pooled k-fold) used by ``tools/eval_svm.py``.

Features: mean + max pooled encoder tokens of the complete (unmasked, un-augmented) cloud.
Classifier: ``sklearn.svm.SVC(kernel="linear", C=C)`` on the raw features (C=0.01 as in GM3D/M2AE).
Optional, for data sets where the official C does not fit (``eval.svm_C_grid``, ``eval.svm_standardize``):
C chosen by 3-fold stratified cross-validation on the TRAIN features only (never the test split), and
features standardised with the train statistics.

Re-sampling (:class:`Resampled`): repeat ``r`` of ``--repeats`` runs with seed ``seed + r`` (so
``--seed S --repeats 1`` reproduces the repeat printed with seed S) and gives every cloud a random point
order drawn from ``(seed + r, 0, index)``; the encoder's deterministic FPS (to ``npoints``, then to the patch centres) starts
at index 0, so each repeat sees a different FPS start and, for clouds larger than ``npoints``, a different
point subset of the same surfaces. The spread over repeats is the measurement noise of one encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tools.tasks.common import eval_mode
from utils.errors import ConfigError
from utils.misc import derive_seed

__all__ = ["extract_features", "select_C", "linear_svm_accuracy", "SVMEvaluator", "EncoderFeatures",
           "Resampled", "repeated_svm", "kfold_svm"]


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

    counts = np.bincount(np.asarray(train_y, dtype=np.int64))
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    if smallest < folds:
        raise ConfigError(f"eval.svm_C_grid: choosing C by {folds}-fold cross-validation needs at least {folds} "
                          f"training shapes per class, and the smallest class of the SVM train split has "
                          f"{smallest}: give it more shapes, or set eval.svm_C_grid=[] to use eval.svm_C")
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
        with eval_mode(model):
            tr = extract_features(model.extract_features, self.train_set, self.batch_size, self.device)
            te = extract_features(model.extract_features, self.test_set, self.batch_size, self.device)
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
    def from_model_cfg(cls, model_cfg, npoints: int | None = None) -> EncoderFeatures:
        """From a config ``model`` section: pre-training (``transformer_config``) or fine-tune (flat keys)."""
        tc = model_cfg.get("transformer_config") or model_cfg
        return cls(int(tc.get("trans_dim", 384)), int(tc.get("depth", 12)), int(tc.get("num_heads", 6)),
                   int(model_cfg.get("group_size", 32)), int(model_cfg.get("num_group", 64)), npoints)

    def load_checkpoint(self, path: str, source: str = "student") -> dict:
        """Load the encoder of any supported checkpoint; every encoder key must be present."""
        from models.adapters import PointMAEAdapter
        from tools.engine import checkpoint as ckpt_io

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


class BackboneFeatures(nn.Module):
    """The linear-SVM feature of any registered pre-training model (the backbone contract's
    ``extract_features``), for backbones without a bare-encoder shortcut like :class:`EncoderFeatures`.

    The checkpoint's encoder comes through the model's adapter (canonical encoder names, which for such
    backbones are also their pre-training names); every encoder key must be present, every other key
    of the model (decoders, GC branch, teachers) is left out.
    """

    def __init__(self, model: nn.Module, npoints: int | None = None):
        super().__init__()
        self.model, self.npoints = model, npoints

    def load_checkpoint(self, path: str, source: str = "student") -> dict:
        from models.adapters import adapter_for
        from tools.engine import checkpoint as ckpt_io

        adapter = adapter_for(self.model)
        state, info = adapter.encoder_weights(ckpt_io.load_file(path), source=source, where=str(path))
        info.pop("extra", None)
        own = self.model.state_dict()
        allowed = {k for k in own if not k.startswith(adapter.ENCODER)}
        ckpt_io.load_state_dict_checked(self.model, state, allowed_missing=allowed,
                                        what=f"encoder of {path} ({info['layout']})")
        return info

    @torch.no_grad()
    def extract_features(self, points: torch.Tensor) -> torch.Tensor:
        from extensions import fps, gather

        if self.npoints is not None and points.shape[1] > self.npoints:
            points = gather(points, fps(points, self.npoints))
        return self.model.extract_features(points)


def feature_model(model_cfg, npoints: int | None = None) -> nn.Module:
    """The frozen-encoder feature model of a config's ``model`` section: :class:`EncoderFeatures` for
    Point-MAE (pre-training or fine-tune keys), :class:`BackboneFeatures` for every other backbone."""
    from models import MODELS, build_model

    cls = MODELS.get(model_cfg["NAME"])
    if getattr(cls, "ARCH", "") == "point_mae":
        return EncoderFeatures.from_model_cfg(model_cfg, npoints)
    return BackboneFeatures(build_model(dict(model_cfg), where="model"), npoints)


class Resampled(Dataset):
    """A view of a data set whose item ``i`` has its points in a random order seeded by
    ``(seed, repeat, i)`` (see the module docstring); labels and everything else unchanged."""

    def __init__(self, dataset: Dataset, seed: int, repeat: int):
        self.dataset, self.seed, self.repeat = dataset, int(seed), int(repeat)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.repeat, index))
        order = torch.randperm(item["points"].shape[0], generator=g)
        item["points"] = item["points"][order]
        if "normals" in item:
            item["normals"] = item["normals"][order]
        return item


def repeated_svm(feature_fn: Callable[[torch.Tensor], torch.Tensor], train_set: Dataset, test_set: Dataset, *,
                 repeats: int, seed: int = 0, C: float = 0.01, C_grid: Sequence[float] = (),
                 standardize: bool = False, batch_size: int = 64,
                 device: torch.device = torch.device("cpu")) -> list[dict[str, float]]:
    """Linear-SVM accuracy for ``repeats`` seeded re-samplings of both splits: repeat ``r`` is
    :class:`Resampled` with seed ``seed + r`` (repeat index 0), so ``seed=s + r, repeats=1`` reproduces it.
    One ``{"repeat", "seed", "acc", "C"}`` per repeat (C re-selected on each repeat's train features when
    ``C_grid`` is given)."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    out = []
    for r in range(repeats):
        s = int(seed) + r
        tr = extract_features(feature_fn, Resampled(train_set, s, 0), batch_size, device)
        te = extract_features(feature_fn, Resampled(test_set, s, 0), batch_size, device)
        c = select_C(*tr, C_grid, standardize) if C_grid else C
        out.append({"repeat": r, "seed": s, "acc": linear_svm_accuracy(*tr, *te, C=c, standardize=standardize),
                    "C": c})
    return out


def kfold_svm(features: np.ndarray, labels: np.ndarray, *, folds: int, seed: int = 0, C: float = 0.01,
              C_grid: Sequence[float] = (), standardize: bool = False) -> dict:
    """Pooled stratified k-fold estimate over the given (train + test) features.

    Every item is tested exactly once, by an SVM fitted on the other folds (C selected inside those folds
    only when ``C_grid`` is given). Returns ``{"acc": pooled accuracy (%), "n": items, "correct": count,
    "fold_acc": [per-fold %], "fold_n": [per-fold items]}``.
    """
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise ValueError(f"--kfold needs at least 2 folds, got {folds}")
    counts = np.bincount(labels)
    if counts[counts > 0].min() < folds:
        raise ValueError(f"--kfold {folds}: the smallest class has {counts[counts > 0].min()} items in train + test; "
                         f"use at most that many folds")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    correct, fold_acc, fold_n = 0, [], []
    for tr, te in cv.split(features, labels):
        c = select_C(features[tr], labels[tr], C_grid, standardize) if C_grid else C
        clf = _svc(c, standardize)
        clf.fit(features[tr], labels[tr])
        hits = int((clf.predict(features[te]) == labels[te]).sum())
        correct += hits
        fold_acc.append(100.0 * hits / len(te))
        fold_n.append(len(te))
    return {"acc": 100.0 * correct / len(labels), "n": int(len(labels)), "correct": correct,
            "fold_acc": fold_acc, "fold_n": fold_n}
